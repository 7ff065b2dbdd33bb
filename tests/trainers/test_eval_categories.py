"""Per-category evaluation of prompt sets without ShapeWorld specs (GenEval's), end to end."""
import collections
import json

import jax
import numpy as np
import pytest
from flax import nnx

from unigrpo_jax import checkpointing, config_defaults, paths
from unigrpo_jax.data.pipeline import PromptFileSource
from unigrpo_jax.data.tokenizer import Tokenizer, split_words
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.data import geneval
from unigrpo_jax.trainers import evaluate
from unigrpo_jax.trainers.evaluate import build_evaluator, free_text_metrics


def geneval_records(per_category: int = 2) -> tuple[list[dict], Tokenizer]:
  """The first ``per_category`` GenEval prompts of each category, and a word tokenizer over
  GenEval's prompts (the ShapeWorld one does not know 'photo')."""
  path = paths.resolve_path(geneval.PROMPT_FILE)
  with open(path) as f:
    words = {w for line in f for w in split_words(json.loads(line)["prompt"])}
  tokenizer = Tokenizer(sorted(words))
  src = PromptFileSource(geneval.PROMPT_FILE, tokenizer)
  taken, records = collections.Counter(), []
  for i in range(len(src)):
    r = src[i]
    if taken[r["category"]] < per_category:
      taken[r["category"]] += 1
      records.append(r)
  return records, tokenizer


def test_free_text_metrics_match_a_hand_count():
  records = [{"category": c} for c in ("counting", "counting", "position", "colors", "")]
  out = {"reward": np.array([1.0, 0.5, 0.0, 0.25, 1.0]),
         "geneval/correct": np.array([1.0, 0.0, 0.0, 1.0, 1.0]),
         "geneval/score": np.array([9.0] * 5)}
  metrics, reward = free_text_metrics(records, out)
  assert reward.dtype == np.float32 and reward.tolist() == [1.0, 0.5, 0.0, 0.25, 1.0]
  # by hand: counting (1 + .5) / 2, position 0, colors .25, custom (no category) 1.
  assert metrics == pytest.approx({
      "eval/reward_mean": 2.75 / 5,
      "eval/reward/counting": 0.75, "eval/reward/position": 0.0, "eval/reward/colors": 0.25,
      "eval/reward/custom": 1.0, "eval/reward/overall": (0.75 + 0 + 0.25 + 1) / 4,
      "eval/geneval/counting": 0.5, "eval/geneval/position": 0.0, "eval/geneval/colors": 1.0,
      "eval/geneval/custom": 1.0, "eval/geneval/overall": (0.5 + 0 + 1 + 1) / 4})


def test_free_text_metrics_without_correctness_report_rewards_only():
  metrics, _ = free_text_metrics([{"category": "a"}], {"reward": np.array([0.5])})
  assert not any(k.startswith("eval/geneval/") for k in metrics)
  with pytest.raises(ValueError, match=r"shape \(2,\) for 1 eval prompts"):
    free_text_metrics([{"category": "a"}], {"reward": np.zeros(2)})


def test_evaluator_scores_geneval_prompts_per_category():
  records, tokenizer = geneval_records(per_category=2)
  assert len(records) == 12 and {r["category"] for r in records} == set(geneval.CATEGORIES)
  config = config_defaults.base()
  config.model.preset = "tiny"
  config.eval.batch_size = 8    # 12 prompts: a full batch and a wrapped last one
  config.eval.num_steps = 2
  config.data.max_prompt_len = 16
  model_cfg = get_preset("tiny", vocab_size=tokenizer.vocab_size)
  graphdef, params = nnx.split(UnifiedModel(model_cfg, nnx.Rngs(0)), nnx.Param)
  seen = {}

  def fake_geneval(images, specs, reasoning_texts=None, prompts=None, metadata=None):
    """Correct on even rows; reward = row / 10. Records what arrived."""
    seen.update(images=images, specs=specs, prompts=prompts, metadata=metadata)
    n = len(images)
    return {"reward": np.arange(n, dtype=np.float32) / 10,
            "geneval/correct": (np.arange(n) % 2 == 0).astype(np.float32)}

  ev = build_evaluator(config, graphdef, model_cfg, tokenizer, records, reward_fn=fake_geneval)
  metrics, picture = ev(params, jax.random.key(0))
  # The reward saw every prompt once, in order, with its GenEval metadata.
  assert seen["images"].shape[0] == 12 and seen["images"].dtype == np.uint8
  assert seen["prompts"] == [r["prompt"] for r in records]
  assert [json.loads(m) for m in seen["metadata"]] == [json.loads(r["metadata"]) for r in records]
  # Hand count from the rows each category holds.
  by_cat = collections.defaultdict(list)
  for i, r in enumerate(records):
    by_cat[r["category"]].append(i)
  for cat, rows in by_cat.items():
    assert metrics[f"eval/geneval/{cat}"] == pytest.approx(np.mean([i % 2 == 0 for i in rows]))
    assert metrics[f"eval/reward/{cat}"] == pytest.approx(np.mean(rows) / 10)
  assert metrics["eval/reward_mean"] == pytest.approx(np.arange(12).mean() / 10)
  assert picture.ndim == 3 and picture.dtype == np.uint8


def test_reward_is_split_by_whether_the_trace_is_right():
  score = np.array([1.0, 0.5, 0.0, 0.25])
  ok = np.array([1.0, 1.0, 0.0, 0.0], np.float32)
  split = evaluate.reward_given_trace(score, ok)
  assert split == {"eval/reward_given_trace_right": 0.75, "eval/reward_given_trace_wrong": 0.125}
  every_trace_right = evaluate.reward_given_trace(score, np.ones(4))
  assert every_trace_right["eval/reward_given_trace_right"] == pytest.approx(0.4375)
  assert np.isnan(every_trace_right["eval/reward_given_trace_wrong"])
