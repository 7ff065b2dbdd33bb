"""The UniGRPO loop: prompts -> rollout -> rewards -> group advantages -> PPO train step.

``run_train`` reads as one call per stage: build everything from the config (``build.py``: every
input is checked before the first compile), resume, then per step ``_rollout`` ->
``_score`` (``scoring.py``) -> advantages -> ``_update`` -> ``_step_metrics`` -> evaluate /
checkpoint. The loop is resumable: re-running the same command on the same workdir continues
from the last checkpoint and reproduces an uninterrupted run exactly (all randomness is
``fold_in(seed, step)``; the data iterator state is checkpointed).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from unigrpo_jax import checkpointing, distributed, paths
from unigrpo_jax.data import geneval
from unigrpo_jax.data.encoding import decode_reasoning, encode_prompts
from unigrpo_jax.data.pipeline import make_prompt_loader
from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.models.autoencoder import to_uint8
from unigrpo_jax.rl import advantages as adv_lib
from unigrpo_jax.rl import diagnostics
from unigrpo_jax.models.unified import lora
from unigrpo_jax.rl.train_step import TrainState, init_train_state, split_params
from unigrpo_jax.trainers import build, grid, scoring
from unigrpo_jax.trainers.hacking_monitor import HackingMonitor
from unigrpo_jax.trainers.evaluate import build_evaluator, eval_records
from unigrpo_jax.trainers.metrics import (CompileCounter, MetricsLogger, Progress, eval_summary,
                                          restart_metrics)


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with non-finite loss or gradients."""


@dataclasses.dataclass
class _Run:
  """What the loop needs, built (and validated) from the config before the first step."""
  config: ml_collections.ConfigDict
  tokenizer: object
  reward_fn: object
  source: object
  programs: build.Programs
  evaluator: object
  train_state: object
  ref_params: object
  group_size: int
  row_lo: int  # this process loads, decodes and scores rollout rows [row_lo, row_hi)
  row_hi: int


def _build(config: ml_collections.ConfigDict) -> _Run:
  """Inputs first (each fails with a message before any compile), then the model, its frozen
  reference and the optimiser state (created in their shardings), then the compiled programs."""
  if config.model.get("require_weights", False) and not config.init_checkpoint:
    raise ValueError(f"config.init_checkpoint is empty, and config.model.preset="
                     f"{config.model.preset!r} is a real model (model.require_weights): set "
                     "--config.init_checkpoint=/path/to/BAGEL-7B-MoT (training a random "
                     "7B model is never what a pod run wants; the AOT planner needs no weights)")
  tokenizer = build.tokenizer_for(config)  # a BAGEL directory brings its tokenizer.json
  reward_fn = build.reward_fn_for(config)  # loads in-process reward models (CLIP) now
  held_out = eval_records(config, tokenizer)
  source = build.prompt_source(config, tokenizer, held_out)
  build.check_reward_inputs(config, source)
  rcfg, ocfg = build.rollout_config(config, tokenizer), build.objective_config(config, tokenizer)
  optcfg = build.optim_config(config)
  model_cfg, init_params = build.model_and_params(config, tokenizer)
  autoencoder = build.autoencoder_for(config, model_cfg)  # a BAGEL dir's FLUX VAE, or pixels
  if rcfg.vocab_limit > model_cfg.vocab_size:
    raise ValueError(f"config.rollout.vocab_limit={rcfg.vocab_limit} exceeds the model's "
                     f"{model_cfg.vocab_size}-row embedding table")
  mesh, rules = build.mesh_and_rules(config)
  batch_rows = config.rollout.prompts_per_batch * rcfg.group_size
  if config.rollout.prompts_per_batch % jax.process_count():
    raise ValueError(f"config.rollout.prompts_per_batch={config.rollout.prompts_per_batch} "
                     f"cannot be split evenly over {jax.process_count()} processes")
  row_lo, row_hi = distributed.process_block(batch_rows, "the rollout batch")
  same = json.loads(config.to_json_best_effort())
  same.get("distributed", {}).pop("process_id", None)
  distributed.check_same_everywhere("the config", same)

  graphdef, params = build.build_params(config, model_cfg, init_params, mesh, rules)
  # LoRA: the frozen base inside the train state is the reference (no copy).
  ref_params = (jax.tree.map(jnp.copy, params)
                if ocfg.needs_reference and not model_cfg.lora_rank else None)
  train_state = init_train_state(params, ocfg, optcfg, mesh, rules)
  del params
  programs = build.build_programs(config, graphdef, train_state.params, model_cfg, mesh, rules,
                                  rcfg, ocfg, optcfg, autoencoder=autoencoder)
  evaluator = build_evaluator(config, graphdef, model_cfg, tokenizer, held_out,
                              autoencoder=autoencoder, reward_fn=reward_fn, mesh=mesh)
  return _Run(config, tokenizer, reward_fn, source, programs, evaluator, train_state,
              ref_params, rcfg.group_size, row_lo, row_hi)


def _flat(tree) -> dict:
  """Checkpoint layout: leaves by index (restored into the abstract tree's structure)."""
  return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _unflat(flat: dict, like):
  return jax.tree.unflatten(jax.tree.structure(like), [flat[k] for k in sorted(flat, key=int)])


def _saved_state(run: _Run) -> dict:
  """What a run checkpoint holds: the train state and the reference; with LoRA only the
  adapters, their optimizer state and the step (megabytes: the frozen base is re-read from
  ``init_checkpoint``, whose path the host record keeps)."""
  ts = run.train_state
  if lora.has_adapters(ts.params):
    return {"adapters": split_params(ts.params)[0], "opt_state": ts.opt_state, "step": ts.step}
  return {"train_state": ts, "ref_params": run.ref_params}


def _load_saved_state(run: _Run, restored: dict) -> None:
  if "adapters" in restored:
    base = split_params(run.train_state.params)[1]
    run.train_state = TrainState(params=nnx.merge_state(restored["adapters"], base),
                                 opt_state=restored["opt_state"], step=restored["step"])
  else:
    run.train_state, run.ref_params = restored["train_state"], restored["ref_params"]


def _check_same_base(run: _Run, host: dict, where: str) -> None:
  """LoRA adapters only make sense over the base they were trained on."""
  if not lora.has_adapters(run.train_state.params):
    return
  saved, ours = host.get("base_checkpoint"), run.config.init_checkpoint
  if saved != ours:
    raise ValueError(f"checkpoint {where} holds LoRA adapters trained on base {saved!r}, but "
                     f"config.init_checkpoint is {ours!r}: resume with the same base (or use a "
                     "new workdir)")


def _resume(run: _Run, ckpt: checkpointing.RunCheckpointer, loader_iter, workdir: str) -> dict:
  """Restores the latest checkpoint into ``run`` and the loader; -> the host counters
  (with ``hack_reference``, the monitor's reference colour histogram, when one was saved)
  (``step``, ``nonfinite_total``, ``nonfinite_in_row``), all 0 for a fresh run."""
  counters = {"step": 0, "nonfinite_total": 0, "nonfinite_in_row": 0}
  latest = ckpt.latest_step()
  if latest is None:
    # An earlier attempt that died before its first checkpoint may have written steps 0..k:
    # this run rewrites them, so they leave the live metrics (never a step twice).
    _restart_metrics(workdir, None)
    return counters
  saved_tree = _saved_state(run)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          saved_tree)
  host = ckpt.restore_host(latest)  # checked before any array is read
  _check_same_base(run, host, f"{ckpt.directory}/{latest}")
  flat, host = ckpt.restore(latest, _flat(abstract))
  _load_saved_state(run, _unflat(flat, saved_tree))
  n_proc = jax.process_count()
  if host.get("num_processes", 1) != n_proc:
    raise ValueError(f"checkpoint {ckpt.directory}/{latest} was written by "
                     f"{host.get('num_processes', 1)} processes and this run has {n_proc}: "
                     "resume with the same process count (each process's data position "
                     "is saved)")
  loader_iter.set_state(host["data_iter"][jax.process_index()])
  counters = {k: host[k] for k in counters}
  if "hack_reference" in host:  # so a resumed run measures drift from the same first batch
    counters["hack_reference"] = host["hack_reference"]
  distributed.main_print(f"resumed from {ckpt.directory} at step {counters['step']}")
  _restart_metrics(workdir, counters["step"])
  return counters


def _restart_metrics(workdir: str, last_step) -> None:
  """Process 0 drops the metrics an earlier attempt wrote after ``last_step`` (None: all)."""
  if distributed.is_main() and paths.isdir(workdir):
    line = restart_metrics(workdir, last_step)
    if line:
      print(line, flush=True)


def _rollout(run: _Run, batch: dict, key):
  """One rollout over the whole (global) prompt batch -> (trajectory, this process's host rows:
  uint8 images [b, H, W, 3], reasoning texts, reasoning mask [b, T], truncated [b], reasoning
  tokens [b, T])."""
  tokens, mask = encode_prompts(run.tokenizer, list(batch["prompt"]),
                                run.config.data.max_prompt_len)
  # Every process passes the whole (tiny) prompt batch: the rollout is one global program.
  tokens = distributed.allgather_rows(tokens, "prompt_tokens")
  mask = distributed.allgather_rows(mask, "prompt_mask")
  tokens, mask = jax.device_put((tokens, mask), run.programs.prompt_sharding)
  traj = run.programs.rollout(run.train_state.params, tokens, mask, key)
  # Only this process's rows come to the host (no gathering of all images to one host).
  images, reasoning_tokens, reasoning_mask, truncated = [
      distributed.local_rows(a, run.row_lo, run.row_hi)
      for a in (traj.images, traj.reasoning_tokens, traj.reasoning_mask, traj.truncated)]
  reasoning = decode_reasoning(run.tokenizer, reasoning_tokens, reasoning_mask)
  return traj, (np.asarray(to_uint8(images)), reasoning, reasoning_mask, truncated,
                reasoning_tokens)


def _score(run: _Run, batch: dict, host_rows) -> tuple[dict, list]:
  """Rewards of this process's rows, shared with every process -> (per-row stats of the whole
  batch in global row order, every row's prompt category)."""
  images, reasoning, reasoning_mask, truncated, reasoning_tokens = host_rows
  g = run.group_size
  prompts = list(batch["prompt"])
  specs = [sw.Spec.from_json(s) if s else None for s in batch["spec"]]  # None: free text
  metadata = batch.get("metadata", [""] * len(prompts))
  row_specs = [s for s in specs for _ in range(g)]
  components = []  # "<name>/reward" of each reward of a weighted sum (logged per component)
  try:
    rewards = scoring.score_rollout(run.reward_fn, images, row_specs, reasoning,
                                    [p for p in prompts for _ in range(g)],
                                    [m for m in metadata for _ in range(g)], run.row_lo)
    reward = np.asarray(rewards["reward"], np.float32)
    components = sorted(k for k in rewards if k.endswith("/reward"))
    components = components if len(components) > 1 else []
    # Reasoning accuracy only where there is a scene to match (NaN for free-text rows).
    reasoning_ok = [np.nan if s is None else float(sw.parse_reasoning(t) == s)
                    for t, s in zip(reasoning, row_specs)]
    local = np.stack([
        reward, np.asarray(rewards.get("shapeworld/strict", reward), np.float32),
        np.asarray(reasoning_ok, np.float32),
        np.sum(reasoning_mask, axis=1).astype(np.float32), np.asarray(truncated, np.float32),
        # identical traces share an id (offset by the block start: unique across processes)
        (diagnostics.trace_ids_from_tokens(reasoning_tokens, reasoning_mask)
         + run.row_lo).astype(np.float32),
        *[np.asarray(rewards[k], np.float32) for k in components]], 1)
  except scoring.RewardError as e:
    local = str(e)  # every process learns of it and stops (nobody waits for a dead peer)
  shared = distributed.exchange("row_stats", local)
  for item in shared:
    if isinstance(item, str):
      raise scoring.RewardError(item)
  stats = dict(zip(scoring.ROW_STATS + tuple(components), np.concatenate(shared, axis=0).T))
  # Every row's prompt category, in global row order (process blocks are in process order).
  categories = [c for block in distributed.exchange("categories", list(batch["category"]))
                for c in block for _ in range(g)]
  return stats, categories


def _update(run: _Run, traj, advantages, key) -> dict:
  """One PPO train step (epochs x minibatches inside one jit) -> host metrics."""
  traj, advantages = jax.device_put((traj, np.asarray(advantages)), run.programs.batch_sharding)
  run.train_state, m = run.programs.train_step(run.train_state, run.ref_params, traj,
                                               advantages, key)
  # Non-finite gradients never reach the params: the optimizer skips such updates
  # (optax.apply_if_finite inside the step); the loop counts and bounds them.
  return {k: float(v) for k, v in jax.device_get(m).items()}


def _step_metrics(m: dict, stats: dict, categories: list, group_size: int) -> dict:
  """The train/ metrics of one step from the step's loss metrics and per-row stats."""
  reward = stats["reward"]
  scored = stats["reasoning_ok"][np.isfinite(stats["reasoning_ok"])]
  metrics = {f"train/{k}": v for k, v in m.items()}
  metrics["train/loss"] = m["loss/total"]
  # Where the groups' reward spread comes from: the traces (text) or the image sampling.
  spread = diagnostics.spread_sources(reward, stats["trace_id"].astype(np.int64), group_size)
  metrics.update({f"train/spread/{k}": v for k, v in spread.items()})
  metrics.update({
      "train/reward_mean": float(reward.mean()), "train/reward_std": float(reward.std()),
      "train/strict_mean": float(np.mean(stats["strict"])),
      **({"train/reasoning_accuracy": float(np.mean(scored))} if scored.size else {}),
      "train/zero_variance_groups": float(adv_lib.zero_variance_fraction(jnp.asarray(reward),
                                                                         group_size)),
      "train/reasoning_len": float(np.mean(stats["reasoning_len"])),
      "train/truncated_frac": float(np.mean(stats["truncated"])),
  })
  # Each reward of a weighted sum, unweighted (e.g. ShapeWorld and JPEG size of a hackable sum).
  metrics.update({f"train/reward_component/{k[:-len('/reward')]}": float(np.mean(v))
                  for k, v in stats.items() if k.endswith("/reward")})
  # Per prompt category (ShapeWorld's, GenEval's tags, a prompt file's "category").
  metrics.update(geneval.per_category_accuracy(categories, reward, prefix="train/reward/"))
  return metrics


def preemption_line(step: int, latest: Optional[int], saved_now: bool, directory: str) -> str:
  """The console line of a SIGTERM that stopped ``step`` before its update: what was saved
  (``latest``: the newest checkpoint now, None: none) and where a rerun starts."""
  head = f"SIGTERM: stopped at step {step} before its update"
  if latest is None:
    return f"{head}; nothing was saved; a rerun starts from step 0"
  if saved_now:
    return f"{head}; saved step {latest} to {directory}; a rerun resumes from step {latest}"
  return (f"{head}; nothing new was saved (the checkpoint of step {latest} is in {directory}); "
          f"a rerun resumes from step {latest}")


def run_train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs UniGRPO; returns the last metrics row written."""
  run = _build(config)
  paths.makedirs(workdir)
  ckpt = checkpointing.RunCheckpointer(workdir, keep=config.keep_checkpoints,
                                       async_save=config.async_checkpointing)
  loader_iter = iter(make_prompt_loader(run.source, config.rollout.prompts_per_batch,
                                        config.seed, drop_remainder=True,
                                        shard_index=jax.process_index(),
                                        shard_count=jax.process_count()))
  counters = _resume(run, ckpt, loader_iter, workdir)
  start_step = counters["step"]
  if start_step >= config.total_steps:
    distributed.main_print(f"nothing to do: step {start_step} >= total_steps "
                           f"{config.total_steps}")
    ckpt.close()
    return {}

  logger = MetricsLogger(workdir, tensorboard=config.tensorboard)
  compiles = CompileCounter.install()
  progress = Progress(config.total_steps, start_step, every=config.log_every)
  preemption = distributed.PreemptionWatch()
  base_key = jax.random.key(config.seed)
  monitor = HackingMonitor(counters.pop("hack_reference", None))  # reference: the first step's

  def save(step: int, data_iter_state=None) -> None:
    """Called by every process: orbax writes each process's shards; the JSON item (written by
    process 0) holds every process's data-iterator position."""
    state = _saved_state(run)
    distributed.assert_global(state, "saved state ")
    iters = distributed.exchange("data_iter", data_iter_state or loader_iter.get_state())
    ckpt.save(step, _flat(state), {"data_iter": iters, "num_processes": jax.process_count(),
                                   **counters, "step": step,
                                   "base_checkpoint": run.config.init_checkpoint,
                                   "hack_reference": monitor.reference_list()}, force=True)

  def evaluate(step: int) -> dict:
    t0 = time.time()
    metrics, picture = run.evaluator(run.train_state.params,
                                     jax.random.fold_in(base_key, 2**31 - 1))  # fixed eval noise
    metrics["perf/eval_time_s"] = time.time() - t0
    if distributed.is_main():
      grid.save_png(paths.join(workdir, f"samples_step_{step:06d}.png"), picture)
    logger.write_images(step, {"samples": picture})
    if jax.process_index() == 0:
      print(eval_summary(step, metrics), flush=True)
    warning = monitor.observe_eval(step, metrics["eval/strict_accuracy"]) \
        if "eval/strict_accuracy" in metrics else None
    if warning:
      distributed.main_print(f"WARNING: {warning}")
    return metrics

  last = {}
  try:
    if start_step == 0:
      last = {"step": 0, **evaluate(0), "perf/num_compiles": compiles.count}
      logger.write(0, {k: v for k, v in last.items() if k != "step"})
    stopped_at = None  # a step that a SIGTERM stopped between its rollout and its update
    for step in range(start_step + 1, config.total_steps + 1):
      t0 = time.time()
      iter_before = loader_iter.get_state()
      batch = next(loader_iter)  # this process's prompts only
      key = jax.random.fold_in(base_key, step)
      traj, host_rows = _rollout(run, batch, jax.random.fold_in(key, 0))
      t_rollout = time.time() - t0
      stats, categories = _score(run, batch, host_rows)
      advantages = adv_lib.get_advantage_fn(config.advantage.estimator)(
          jnp.asarray(stats["reward"]), run.group_size, eps=config.advantage.eps,
          clip=config.advantage.clip)
      if preemption.reached(2 * step):  # long rollouts: also check between rollout and update
        stopped_at = step
        break
      t1 = time.time()
      m = _update(run, traj, advantages, jax.random.fold_in(key, 1))
      finite = bool(np.isfinite(m["loss/total"]) and np.isfinite(m["grad_norm/total"]))
      counters["nonfinite_in_row"] = 0 if finite else counters["nonfinite_in_row"] + 1
      counters["nonfinite_total"] += 0 if finite else 1
      if counters["nonfinite_in_row"] >= config.max_nonfinite_in_row:
        raise NonFiniteError(f"{counters['nonfinite_in_row']} consecutive steps with non-finite "
                             f"loss or gradients at step {step} (loss {m['loss/total']}, grad "
                             f"norm {m['grad_norm/total']}); stopping. Lower the learning rates "
                             "or check the rewards.")
      metrics = _step_metrics(m, stats, categories, run.group_size)
      lo, hi = run.row_lo, run.row_hi  # the image statistics of this process's rows
      metrics.update(monitor.step_metrics(step, host_rows[0], stats["reward"][lo:hi],
                                          stats["strict"][lo:hi]))
      metrics.update({"train/nonfinite_skipped_total": float(counters["nonfinite_total"]),
                      "perf/rollout_time_s": t_rollout, "perf/train_time_s": time.time() - t1})
      if step % config.eval_every == 0 or step == config.total_steps:
        metrics.update(evaluate(step))
      metrics["perf/step_time_s"] = time.time() - t0
      metrics["perf/num_compiles"] = compiles.count
      logger.write(step, metrics)
      last = {"step": step, **metrics}
      progress.update(step, {"reward": metrics["train/reward_mean"],
                             "loss": metrics["train/loss"]})
      preempted = preemption.reached(2 * step + 1)  # the same answer on every process
      if step % config.checkpoint_every == 0 or step == config.total_steps or preempted:
        save(step)
      if preempted:
        distributed.main_print(f"SIGTERM: saved step {step} to {ckpt.directory}; a rerun "
                               f"resumes from step {step}; exiting")
        break
    if stopped_at is not None:
      done = stopped_at - 1  # the last step whose update ran (start_step: none in this run)
      saved_now = done > start_step and done % config.checkpoint_every != 0
      if saved_now:
        save(done, iter_before)  # step - 1's state: this step's batch is read again on resume
      ckpt.wait()
      distributed.main_print(preemption_line(stopped_at, ckpt.latest_step(), saved_now,
                                             ckpt.directory))
    distributed.barrier("end of run")
  finally:
    preemption.restore()
    logger.close()
    ckpt.close()
  return last
