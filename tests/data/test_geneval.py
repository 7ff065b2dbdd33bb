"""GenEval prompts and metadata, ShapeWorld -> GenEval categories, reward input checks."""
import collections
import json
import os

import numpy as np
import pytest

from unigrpo_jax import checkpointing, config_defaults, paths
from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.data.pipeline import PromptFileSource
from unigrpo_jax.data.shapeworld.world import Obj, Spec
from unigrpo_jax.data.tokenizer import Tokenizer, split_words
from unigrpo_jax.data import geneval
from unigrpo_jax.rewards.shapeworld import score as sw_score
from unigrpo_jax.trainers.build import check_reward_inputs
from unigrpo_jax.data.shapeworld.render import render
from unigrpo_jax import config_defaults

PATH = paths.resolve_path(geneval.PROMPT_FILE)


def raw_lines():
  with open(PATH) as f:
    return [json.loads(l) for l in f.read().splitlines()]


def geneval_tokenizer():
  """A word tokenizer over GenEval's prompts (the ShapeWorld one does not know 'photo')."""
  words = sorted({w for d in raw_lines() for w in split_words(d["prompt"])})
  return Tokenizer(words)


def test_shipped_prompts_load_into_records_with_categories():
  raw = raw_lines()
  assert len(raw) == 553
  assert os.path.exists(os.path.join(os.path.dirname(PATH), "LICENSE"))
  src = PromptFileSource(geneval.PROMPT_FILE, geneval_tokenizer())
  assert len(src) == 553
  cats = collections.Counter(src[i]["category"] for i in range(len(src)))
  assert cats == collections.Counter(d["tag"] for d in raw)
  assert set(cats) == set(geneval.CATEGORIES)
  r = src[552]
  assert r["spec"] == "" and r["prompt"] == raw[552]["prompt"]
  assert json.loads(r["metadata"]) == raw[552]
  for i in range(len(src)):  # every record passes the reward's own check
    geneval.batch_metadata([None], [src[i]["metadata"]], [src[i]["prompt"]], require_geneval=True)


def test_geneval_prompts_with_the_shapeworld_tokenizer_name_the_line():
  with pytest.raises(ValueError, match=r"evaluation_metadata.jsonl, line 1: unknown word 'photo'"):
    PromptFileSource(geneval.PROMPT_FILE)


@pytest.mark.parametrize("line, match", [
    ({"tag": "nope", "include": [{"class": "circle", "count": 1}], "prompt": "a circle"},
     "line 1: tag 'nope' is not one of"),
    ({"tag": "position", "include": [{"class": "circle", "count": 1},
                                     {"class": "square", "count": 1, "position": ["near", 0]}],
      "prompt": "a circle"}, r"line 1: include\[1\]: position must be"),
    ({"tag": "counting", "include": [{"class": "circle", "count": 0}], "prompt": "a circle"},
     r"include\[0\]: count must be a positive integer"),
    ({"prompt": "a circle"}, "needs a 'spec', a 'metadata' object, or GenEval's"),
])
def test_bad_geneval_lines_are_named(tmp_path, line, match):
  p = tmp_path / "p.jsonl"
  p.write_text(json.dumps(line) + "\n")
  with pytest.raises(ValueError, match=match):
    PromptFileSource(p)


def test_shapeworld_spec_to_geneval_metadata():
  spec = Spec((Obj("triangle", "green", 2), Obj("square", "red", 1)), "left of")
  m = geneval.from_shapeworld(spec, "p")
  assert m == {"tag": "position", "prompt": "p", "include": [
      {"class": "square", "count": 1, "color": "red"},
      {"class": "triangle", "count": 2, "color": "green", "position": ["left of", 0]}]}
  geneval.validate_metadata(m, "x")
  c = geneval.from_shapeworld(Spec((Obj("circle", None, 3),)), "p")
  assert c["tag"] == "counting" and c["exclude"] == [{"class": "circle", "count": 4}]


def test_per_category_accuracy_on_shapeworld_matches_a_hand_count():
  # (ShapeWorld category, spec, drawn correctly?) -> GenEval category by hand:
  cases = [
      ("single_object", Spec((Obj("circle"),)), True),  # single_object
      ("single_object", Spec((Obj("square"),)), False),  # single_object
      ("counting", Spec((Obj("triangle", None, 2),)), True),  # counting
      ("reason_count", Spec((Obj("circle", "blue", 3),)), True),  # counting (structure)
      ("colors", Spec((Obj("square", "blue"),)), True),  # colors
      ("reason_color", Spec((Obj("circle", "red"),)), False),  # colors (structure)
      ("two_objects", Spec((Obj("circle"), Obj("square", None, 2))), True),  # two_object
      ("attribute_binding", Spec((Obj("circle", "red"), Obj("square", "green"))), False),
      ("position", Spec((Obj("circle", "red"), Obj("triangle", "blue")), "above"), True),
      ("position", Spec((Obj("circle"), Obj("square")), "left of"), False),
      ("reason_compose", Spec((Obj("circle", "red"), Obj("square", "blue")), "below"), True),
  ]
  images = np.stack([render(s, seed=i) if ok else np.zeros((32, 32, 3), np.uint8)
                     for i, (_, s, ok) in enumerate(cases)])
  strict = sw_score(images, [s for _, s, _ in cases])["strict"]
  np.testing.assert_array_equal(strict, [float(ok) for _, _, ok in cases])
  cats = [geneval.shapeworld_geneval_category(c, s) for c, s, _ in cases]
  got = geneval.per_category_accuracy(cats, strict)
  hand = {"single_object": 1 / 2, "counting": 2 / 2, "colors": 1 / 2, "two_object": 1 / 1,
          "color_attr": 0 / 1, "position": 2 / 3}
  assert got == pytest.approx({**{f"eval/geneval/{k}": v for k, v in hand.items()},
                               "eval/geneval/overall": np.mean(list(hand.values()))})


def _config(rewards, **remote_urls):
  c = config_defaults.base()
  c.rewards = rewards
  for name, url in remote_urls.items():
    c.remote_rewards[name].url = url
  return c


def test_prompt_sets_without_what_a_reward_reads_fail_before_compile(tmp_path):
  meta_only = tmp_path / "meta.jsonl"
  meta_only.write_text(json.dumps({"prompt": "draw a red circle", "metadata": {"k": 1}}) + "\n")
  src = PromptFileSource(meta_only)
  with pytest.raises(ValueError, match=r"config.rewards.shapeworld: reward 'shapeworld' needs a "
                     r"ShapeWorld spec, and prompt 'draw a red circle'"):
    check_reward_inputs(_config({"shapeworld": 1.0}), src)
  with pytest.raises(ValueError, match=r"config.rewards.geneval: reward 'geneval' needs GenEval "
                     r"metadata: .*record 0.*tag None"):
    check_reward_inputs(_config({"geneval": 1.0}, geneval="http://h/score"), src)
  spec_lines = tmp_path / "spec.txt"
  spec_lines.write_text("draw a red circle\ntwo blue squares above a circle\n")
  # ShapeWorld prompts carry a spec: both rewards can read them (GenEval's metadata is derived)
  check_reward_inputs(_config({"shapeworld": 1.0, "geneval": 1.0}, geneval="http://h/score"),
                      PromptFileSource(spec_lines))


def test_geneval_reward_sends_images_and_metadata_to_its_server():
  """A stand-in GenEval server (the protocol, a reward reading GenEval metadata) gets each
  prompt's metadata intact; ShapeWorld rows get metadata derived from their spec."""
  from local_server import serve
  from unigrpo_jax.rewards import registry
  from unigrpo_jax.rewards.remote import client as remote
  from unigrpo_jax.rewards import serve as serve_lib
  seen = []

  def detector(images, specs, reasoning_texts=None, prompts=None, metadata=None):
    seen.extend(metadata)
    return {"reward": np.array([geneval.CATEGORIES.index(m["tag"]) for m in metadata],
                               np.float32),
            "objects": np.array([len(m["include"]) for m in metadata], np.float32)}

  raw = raw_lines()[::50]  # 12 prompts over all categories
  images = np.zeros((len(raw) + 1, 8, 8, 3), np.uint8)
  spec = Spec((Obj("circle", "red"), Obj("square", "blue")), "above")
  with serve(serve_lib.make_app(detector)) as base:
    e = config_defaults.remote_reward_defaults("geneval")
    e.url, e.chunk_size = base + "/score", 5
    fn = registry.combined_reward({"geneval": 1.0},
                                  extra=remote.build_reward_fns({"geneval": e}, ["geneval"]))
    out = fn(images, [None] * len(raw) + [spec], None,
             prompts=[d["prompt"] for d in raw] + ["a red circle above a blue square"],
             metadata=[json.dumps(d) for d in raw] + [""])
  key = lambda m: json.dumps(m, sort_keys=True)  # chunks arrive concurrently, in any order
  derived = [m for m in seen if "spec" in m]
  assert sorted(map(key, [m for m in seen if "spec" not in m])) == sorted(map(key, raw))
  assert len(derived) == 1 and derived[0]["tag"] == "position"
  assert derived[0]["spec"] == spec.to_dict()
  np.testing.assert_array_equal(
      out["reward"], [geneval.CATEGORIES.index(d["tag"]) for d in raw] + [4])
  np.testing.assert_array_equal(out["geneval/objects"], [len(d["include"]) for d in raw] + [2])
