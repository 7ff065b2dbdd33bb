"""ShapeWorld GenEval-style reward and the reward registry."""
import numpy as np
import pytest

from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.data.shapeworld.world import Obj, Spec
from unigrpo_jax.rewards import registry
from unigrpo_jax.rewards.shapeworld import score
from unigrpo_jax.data.shapeworld.render import render

TASKS = sw.sample_tasks(300, seed=2024)
SPECS = [t.spec for t in TASKS]


def test_ground_truth_renders_score_one_at_32():
  assert {t.category for t in TASKS} == set(sw.CATEGORIES)
  for render_seed in range(3):
    imgs = np.stack([render(s, seed=1000 * render_seed + i) for i, s in enumerate(SPECS)])
    out = score(imgs, SPECS)
    bad = [(TASKS[i].category, sw.describe(SPECS[i])) for i in np.nonzero(out["strict"] < 1)[0]]
    assert not bad, bad
    np.testing.assert_array_equal(out["score"], 1.0)
    assert out["num_detected"].sum() == sum(o.count for s in SPECS for o in s.objects)


def test_ground_truth_renders_score_one_at_64_as_list():
  imgs = [render(s, seed=i, size=64) for i, s in enumerate(SPECS[:100])]
  out = score(imgs, SPECS[:100])
  np.testing.assert_array_equal(out["score"], 1.0)
  np.testing.assert_array_equal(out["strict"], 1.0)


def test_other_specs_score_lower():
  imgs = np.stack([render(s, seed=i) for i, s in enumerate(SPECS)])
  out = score(imgs, SPECS[1:] + SPECS[:1])
  assert out["score"].mean() < 0.6 and out["strict"].mean() < 0.2


def test_output_shapes_dtypes_and_ranges():
  imgs = np.stack([render(s, seed=i) for i, s in enumerate(SPECS[:20])])
  out = score(imgs, SPECS[1:21])
  for k in ("score", "strict", "count", "color", "position", "has_color", "has_position"):
    assert out[k].shape == (20,) and out[k].dtype == np.float32
    assert np.all(np.isfinite(out[k])) and np.all((out[k] >= 0) & (out[k] <= 1)), k
  assert set(np.unique(out["strict"])) <= {0.0, 1.0}


@pytest.mark.parametrize("size", [32, 64])
def test_degenerate_images_score_near_zero(size):
  rng = np.random.default_rng(0)
  n = len(SPECS[:60])
  cases = {
      "noise": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
      "blank": np.zeros((n, size, size, 3), np.uint8),
      "white": np.full((n, size, size, 3), 255, np.uint8),
      "gray": np.full((n, size, size, 3), 128, np.uint8),
      "coarse_noise": np.repeat(np.repeat(
          rng.integers(0, 256, (n, size // 4, size // 4, 3), dtype=np.uint8), 4, 1), 4, 2),
  }
  for name, rgb in sw.COLORS.items():
    cases[name] = np.broadcast_to(np.array(rgb, np.uint8), (n, size, size, 3)).copy()
  for name, imgs in cases.items():
    out = score(imgs, SPECS[:n])
    assert out["score"].mean() < 0.1, (name, out["score"].mean())


def test_partial_credit_matches_geneval_formula():
  red, blue = np.array(sw.COLORS["red"], np.uint8), np.array(sw.COLORS["blue"], np.uint8)
  # Two red circles wanted, one drawn blue: count 1, color 1 - |2 - 1| / 2 = 0.5.
  spec = Spec((Obj("circle", "red", 2),))
  img = render(spec, seed=3)
  ys, xs = np.nonzero(np.all(img == red, -1))
  first = xs == xs.min()  # recolor the component containing the leftmost red pixel
  from scipy import ndimage
  lab, _ = ndimage.label(np.all(img == red, -1), structure=np.ones((3, 3)))
  img[lab == lab[ys[first][0], xs[first][0]]] = blue
  out = score(img[None], [spec])
  assert out["count"][0] == 1.0 and out["color"][0] == 0.5 and out["score"][0] == 0.75
  assert out["strict"][0] == 0.0
  # Three wanted, two drawn: count 1 - 1/3, color 0 because the count is wrong.
  spec3 = Spec((Obj("square", "red", 3),))
  img2 = render(Spec((Obj("square", "red", 2),)), seed=0)
  out = score(img2[None], [spec3])
  np.testing.assert_allclose(out["count"], 2 / 3, rtol=1e-6)
  assert out["color"][0] == 0.0
  np.testing.assert_allclose(out["score"], 1 / 3, rtol=1e-6)
  # Relation flipped: every other clause right, position 0 -> 4/5.
  a, b = Obj("circle", "red"), Obj("square", "blue")
  img3 = render(Spec((a, b), "right of"), seed=1)
  out = score(img3[None], [Spec((a, b), "left of")])
  assert out["position"][0] == 0.0 and out["has_position"][0] == 1.0
  np.testing.assert_allclose(out["score"], 0.8, rtol=1e-6)
  # Colorless spec: no color clause, filled with 1.0 and flagged.
  out = score(img3[None], [Spec((Obj("circle"), Obj("square")))])
  assert out["has_color"][0] == 0.0 and out["color"][0] == 1.0 and out["score"][0] == 1.0


def test_bad_inputs_raise():
  img = render(SPECS[0])
  with pytest.raises(ValueError):
    score(img[None].astype(np.float32), SPECS[:1])
  with pytest.raises(ValueError):
    score(img[None], SPECS[:2])
  with pytest.raises(ValueError):
    score(img, SPECS[:1])


# ----------------------------------------------------------------------------- registry
def test_registry_lookup_and_unknown_name():
  assert {"shapeworld", "shapeworld_strict", "reasoning_match"} <= set(registry.available())
  with pytest.raises(KeyError, match="shapeworld_strict"):
    registry.get("nope")
  with pytest.raises(KeyError, match="available"):
    registry.combined_reward({"shapeworld": 1.0, "nope": 0.5})


def test_combined_reward_is_weighted_sum():
  imgs = np.stack([render(s, seed=i) for i, s in enumerate(SPECS[:16])])
  specs = SPECS[:8] + SPECS[9:17]  # half right, half wrong
  texts = [t.reasoning for t in TASKS[:16]]
  fn = registry.combined_reward({"shapeworld": 0.5, "shapeworld_strict": 0.25,
                                 "reasoning_match": 1.0})
  out = fn(imgs, specs, reasoning_texts=texts)
  s = score(imgs, specs)
  match = np.array([sw.parse_reasoning(t) == sp for t, sp in zip(texts, specs)], np.float32)
  np.testing.assert_allclose(out["reward"], 0.5 * s["score"] + 0.25 * s["strict"] + match,
                             rtol=1e-6)
  np.testing.assert_array_equal(out["shapeworld/score"], s["score"])
  np.testing.assert_array_equal(out["shapeworld_strict/reward"], s["strict"])
  assert out["reasoning_match/reward"][:8].min() == 1.0 and out["reward"].shape == (16,)


def test_reward_exceptions_propagate(monkeypatch):
  def boom(images, specs, reasoning_texts=None):
    raise RuntimeError("boom")
  monkeypatch.setitem(registry._REGISTRY, "_test_raises", boom)  # undone after the test
  fn = registry.combined_reward({"shapeworld": 1.0, "_test_raises": 1.0})
  with pytest.raises(RuntimeError, match="boom"):
    fn(np.zeros((1, 32, 32, 3), np.uint8), SPECS[:1])
  with pytest.raises(ValueError):  # reasoning_match without texts
    registry.combined_reward({"reasoning_match": 1.0})(np.zeros((1, 32, 32, 3), np.uint8),
                                                       SPECS[:1])


def test_jpeg_rewards_flat_beats_noise():
  rng = np.random.default_rng(0)
  flat = np.full((2, 64, 48, 3), 128, np.uint8)
  noise = rng.integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
  imgs = np.concatenate([flat, noise])
  comp = registry.get("jpeg_compressibility")(imgs, [None] * 4)
  incomp = registry.get("jpeg_incompressibility")(list(imgs), [None] * 4)
  assert comp["reward"].dtype == np.float32 and comp["reward"].shape == (4,)
  np.testing.assert_array_equal(comp["reward"], -incomp["reward"])
  np.testing.assert_array_equal(comp["kb"], incomp["kb"])
  assert comp["kb"][0] == comp["kb"][1] and comp["kb"][0] < 1.0 and comp["kb"][2] > 3.0
  assert comp["reward"][0] > comp["reward"][2] and incomp["reward"][2] > incomp["reward"][0]
  # Matches Pillow's own quality-95 file size in kB.
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(noise[1]).save(buf, format="JPEG", quality=95)
  assert comp["kb"][3] == np.float32(len(buf.getvalue()) / 1000)


def test_jpeg_reward_rejects_float_images():
  with pytest.raises(ValueError, match="image 0 must be uint8"):
    registry.get("jpeg_compressibility")(np.zeros((1, 8, 8, 3), np.float32), [None])
