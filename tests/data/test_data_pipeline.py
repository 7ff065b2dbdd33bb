"""Grain sources, the checkpointable prompt loader and the TFDS builder."""
import json

import numpy as np
import pytest

from unigrpo_jax.data import pipeline
from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.data.pipeline import PromptFileSource, ShapeWorldSource, make_prompt_loader


def test_splits_are_disjoint_by_prompt():
  train = ShapeWorldSource("train", 5000)
  test = ShapeWorldSource("test", 500)
  train_prompts = {train[i]["prompt"] for i in range(len(train))}
  test_recs = [test[i] for i in range(len(test))]
  assert not {r["prompt"] for r in test_recs} & train_prompts
  assert {r["category"] for r in test_recs} == set(sw.CATEGORIES)
  assert all(pipeline.split_of_prompt(p) == "train" for p in train_prompts)


def test_source_records():
  src = ShapeWorldSource("train", 20)
  assert len(src) == 20
  r = src[3]
  assert set(r) == {"prompt", "reasoning", "spec", "category", "index"} and r["index"] == 3
  spec = sw.Spec.from_json(r["spec"])
  assert sw.parse_reasoning(r["reasoning"]) == spec
  assert ShapeWorldSource("train", 20)[3] == r  # deterministic
  assert ShapeWorldSource("test", 20)[3] != r
  with pytest.raises(IndexError):
    src[20]
  with pytest.raises(ValueError):
    ShapeWorldSource("validation", 5)


def test_loader_state_save_restore():
  loader = make_prompt_loader(ShapeWorldSource("train", 23), batch_size=4, seed=1)
  it = iter(loader)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  it2 = iter(make_prompt_loader(ShapeWorldSource("train", 23), batch_size=4, seed=1))
  it2.set_state(state)
  got = [next(it2) for _ in range(2)]
  for a, b in zip(want, got):
    assert a["prompt"] == b["prompt"] and a["spec"] == b["spec"]
    np.testing.assert_array_equal(a["index"], b["index"])
  assert isinstance(want[0]["prompt"], list) and want[0]["index"].shape == (4,)


def test_loader_epochs_shuffle_and_finite():
  src = ShapeWorldSource("train", 10)
  idx = [b["index"] for b in make_prompt_loader(src, 5, seed=0, num_epochs=2)]
  ep0, ep1 = np.concatenate(idx[:2]), np.concatenate(idx[2:])
  assert sorted(ep0) == sorted(ep1) == list(range(10)) and list(ep0) != list(ep1)
  plain = [b["index"] for b in make_prompt_loader(src, 4, seed=0, shuffle=False, num_epochs=1)]
  assert [list(x) for x in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  other = [b["index"] for b in make_prompt_loader(src, 5, seed=1, num_epochs=1)]
  assert [list(x) for x in other] != [list(x) for x in idx[:2]]


def test_prompt_file_source(tmp_path):
  spec = sw.Spec((sw.Obj("circle", "green", 2),))
  p = tmp_path / "prompts.txt"
  p.write_text("draw a red circle left of two squares\n"
               + json.dumps({"prompt": "two circles the color of grass", "spec": spec.to_dict()})
               + "\n")
  src = PromptFileSource(p)
  assert len(src) == 2
  assert sw.Spec.from_json(src[0]["spec"]) == sw.Spec(
      (sw.Obj("circle", "red"), sw.Obj("square", None, 2)), "left of")
  assert sw.Spec.from_json(src[1]["spec"]) == spec
  batch = next(iter(make_prompt_loader(src, 2, seed=0, shuffle=False)))
  assert batch["prompt"][1] == "two circles the color of grass"


@pytest.mark.parametrize("text,match", [
    ("a red circle\n\na blue square\n", r"line 2: empty line"),
    ("a red circle\na blue hexagon\n", r"line 2: .*hexagon"),
    ("a red circle\nas many circles as one plus one\n", r"line 2: .*JSON"),
    ('{"prompt": "a red circle", "spec": {"objects": [{"shape": "blob"}]}}\n', r"line 1"),
    ('{"prompt": "a red zebra", "spec": {"objects": [{"shape": "circle"}]}}\n', r"line 1: .*zebra"),
    ("", r"no prompts"),
])
def test_prompt_file_validation(tmp_path, text, match):
  p = tmp_path / "bad.txt"
  p.write_text(text)
  with pytest.raises(ValueError, match=match):
    PromptFileSource(p)


def test_tfds_builder(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from unigrpo_jax.data.shapeworld.tfds_builder import ShapeWorld, ShapeWorldConfig
  builder = ShapeWorld(data_dir=str(tmp_path),
                       config=ShapeWorldConfig(name="test_cfg", train_size=6, test_size=3))
  builder.download_and_prepare()
  assert builder.info.splits["train"].num_examples == 6
  examples = list(tfds.as_numpy(builder.as_dataset(split="test")))
  assert len(examples) == 3
  from unigrpo_jax.rewards.shapeworld import score
  for ex in examples:
    i = int(ex["index"])
    task = pipeline.task_for("test", i)
    assert ex["prompt"].decode() == task.prompt
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    spec = sw.Spec.from_json(ex["spec"].decode())
    assert score(ex["image"][None], [spec])["strict"][0] == 1.0
  ds = tfds.load("shape_world/tiny", data_dir=str(tmp_path), split="test[:4]", download=True)
  assert len(list(ds)) == 4


class _CountingSource:
  """A source that counts which records were read (to check each shard reads only its own)."""

  def __init__(self, n):
    self.n, self.read = n, []

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    self.read.append(int(i))
    return {"prompt": f"p{int(i)}", "index": int(i)}


@pytest.mark.parametrize("num_epochs", [None, 3])
def test_sharded_loaders_rebuild_the_global_batches_and_read_only_their_rows(num_epochs):
  global_batch, shards, steps = 6, 2, 5
  whole = iter(make_prompt_loader(_CountingSource(17), global_batch, seed=3, num_epochs=num_epochs,
                                  drop_remainder=True))
  want = [next(whole)["index"] for _ in range(steps)]
  sources = [_CountingSource(17) for _ in range(shards)]
  its = [iter(make_prompt_loader(s, global_batch, seed=3, num_epochs=num_epochs,
                                 drop_remainder=True, shard_index=i, shard_count=shards))
         for i, s in enumerate(sources)]
  for step in range(steps):
    parts = [next(it)["index"] for it in its]
    assert all(len(p) == global_batch // shards for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), want[step])  # same rows, same order
  for i, s in enumerate(sources):  # each shard read exactly its own block of every batch
    assert len(s.read) == steps * global_batch // shards
    mine = np.concatenate([w[i * 3:(i + 1) * 3] for w in want])
    assert sorted(s.read) == sorted(mine.tolist())
  state = its[1].get_state()  # per-shard iterator state resumes that shard's stream
  nxt = next(its[1])["index"]
  again = iter(make_prompt_loader(_CountingSource(17), global_batch, seed=3, num_epochs=num_epochs,
                                  drop_remainder=True, shard_index=1, shard_count=shards))
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["index"], nxt)


def test_sharded_loader_rejects_an_unsplittable_batch():
  with pytest.raises(ValueError, match="global batch 5 cannot be split evenly over 2"):
    make_prompt_loader(_CountingSource(10), 5, seed=0, shard_index=0, shard_count=2)
