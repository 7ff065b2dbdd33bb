"""ShapeWorld world: task sampling, canonical text, parsing, rendering."""
import json

import numpy as np
import pytest
from scipy import ndimage

from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.data.shapeworld.world import Obj, Spec
from unigrpo_jax.data.shapeworld.render import render

TASKS = sw.sample_tasks(2000, seed=123)


def test_every_category_appears_and_half_need_reasoning():
  cats = [t.category for t in TASKS]
  assert set(cats) == set(sw.CATEGORIES)
  frac = np.mean([c in sw.REASONING_CATEGORIES for c in cats])
  assert 0.4 < frac < 0.6, frac


def test_sampling_is_deterministic_in_seed():
  assert sw.sample_tasks(50, seed=7) == sw.sample_tasks(50, seed=7)
  assert sw.sample_tasks(50, seed=7) != sw.sample_tasks(50, seed=8)


def test_parse_reasoning_recovers_spec():
  for t in TASKS:
    assert sw.parse_reasoning(t.reasoning) == t.spec, t
    assert t.reasoning.endswith(sw.describe(t.spec))


def test_parse_reasoning_handles_wrapping_and_garbage():
  spec = Spec((Obj("triangle", "green", 2), Obj("square", "red", 1)), "left of")
  text = f"<think> five minus three is two . the image shows {sw.describe(spec)} . </think>"
  assert sw.describe(spec) == "two green triangles left of one red square"
  assert sw.parse_reasoning(text) == spec
  for bad in ["", "hello world", "two circle", "one circles", "one red circle and one blue circle",
              "five circles", "one red circle left of", "§§ ∑", "one red circle above above one square",
              None, 42]:
    assert sw.parse_reasoning(bad) is None, bad


def test_parse_prompt_on_explicit_categories():
  n = 0
  for t in TASKS:
    if t.category not in sw.REASONING_CATEGORIES:
      assert sw.parse_prompt(t.prompt) == t.spec, t
      n += 1
  assert n > 500
  with pytest.raises(ValueError):
    sw.parse_prompt("as many circles as one plus one")
  with pytest.raises(ValueError):
    sw.parse_prompt("a circle and a circle")


def test_reasoning_prompts_hide_the_answer():
  for t in TASKS:
    words = set(t.prompt.split())
    if t.category not in sw.REASONING_CATEGORIES:
      assert t.hidden == ()
      continue
    assert t.hidden and not words & set(t.hidden), t
    (o, *_) = t.spec.objects
    # Independent of the generator's bookkeeping for the single-object forms.
    if t.category == "reason_count":
      assert sw.NUMBER_WORDS[o.count] not in words and "as many" in t.prompt
    elif t.category == "reason_color":
      assert o.color not in words and "color of" in t.prompt
    elif t.category == "reason_shape":
      assert o.shape not in words and sw.PLURALS[o.shape] not in words
      assert not words & set(sw.SHAPES) and not words & set(sw.PLURALS.values())


def test_spec_serialisation_and_validation():
  for t in TASKS[:200]:
    d = json.loads(json.dumps(t.spec.to_dict()))
    assert Spec.from_dict(d) == t.spec
    assert Spec.from_json(t.spec.to_json()) == t.spec
    assert hash(Spec.from_dict(d)) == hash(t.spec)
  with pytest.raises(ValueError):
    Obj("hexagon")
  with pytest.raises(ValueError):
    Obj("circle", "pink")
  with pytest.raises(ValueError):
    Obj("circle", None, 5)
  with pytest.raises(ValueError):
    Spec((Obj("circle"), Obj("circle", "red")))
  with pytest.raises(ValueError):
    Spec((Obj("circle"),), "left of")
  with pytest.raises(ValueError):
    Spec((Obj("circle", None, 4), Obj("square", None, 2)))


def _instances(img, color):
  """(cy, cx) centroids of the 8-connected components of one palette color."""
  mask = np.all(img == np.array(sw.COLORS[color], np.uint8), axis=-1)
  lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
  return ndimage.center_of_mass(mask, lab, range(1, n + 1))


@pytest.mark.parametrize("size", [32, 64])
def test_render_counts_colors_no_overlap_and_relations(size):
  rng = np.random.default_rng(0)
  colors = list(sw.COLORS)
  specs = [t.spec for t in TASKS[:150]]
  # Relation specs with explicit, distinct colors so instances can be told apart here.
  for _ in range(100):
    s0, s1 = rng.choice(sw.SHAPES, 2, replace=False)
    c0, c1 = rng.choice(colors, 2, replace=False)
    specs.append(Spec((Obj(s0, c0, int(rng.integers(1, 3))), Obj(s1, c1, int(rng.integers(1, 3)))),
                      sw.RELATIONS[rng.integers(4)]))
  for i, spec in enumerate(specs):
    img = render(spec, seed=i, size=size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert np.array_equal(img, render(spec, seed=i, size=size))
    if any(o.color is None for o in spec.objects) or spec.objects[0].color == (
        spec.objects[-1].color if len(spec.objects) > 1 else None):
      continue
    cents = [_instances(img, o.color) for o in spec.objects]
    # One component per object: objects never touch or overlap.
    assert [len(c) for c in cents] == [o.count for o in spec.objects], spec
    if spec.relation:
      axis, sign = {"left of": (1, 1), "right of": (1, -1), "above": (0, 1),
                    "below": (0, -1)}[spec.relation]
      gap = min(sign * (b[axis] - a[axis]) for a in cents[0] for b in cents[1])
      assert gap > 0.1 * size, (spec, gap)


def test_render_layout_depends_on_seed():
  spec = Spec((Obj("circle", "red", 2),))
  imgs = {render(spec, seed=s).tobytes() for s in range(10)}
  assert len(imgs) > 5


def test_parse_reasoning_reads_only_the_final_clause():
  assert sw.parse_reasoning("one circle . the image shows two red squares") == Spec(
      (Obj("square", "red", 2),))
  assert sw.parse_reasoning("a picture of one circle") == Spec((Obj("circle"),))
  # An invalid final scene is None, not a valid shorter suffix.
  assert sw.parse_reasoning("two red circles left of one blue circle") is None
  assert sw.parse_reasoning("one circle . the image shows") is None
