"""Where does a group's reward spread come from: the sampled trace (text) or the image sampling?

Runs the trainer's own rollout (same builders, same config) from a checkpoint on training
prompts, scores it with the ShapeWorld reward and reports, per sampling temperature:
- the spread decomposition of ``rl/diagnostics.spread_sources`` (between traces vs within rows
  that share a trace, i.e. image sampling only);
- how often a group's images pass the strict check: all, some or none (only "some" groups give
  the image policy a signal);
- which clause the failing images miss (count, colour, position), among rows whose reasoning
  names the right scene, so a failure there is the image policy's.

  python benchmarks/reward_spread.py --batches=8 --temperatures=1.0,0.05 \\
      --out=benchmarks/results/reward_spread.md [--config.rollout.group_initial_noise=True]
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from unigrpo_jax import config_validation
from unigrpo_jax.data.encoding import decode_reasoning, encode_prompts
from unigrpo_jax.data.pipeline import ShapeWorldSource
from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.models.autoencoder import to_uint8
from unigrpo_jax.rewards import shapeworld as sw_reward
from unigrpo_jax.rl import diagnostics
from unigrpo_jax.trainers import build


def measure(config, batches: int, seed: int) -> dict:
  """Rollouts of ``batches`` prompt batches -> the spread report (a flat dict of floats)."""
  tokenizer, params, rcfg, rollout = build.standalone_rollout(config)
  source = ShapeWorldSource("train", config.data.train_tasks)
  g, p = rcfg.group_size, config.rollout.prompts_per_batch
  rng = np.random.default_rng(seed)
  rewards, strict, trace_ids, right_trace, clauses = [], [], [], [], []
  for b in range(batches):
    records = [source[int(i)] for i in rng.choice(len(source), p, replace=False)]
    tokens, mask = encode_prompts(tokenizer, [r["prompt"] for r in records],
                                  config.data.max_prompt_len)
    traj = rollout(params, tokens, mask, jax.random.fold_in(jax.random.key(seed), b))
    specs = [sw.Spec.from_json(r["spec"]) for r in records for _ in range(g)]
    texts = decode_reasoning(tokenizer, np.asarray(traj.reasoning_tokens),
                             np.asarray(traj.reasoning_mask))
    out = sw_reward.score(np.asarray(to_uint8(traj.images)), specs)
    rewards.append(out["score"])
    strict.append(out["strict"])
    ids = diagnostics.trace_ids_from_tokens(np.asarray(traj.reasoning_tokens),
                                            np.asarray(traj.reasoning_mask))
    trace_ids.append(ids + b * len(ids))  # ids unique per batch
    right_trace.append(np.array([sw.parse_reasoning(t) == s for t, s in zip(texts, specs)]))
    clauses.append(np.stack([out["count"], out["color"], out["position"]], 1))
  rewards, strict = np.concatenate(rewards), np.concatenate(strict)
  right_trace, clauses = np.concatenate(right_trace), np.concatenate(clauses)
  report = dict(diagnostics.spread_sources(rewards, np.concatenate(trace_ids), g))
  groups = strict.reshape(-1, g).mean(1)
  report.update({
      "rows": float(len(rewards)), "reward_mean": float(rewards.mean()),
      "strict_mean": float(strict.mean()), "right_trace_frac": float(right_trace.mean()),
      "groups_all_pass": float(np.mean(groups == 1)), "groups_none_pass": float(np.mean(groups == 0)),
      "groups_mixed": float(np.mean((groups > 0) & (groups < 1))),
  })
  # The image policy's own failures: the trace names the right scene, the image is not strict.
  own = right_trace & (strict < 1)
  report["image_fail_given_right_trace"] = float(own.sum() / max(right_trace.sum(), 1))
  for k, name in enumerate(("count", "color", "position")):
    report[f"own_fail_misses_{name}"] = float(np.mean(clauses[own, k] < 1)) if own.any() else 0.0
  # Per group of rows with the right trace: does the image policy sometimes pass, or never?
  ok = right_trace.reshape(-1, g)
  st = strict.reshape(-1, g)
  rates = [st[i][ok[i]].mean() for i in range(len(st)) if ok[i].sum() >= 2]
  rates = np.asarray(rates)
  report["right_trace_groups"] = float(len(rates))
  report["right_trace_groups_image_always"] = float(np.mean(rates == 1)) if len(rates) else 0.0
  report["right_trace_groups_image_never"] = float(np.mean(rates == 0)) if len(rates) else 0.0
  report["right_trace_groups_image_mixed"] = float(np.mean((rates > 0) & (rates < 1))) \
      if len(rates) else 0.0
  return report


_CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes_cpu.py",
                                         "Config file; override keys with --config.key=value.")
_BATCHES = flags.DEFINE_integer("batches", 8, "Prompt batches per temperature.")
_TEMPERATURES = flags.DEFINE_list("temperatures", ["1.0", "0.05"], "rollout.temperature values.")
_SEED = flags.DEFINE_integer("seed", 0, "Prompt sampling and rollout seed.")
_OUT = flags.DEFINE_string("out", "", "Write the markdown table here (and a .json beside it).")


def main(argv):
  del argv
  rows = {}
  for temp in [float(t) for t in _TEMPERATURES.value]:
    t0 = time.time()
    config = copy.deepcopy(_CONFIG.value)
    config.rollout.temperature = temp
    try:  # the trainer's checks, before anything compiles
      config_validation.validate(config)
    except config_validation.ConfigError as e:
      sys.exit(f"error: bad config: {e}")
    rows[temp] = measure(config, _BATCHES.value, _SEED.value)
    print(f"temperature {temp}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
  keys = list(next(iter(rows.values())))
  lines = ["| metric | " + " | ".join(f"T={t:g}" for t in rows) + " |",
           "|---|" + "---|" * len(rows)]
  lines += [f"| {k} | " + " | ".join(f"{rows[t][k]:.3f}" for t in rows) + " |" for k in keys]
  table = "\n".join(lines)
  print(table)
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      f.write(f"`python benchmarks/reward_spread.py {' '.join(sys.argv[1:])}`\n\n{table}\n")
    with open(os.path.splitext(_OUT.value)[0] + ".json", "w") as f:
      json.dump({str(t): r for t, r in rows.items()}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
