"""Evaluation on held-out prompts (``data.eval_prompt_file``, else the ShapeWorld test split):
ODE sampling (optional CFG), reward, per-category accuracy, reasoning accuracy, and a sample
grid. Also the ``eval`` and ``sample`` modes."""
from __future__ import annotations

import collections
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from unigrpo_jax import distributed, paths
from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.data.encoding import decode_reasoning, encode_prompts
from unigrpo_jax.data.pipeline import PromptFileSource, ShapeWorldSource
from unigrpo_jax.data.tokenizer import Tokenizer
from unigrpo_jax import parallel
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.models.autoencoder import to_uint8
from unigrpo_jax.data import geneval
from unigrpo_jax.rewards import registry
from unigrpo_jax.rewards import shapeworld as sw_reward
from unigrpo_jax.rollout.program import make_eval_sampler
from unigrpo_jax.trainers import build, grid, scoring
from unigrpo_jax.trainers.metrics import MetricsLogger


def eval_source(config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None):
  """Every line of ``data.eval_prompt_file`` (prompt-file format, validated), else the first
  ``data.eval_tasks`` prompts of the ShapeWorld TEST split."""
  if config.data.eval_prompt_file:
    return PromptFileSource(config.data.eval_prompt_file, tokenizer,
                            free_text=build.is_bagel_dir(config.init_checkpoint))
  return ShapeWorldSource("test", config.data.eval_tasks)


def eval_records(config: ml_collections.ConfigDict,
                 tokenizer: Tokenizer | None = None) -> list[dict]:
  """The evaluation records (see ``eval_source``), in order."""
  source = eval_source(config, tokenizer)
  return [source[i] for i in range(len(source))]


class Evaluator:
  """Compiles the eval sampler once; ``__call__(params, key)`` scores the fixed eval prompts.

  Prompts with ShapeWorld specs get the ShapeWorld metrics (reward, strict, reasoning and
  per-category accuracy). Prompts without specs (free text, GenEval's metadata lines: the
  real-model path) are scored by ``reward_fn``, the run's own reward, with their prompts and
  metadata; see ``free_text_metrics`` for what is reported per category. With several processes
  every process samples the eval batch, each image is scored once, by the process that owns its
  row, and every process gets every row's scores (``score_by_owner``): the same metrics."""

  def __init__(self, graphdef, rollout_cfg, autoencoder, tokenizer: Tokenizer,
               config: ml_collections.ConfigDict, records: Sequence[dict], reward_fn=None,
               mesh=None):
    ev = config.eval
    self.tokenizer, self.records, self.batch = tokenizer, list(records), ev.batch_size
    self.grid_count = ev.grid_rows * 8
    self.sampler = make_eval_sampler(graphdef, rollout_cfg, autoencoder, num_steps=ev.num_steps,
                                     cfg_scale=ev.cfg_scale, greedy_text=ev.greedy, mesh=mesh)
    self.tokens, self.mask = encode_prompts(tokenizer, [r["prompt"] for r in self.records],
                                            config.data.max_prompt_len)
    self.specs = [sw.Spec.from_json(r["spec"]) if r["spec"] else None for r in self.records]
    self.reward_fn = reward_fn
    if None in self.specs and reward_fn is None:
      raise ValueError("evaluation prompts without ShapeWorld specs need the run's reward_fn")

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
    if None in self.specs:   # free text: the run's reward, no ShapeWorld metrics
      prompts = [r["prompt"] for r in self.records]
      metadata = [r.get("metadata", "") for r in self.records]
      wanted = registry.accepted_kwargs(self.reward_fn)

      def reward_rows(lo, hi):
        given = {"prompts": prompts[lo:hi], "metadata": metadata[lo:hi]}
        return self.reward_fn(images[lo:hi], self.specs[lo:hi], reasoning[lo:hi],
                              **{k: given[k] for k in wanted})

      out = score_by_owner(reward_rows, n, "eval_reward")
      metrics, reward = free_text_metrics(self.records, out)
      k = min(self.grid_count, n)
      return metrics, grid.sample_grid(images[:k], prompts[:k], reasoning[:k], reward[:k])

    def shapeworld_rows(lo, hi):
      parsed = [sw.parse_reasoning(t) for t in reasoning[lo:hi]]
      return {**sw_reward.score(images[lo:hi], self.specs[lo:hi]),
              "reasoning_ok": np.array([p == s for p, s in zip(parsed, self.specs[lo:hi])],
                                       np.float32)}

    scores = score_by_owner(shapeworld_rows, n, "eval_shapeworld")
    metrics = {"eval/reward_mean": float(np.mean(scores["score"])),
               "eval/strict_accuracy": float(np.mean(scores["strict"])),
               "eval/reasoning_accuracy": float(np.mean(scores["reasoning_ok"]))}
    metrics.update(reward_given_trace(scores["score"], scores["reasoning_ok"]))
    by_cat = collections.defaultdict(list)
    for i, r in enumerate(self.records):
      by_cat[r["category"]].append(i)
    for cat, idx in sorted(by_cat.items()):
      metrics[f"eval/acc/{cat}"] = float(np.mean(scores["strict"][idx]))
      metrics[f"eval/score/{cat}"] = float(np.mean(scores["score"][idx]))
    # The same strict accuracy in GenEval's six categories (ShapeWorld's mapped onto them).
    metrics.update(geneval.per_category_accuracy(
        [geneval.shapeworld_geneval_category(r["category"], s)
         for r, s in zip(self.records, self.specs)], scores["strict"]))
    k = min(self.grid_count, n)
    picture = grid.sample_grid(images[:k], [r["prompt"] for r in self.records[:k]],
                               reasoning[:k], scores["score"][:k])
    return metrics, picture


def reward_given_trace(score: np.ndarray, reasoning_ok: np.ndarray) -> dict:
  """Mean reward of the rows whose sampled trace names the prompt's scene, and of the rest.

  score, reasoning_ok: [N]. What a right trace is worth to the image: a text policy that makes
  every trace right raises the reward by at most (1 - reasoning accuracy) times the gap between
  the two. NaN for a side with no rows."""
  ok = np.asarray(reasoning_ok) > 0.5
  score = np.asarray(score, np.float64)
  return {f"eval/reward_given_trace_{name}": float(score[rows].mean()) if rows.any() else
          float("nan") for name, rows in (("right", ok), ("wrong", ~ok))}


def owned_rows(num_rows: int, process_count: int | None = None,
               process_index: int | None = None) -> tuple[int, int]:
  """[start, stop) of the evaluation rows that process ``process_index`` (default: this one)
  scores: the p-th of ``process_count`` contiguous blocks whose sizes differ by at most one
  (every row has exactly one owner; a process may own none when there are fewer rows)."""
  n = jax.process_count() if process_count is None else process_count
  p = jax.process_index() if process_index is None else process_index
  return p * num_rows // n, (p + 1) * num_rows // n


def score_by_owner(score_rows: Callable[[int, int], dict], num_rows: int, name: str) -> dict:
  """Scores each of ``num_rows`` rows once, on the process that owns it (``owned_rows``), and
  gives every process every row's results in row order.

  ``score_rows(lo, hi)`` -> {key: [hi - lo] array} of rows [lo, hi) (not called for an empty
  block). A remote reward thus sees each image once over all processes, not once per process.
  With several processes a failure is shared: every process raises ``scoring.RewardError``
  naming the failing process (none waits for a peer that stopped).
  """
  lo, hi = owned_rows(num_rows)
  multi = distributed.is_multiprocess()
  local = {}
  if hi > lo:
    try:
      local = {k: _wire(v) for k, v in score_rows(lo, hi).items() if np.ndim(v)}  # per row
    except Exception as e:  # pylint: disable=broad-except
      if not multi:
        raise
      local = {"__error__": f"process {jax.process_index()}: {type(e).__name__}: {e}"}
  shared = distributed.exchange(name, local) if multi else [local]
  for block in shared:
    if "__error__" in block:
      raise scoring.RewardError(f"evaluation scoring failed on {block['__error__']}")
  blocks = [b for b in shared if b]
  if not blocks:
    return {}
  return {k: np.concatenate([_unwire(b[k]) for b in blocks]) for k in blocks[0]}


def _wire(value) -> dict:
  """A per-row array as JSON (dtype kept for numbers) for ``distributed.exchange``."""
  a = np.asarray(value)
  return {"dtype": a.dtype.str if a.dtype.kind in "biuf" else None, "rows": a.tolist()}


def _unwire(w: dict) -> np.ndarray:
  return np.asarray(w["rows"], None if w["dtype"] is None else np.dtype(w["dtype"]))


def free_text_metrics(records: Sequence[dict], reward_out: dict) -> tuple[dict, np.ndarray]:
  """Metrics of prompts without ShapeWorld specs, from the run's reward outputs.

  Args:
    records: the evaluation records (their ``category``: GenEval's tag, a prompt file's
      "category", else "custom").
    reward_out: the reward fn's outputs, float [n] arrays with "reward" and each component's
      details as "<name>/<key>".
  Returns:
    (metrics, reward [n] float32). ``eval/reward_mean``; ``eval/reward/<category>`` (mean reward
    per category, "overall" = mean of the category means); and, when a component reports
    per-image correctness (a "<name>/correct" detail, as GenEval's detector server does),
    ``eval/geneval/<category>`` accuracy with GenEval's overall score.
  """
  reward = np.asarray(reward_out["reward"], np.float32)
  if reward.shape != (len(records),):
    raise ValueError(f"the reward returned shape {reward.shape} for {len(records)} eval prompts")
  categories = [r.get("category") or "custom" for r in records]
  metrics = {"eval/reward_mean": float(np.mean(reward))}
  metrics.update(geneval.per_category_accuracy(categories, reward, prefix="eval/reward/"))
  correct = sorted(k for k in reward_out if k.endswith("/correct"))
  if correct:  # the first component that reports correctness (sorted: deterministic)
    metrics.update(geneval.per_category_accuracy(
        categories, np.asarray(reward_out[correct[0]], np.float32)))
  return metrics, reward


def build_evaluator(config, graphdef, model_cfg, tokenizer: Tokenizer,
                    records: Sequence[dict] | None = None, *, autoencoder=None,
                    reward_fn=None, mesh=None) -> Evaluator:
  """records: the evaluation records (``eval_records(config)`` when None); autoencoder:
  ``build.autoencoder_for`` when None; reward_fn: scores free-text prompts (``config.rewards``
  when None and some prompt has no spec)."""
  from unigrpo_jax.trainers.build import rollout_config  # one mapping config -> RolloutConfig
  records = eval_records(config, tokenizer) if records is None else records
  if autoencoder is None:
    autoencoder = build.autoencoder_for(config, model_cfg)
  if reward_fn is None and any(not r["spec"] for r in records):
    reward_fn = build.reward_fn_for(config)
  return Evaluator(graphdef, rollout_config(config, tokenizer), autoencoder, tokenizer, config,
                   records, reward_fn, mesh)


def run_eval(config: ml_collections.ConfigDict, workdir: str, save_only_samples: bool = False):
  """Evaluates ``config.init_checkpoint`` (or a fresh model) on the evaluation prompts."""
  tokenizer = build.tokenizer_for(config)  # a BAGEL directory brings its tokenizer.json
  model_cfg, params = build.model_and_params(config, tokenizer)
  autoencoder = build.autoencoder_for(config, model_cfg)  # before loading: errors first
  mesh = None
  if build.is_bagel_dir(config.init_checkpoint) or model_cfg.lora_rank:
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    graphdef, params = build.build_params(config, model_cfg, params, mesh)
  else:
    graphdef, fresh = nnx.split(UnifiedModel(model_cfg, nnx.Rngs(config.seed)), nnx.Param)
    params = fresh if params is None else params
  evaluator = build_evaluator(config, graphdef, model_cfg, tokenizer, autoencoder=autoencoder,
                              mesh=mesh)
  metrics, picture = evaluator(params, jax.random.key(config.seed))
  path = paths.join(workdir, "samples_eval.png")
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
