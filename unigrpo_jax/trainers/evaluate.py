"""Evaluation on the held-out test split: ODE sampling (optional CFG), reward, per-category
accuracy, reasoning accuracy, and a sample grid. Also the ``eval`` and ``sample`` modes."""
from __future__ import annotations

import collections
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from unigrpo_jax import distributed
from unigrpo_jax.data import shapeworld as sw
from unigrpo_jax.data.encoding import decode_reasoning, encode_prompts
from unigrpo_jax.data.pipeline import ShapeWorldSource
from unigrpo_jax.data.tokenizer import Tokenizer
from unigrpo_jax.models import PatchAutoencoder, UnifiedModel
from unigrpo_jax.models.image import to_uint8
from unigrpo_jax.rewards import shapeworld as sw_reward
from unigrpo_jax.sampling.rollout import make_eval_sampler
from unigrpo_jax.trainers import grid, setup
from unigrpo_jax.trainers.metrics import MetricsLogger


def eval_records(config: ml_collections.ConfigDict) -> list[dict]:
  """The first ``config.data.eval_tasks`` prompts of the ShapeWorld TEST split."""
  source = ShapeWorldSource("test", config.data.eval_tasks)
  return [source[i] for i in range(len(source))]


class Evaluator:
  """Compiles the eval sampler once; ``__call__(params, key)`` scores the fixed eval prompts."""

  def __init__(self, graphdef, rollout_cfg, autoencoder, tokenizer: Tokenizer,
               config: ml_collections.ConfigDict, records: Sequence[dict]):
    ev = config.eval
    self.tokenizer, self.records, self.batch = tokenizer, list(records), ev.batch_size
    self.grid_count = ev.grid_rows * 8
    self.sampler = make_eval_sampler(graphdef, rollout_cfg, autoencoder, num_steps=ev.num_steps,
                                     cfg_scale=ev.cfg_scale, greedy_text=ev.greedy)
    self.tokens, self.mask = encode_prompts(tokenizer, [r["prompt"] for r in self.records],
                                            config.data.max_prompt_len)
    self.specs = [sw.Spec.from_json(r["spec"]) for r in self.records]

  def __call__(self, params, key) -> tuple[dict, np.ndarray]:
    """-> (metrics, sample grid picture uint8 [H, W, 3])."""
    n = len(self.records)
    images, reasoning = [], []
    for start in range(0, n, self.batch):
      idx = np.arange(start, start + self.batch) % n  # a full last batch: no recompile
      out = self.sampler(params, self.tokens[idx], self.mask[idx], jax.random.fold_in(key, start))
      out = distributed.to_host(out)  # every process gets the (small) eval batch
      keep = min(self.batch, n - start)
      images.append(np.asarray(to_uint8(out.images))[:keep])
      reasoning += decode_reasoning(self.tokenizer, out.reasoning_tokens, out.reasoning_mask)[:keep]
    images = np.concatenate(images)
    scores = sw_reward.score(images, self.specs)
    parsed = [sw.parse_reasoning(t) for t in reasoning]
    reasoning_ok = np.array([p == s for p, s in zip(parsed, self.specs)], np.float32)
    metrics = {"eval/reward_mean": float(np.mean(scores["score"])),
               "eval/strict_accuracy": float(np.mean(scores["strict"])),
               "eval/reasoning_accuracy": float(np.mean(reasoning_ok))}
    by_cat = collections.defaultdict(list)
    for i, r in enumerate(self.records):
      by_cat[r["category"]].append(i)
    for cat, idx in sorted(by_cat.items()):
      metrics[f"eval/acc/{cat}"] = float(np.mean(scores["strict"][idx]))
      metrics[f"eval/score/{cat}"] = float(np.mean(scores["score"][idx]))
    k = min(self.grid_count, n)
    picture = grid.sample_grid(images[:k], [r["prompt"] for r in self.records[:k]],
                               reasoning[:k], scores["score"][:k])
    return metrics, picture


def build_evaluator(config, graphdef, model_cfg, tokenizer: Tokenizer) -> Evaluator:
  from unigrpo_jax.trainers.unigrpo import rollout_config  # one mapping config -> RolloutConfig
  return Evaluator(graphdef, rollout_config(config, tokenizer),
                   PatchAutoencoder.for_model(model_cfg), tokenizer, config, eval_records(config))


def run_eval(config: ml_collections.ConfigDict, workdir: str, save_only_samples: bool = False):
  """Evaluates ``config.init_checkpoint`` (or a fresh model) on the test split."""
  tokenizer = Tokenizer.for_shapeworld()
  model_cfg, params = setup.model_and_params(config, tokenizer)
  graphdef, fresh = nnx.split(UnifiedModel(model_cfg, nnx.Rngs(config.seed)), nnx.Param)
  params = fresh if params is None else params
  evaluator = build_evaluator(config, graphdef, model_cfg, tokenizer)
  metrics, picture = evaluator(params, jax.random.key(config.seed))
  path = os.path.join(workdir, "samples_eval.png")
  if distributed.is_main():
    grid.save_png(path, picture)
  if not save_only_samples:
    logger = MetricsLogger(workdir, tensorboard=config.tensorboard)
    logger.write(0, metrics)
    logger.close()
  for k, v in metrics.items():
    print(f"{k}: {v:.4f}")
  print(f"samples: {path}")
  return metrics
