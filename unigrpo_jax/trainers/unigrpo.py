"""The UniGRPO loop: prompts -> rollout -> rewards -> group advantages -> PPO train step.

Everything that can be wrong with the inputs (config, prompt file, reward names, checkpoint) is
checked before the first compile. The loop is resumable: re-running the same command on the same
workdir continues from the last checkpoint and reproduces an uninterrupted run exactly (all
randomness is ``fold_in(seed, step)``; the data iterator state is checkpointed).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unigrpo_jax import checkpointing, distributed, parallel
from unigrpo_jax.data import shapeworld as sw
from unigrpo_jax.data.encoding import decode_reasoning, encode_prompts
from unigrpo_jax.data.pipeline import (PromptFileSource, ShapeWorldSource, make_prompt_loader,
                                       normalize_prompt)
from unigrpo_jax.data.tokenizer import Tokenizer
from unigrpo_jax.models.image import to_uint8
from unigrpo_jax.rewards import geneval, registry, remote
from unigrpo_jax.rl import advantages as adv_lib
from unigrpo_jax.rl.train_step import (ObjectiveConfig, OptimConfig, init_train_state,
                                       make_train_step)
from unigrpo_jax.sampling.rollout import RolloutConfig, make_rollout
from unigrpo_jax.trainers import grid, setup
from unigrpo_jax.trainers.evaluate import build_evaluator, eval_records
from unigrpo_jax.trainers.metrics import (CompileCounter, MetricsLogger, Progress,
                                          eval_summary, truncate_metrics)


class RewardError(RuntimeError):
  """A reward function raised: the run stops (a silent 0 would poison the advantages)."""


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with non-finite loss or gradients."""


# ------------------------------------------------------------------ config -> static configs
def text_distribution(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> dict:
  """The text sampling knobs, given to BOTH the rollout and the objective (the train step must
  rescore with the distribution that sampled). ``rollout.vocab_limit = -1`` means the
  tokenizer's vocabulary size (the embedding table may have more rows than it has words)."""
  r = config.rollout
  limit = tokenizer.vocab_size if r.vocab_limit == -1 else r.vocab_limit
  return dict(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, vocab_limit=limit)


def rollout_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> RolloutConfig:
  r = config.rollout
  return RolloutConfig(group_size=r.group_size, max_reasoning_len=r.max_reasoning_len,
                       stop_id=tokenizer.think_end_id, pad_id=tokenizer.pad_id,
                       vision_start_id=tokenizer.vision_start_id,
                       **text_distribution(config, tokenizer), num_steps=r.num_steps,
                       shift=r.shift, noise_level=r.noise_level,
                       window_range=tuple(r.window_range), window_size=r.window_size,
                       window_per_group=r.window_per_group, sde_type=r.sde_type,
                       decode_rows=r.get("decode_rows", 0))


def objective_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ObjectiveConfig:
  o = config.objective
  return ObjectiveConfig(
      vision_start_id=tokenizer.vision_start_id, pad_id=tokenizer.pad_id,
      text_clip=tuple(o.text_clip) if isinstance(o.text_clip, (tuple, list)) else o.text_clip,
      text_aggregation=o.text_aggregation, text_kl_coef=o.text_kl_coef,
      flow_clip=tuple(o.flow_clip) if isinstance(o.flow_clip, (tuple, list)) else o.flow_clip,
      ratio_norm=o.ratio_norm, reweight_by_dt=o.reweight_by_dt, flow_weight=o.flow_weight,
      regularizer=o.regularizer, reg_weight=o.reg_weight, stop_context_grad=o.stop_context_grad,
      train_text=o.train_text, train_image=o.train_image, **text_distribution(config, tokenizer),
      noise_level=config.rollout.noise_level, sde_type=config.rollout.sde_type)


def optim_config(config: ml_collections.ConfigDict) -> OptimConfig:
  o = config.optim
  return OptimConfig(lr_und=o.lr_und, lr_gen=o.lr_gen, weight_decay=o.weight_decay, b1=o.b1,
                     b2=o.b2, eps=o.eps, grad_clip=o.grad_clip, ppo_epochs=o.ppo_epochs,
                     num_minibatches=o.num_minibatches, grad_accum=o.grad_accum)


def prompt_source(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                  held_out: Sequence[dict] = ()):
  """The training prompts: a validated prompt file, or the ShapeWorld train split.

  Every training and evaluation prompt must fit ``data.max_prompt_len``, and no evaluation
  prompt may also be a training prompt (compared lowercased, whitespace-collapsed): raises
  ValueError naming the first evaluation prompt that is.
  """
  if config.data.prompt_file:
    source = PromptFileSource(config.data.prompt_file, tokenizer,
                              free_text=setup.is_bagel_dir(config.init_checkpoint))
  else:
    source = ShapeWorldSource("train", config.data.train_tasks)
  spec_rewards = sorted(registry.SPEC_REWARDS & set(config.rewards))
  train_prompts = set()
  for i in range(len(source)):  # every prompt must fit: fail now, not at step 900
    prompt = source[i]["prompt"]
    encode_prompts(tokenizer, [prompt], config.data.max_prompt_len)
    train_prompts.add(normalize_prompt(prompt))
    if spec_rewards and not source[i]["spec"]:
      raise ValueError(f"data.prompt_file {config.data.prompt_file}, line {i + 1}: prompt "
                       f"{prompt!r} has no ShapeWorld spec, which reward {spec_rewards[0]!r} "
                       f"needs")
  for r in held_out:
    encode_prompts(tokenizer, [r["prompt"]], config.data.max_prompt_len)
    if normalize_prompt(r["prompt"]) in train_prompts:
      where = (f"data.eval_prompt_file {config.data.eval_prompt_file}"
               if config.data.eval_prompt_file else "the ShapeWorld test split")
      train = (f"data.prompt_file {config.data.prompt_file}" if config.data.prompt_file
               else "the ShapeWorld train split")
      raise ValueError(f"evaluation prompt {r['prompt']!r} ({where}) is also a training prompt "
                       f"({train}): the evaluation set must be held out")
  return source


# ------------------------------------------------------------------ mesh and compiled programs
def mesh_and_rules(config: ml_collections.ConfigDict, devices=None):
  """The run's mesh over ``devices`` (default: all) and its logical rules (None: defaults).

  Fails before any compile when the mesh does not match the devices or the rollout batch
  ``prompts_per_batch * group_size`` is not a multiple of the mesh's batch parallelism.
  """
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
  rules = parallel.normalize_rules(tuple(config.logical_rules) + parallel.DEFAULT_RULES) \
      if config.logical_rules else None
  batch_rows = config.rollout.prompts_per_batch * config.rollout.group_size
  if batch_rows % parallel.batch_parallelism(mesh):
    raise ValueError(f"config.rollout: prompts_per_batch * group_size = {batch_rows} is not a "
                     f"multiple of the mesh's batch parallelism "
                     f"{parallel.batch_parallelism(mesh)} (mesh {dict(mesh.shape)})")
  return mesh, rules


@dataclasses.dataclass(frozen=True)
class Programs:
  """The two jitted programs of a UniGRPO step and where their batch inputs live.

  rollout(params, prompt_tokens, prompt_mask, key) -> Trajectory (rows split over the mesh);
  train_step(train_state, ref_params, trajectory, advantages, key) -> (train_state, metrics).
  prompt_sharding: of the [prompts_per_batch, P] prompt arrays; batch_sharding: of the
  trajectory and advantages.
  """
  rollout: Callable
  train_step: Callable
  prompt_sharding: jax.sharding.NamedSharding
  batch_sharding: jax.sharding.NamedSharding


def build_programs(config: ml_collections.ConfigDict, graphdef, params, model_cfg, mesh, rules,
                   rcfg: RolloutConfig, ocfg: ObjectiveConfig, optcfg: OptimConfig,
                   autoencoder=None) -> Programs:
  """The rollout and train step exactly as the trainer runs them (``unigrpo_jax.aot`` compiles
  these same functions for TPU topologies). ``params``: the full model state, concrete or
  abstract (only shapes and logical names are read). ``autoencoder``: default the model's
  ``PatchAutoencoder``."""
  autoencoder = autoencoder or PatchAutoencoder.for_model(model_cfg)
  rollout_fn = make_rollout(graphdef, rcfg, autoencoder, mesh=mesh)
  train_step = make_train_step(graphdef, params, ocfg, optcfg, mesh, rules)
  return Programs(rollout_fn, train_step,
                  parallel.rows_sharding(mesh, config.rollout.prompts_per_batch),
                  parallel.batch_sharding(mesh))


# ------------------------------------------------------------------ rewards
def check_reward_inputs(config: ml_collections.ConfigDict, source) -> None:
  """Every prompt has what each weighted reward reads (a ShapeWorld spec, GenEval metadata):
  ValueError naming the reward and the first prompt without it, before any compile."""
  if isinstance(source, ShapeWorldSource):  # every task has a spec (GenEval's is derived)
    return
  remotes = config.get("remote_rewards") or {}
  for name, w in config.rewards.items():
    if w == 0:
      continue
    needs_spec = name not in remotes and "spec" in registry.requirements(name)
    needs_geneval = name in remotes and remotes[name].kind == "geneval"
    if not (needs_spec or needs_geneval):
      continue
    for i in range(len(source)):
      r = source[i]
      if needs_spec and not r["spec"]:
        raise ValueError(f"config.rewards.{name}: reward {name!r} needs a ShapeWorld spec, and "
                         f"prompt {r['prompt']!r} ({source!r}, record {i}) has none")
      if needs_geneval:
        spec = sw.Spec.from_json(r["spec"]) if r["spec"] else None
        try:
          geneval.batch_metadata([spec], [r.get("metadata", "")], [r["prompt"]],
                                 require_geneval=True)
        except ValueError as e:
          raise ValueError(f"config.rewards.{name}: reward {name!r} needs GenEval metadata: "
                           f"{source!r}, record {i}: {e}") from None


def score_rollout(reward_fn: Callable, images: np.ndarray, specs: Sequence[sw.Spec],
                  reasoning: Sequence[str], prompts: Sequence[str],
                  metadata: Sequence[str] | None = None, first_row: int = 0) -> dict:
  """Calls the reward on this process's rows; on failure names the process and the first
  prompt whose rows make it raise (``first_row``: global index of the first row given). A
  remote reward's error already names its chunk and prompts: it is not re-run row by row (that
  would send B more requests to a server that just failed)."""
  meta = lambda a, b: None if metadata is None else metadata[a:b]
  who = f"process {jax.process_index()}: " if distributed.is_multiprocess() else ""
  try:
    return reward_fn(images, specs, reasoning, prompts=prompts, metadata=meta(0, len(specs)))
  except remote.RemoteRewardError as e:
    raise RewardError(str(e)) from e
  except Exception as batch_error:  # find the culprit row to make the report useful
    for i in range(len(specs)):
      try:
        reward_fn(images[i:i + 1], specs[i:i + 1], reasoning[i:i + 1],
                  prompts=prompts[i:i + 1], metadata=meta(i, i + 1))
      except Exception as row_error:
        raise RewardError(f"{who}reward failed on prompt {prompts[i]!r} (row "
                          f"{first_row + i}): {type(row_error).__name__}: "
                          f"{row_error}") from row_error
    raise RewardError(f"{who}reward failed on the batch: {type(batch_error).__name__}: "
                      f"{batch_error}") from batch_error


# Per-row statistics every process computes for its own rows and shares (host data, tiny):
# the run's reward, advantages and metrics are then computed from the whole batch, identically
# on every process and identically to a one-process run.
_ROW_STATS = ("reward", "strict", "reasoning_ok", "reasoning_len", "truncated")


# ------------------------------------------------------------------ the run
def _flat(tree) -> dict:
  """Checkpoint layout: leaves by index (restored into the abstract tree's structure)."""
  return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _unflat(flat: dict, like):
  return jax.tree.unflatten(jax.tree.structure(like), [flat[k] for k in sorted(flat, key=int)])


def run_train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs UniGRPO; returns the last metrics row written."""
  if config.model.get("require_weights", False) and not config.init_checkpoint:
    raise ValueError(f"config.init_checkpoint is empty, and config.model.preset="
                     f"{config.model.preset!r} is a real model (model.require_weights): set "
                     "--config.init_checkpoint=/path/to/BAGEL-7B-MoT (training a random "
                     "7B model is never what a pod run wants; the AOT planner needs no weights)")
  tokenizer = setup.tokenizer_for(config)  # a BAGEL directory brings its tokenizer.json
  # --- inputs first: each of these fails with a message before any compile.
  reward_fn = setup.reward_fn_for(config)  # loads in-process reward models (CLIP) now
  held_out = eval_records(config, tokenizer)
  source = prompt_source(config, tokenizer, held_out)
  check_reward_inputs(config, source)
  rcfg, ocfg, optcfg = rollout_config(config, tokenizer), objective_config(config, tokenizer), \
      optim_config(config)
  model_cfg, init_params = setup.model_and_params(config, tokenizer)
  autoencoder = setup.autoencoder_for(config, model_cfg)  # a BAGEL dir's FLUX VAE, or pixels
  if rcfg.vocab_limit > model_cfg.vocab_size:
    raise ValueError(f"config.rollout.vocab_limit={rcfg.vocab_limit} exceeds the model's "
                     f"{model_cfg.vocab_size}-row embedding table")
  g = rcfg.group_size
  mesh, rules = mesh_and_rules(config)
  batch_rows = config.rollout.prompts_per_batch * g
  n_proc, proc = jax.process_count(), jax.process_index()
  if config.rollout.prompts_per_batch % n_proc:
    raise ValueError(f"config.rollout.prompts_per_batch={config.rollout.prompts_per_batch} "
                     f"cannot be split evenly over {n_proc} processes")
  # This process loads, decodes and scores rows [row_lo, row_hi) = its prompts' groups.
  row_lo, row_hi = distributed.process_block(batch_rows, "the rollout batch")
  same = json.loads(config.to_json_best_effort())
  same.get("distributed", {}).pop("process_id", None)
  distributed.check_same_everywhere("the config", same)

  # --- model, reference, optimizer state (created in their shardings).
  graphdef, params = setup.build_params(config, model_cfg, init_params, mesh, rules)
  ref_params = jax.tree.map(jnp.copy, params) if ocfg.needs_reference else None
  train_state = init_train_state(params, ocfg, optcfg, mesh, rules)
  del params
  programs = build_programs(config, graphdef, train_state.params, model_cfg, mesh, rules, rcfg,
                            ocfg, optcfg, autoencoder=autoencoder)
  rollout_fn, train_step = programs.rollout, programs.train_step
  evaluator = build_evaluator(config, graphdef, model_cfg, tokenizer, held_out,
                              autoencoder=autoencoder, reward_fn=reward_fn, mesh=mesh)
  batch_sh = programs.batch_sharding

  # --- resume.
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.RunCheckpointer(workdir, keep=config.keep_checkpoints,
                                       async_save=config.async_checkpointing)
  loader_iter = iter(make_prompt_loader(source, config.rollout.prompts_per_batch, config.seed,
                                        drop_remainder=True, shard_index=proc,
                                        shard_count=n_proc))
  start_step, nonfinite_in_row, nonfinite_total = 0, 0, 0
  saved_tree = {"train_state": train_state, "ref_params": ref_params}
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            saved_tree)
    flat, host = ckpt.restore(latest, _flat(abstract))
    restored = _unflat(flat, saved_tree)
    train_state, ref_params = restored["train_state"], restored["ref_params"]
    if host.get("num_processes", 1) != n_proc:
      raise ValueError(f"checkpoint {ckpt.directory}/{latest} was written by "
                       f"{host.get('num_processes', 1)} processes and this run has {n_proc}: "
                       "resume with the same process count (each process's data position "
                       "is saved)")
    loader_iter.set_state(host["data_iter"][proc])
    start_step, nonfinite_total = host["step"], host["nonfinite_total"]
    nonfinite_in_row = host["nonfinite_in_row"]
    if distributed.is_main():
      truncate_metrics(workdir, start_step)
    distributed.main_print(f"resumed from {ckpt.directory} at step {start_step}")
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

  def save(step: int, data_iter_state=None) -> None:
    """Called by every process: orbax writes each process's shards; the JSON item (written by
    process 0) holds every process's data-iterator position."""
    state = {"train_state": train_state, "ref_params": ref_params}
    distributed.assert_global(state, "saved state ")
    iters = distributed.exchange("data_iter", data_iter_state or loader_iter.get_state())
    ckpt.save(step, _flat(state),
              {"data_iter": iters, "num_processes": n_proc, "step": step,
               "nonfinite_total": nonfinite_total, "nonfinite_in_row": nonfinite_in_row},
              force=True)

  def evaluate(step: int) -> dict:
    t0 = time.time()
    metrics, picture = evaluator(train_state.params, jax.random.fold_in(base_key, 2**31 - 1))  # fixed eval noise
    metrics["perf/eval_time_s"] = time.time() - t0
    if distributed.is_main():
      grid.save_png(os.path.join(workdir, f"samples_step_{step:06d}.png"), picture)
    logger.write_images(step, {"samples": picture})
    if jax.process_index() == 0:
      print(eval_summary(step, metrics), flush=True)
    return metrics

  last = {}
  try:
    if start_step == 0:
      last = {"step": 0, **evaluate(0), "perf/num_compiles": compiles.count}
      logger.write(0, {k: v for k, v in last.items() if k != "step"})
    save_now = None
    for step in range(start_step + 1, config.total_steps + 1):
      t0 = time.time()
      iter_before = loader_iter.get_state()
      batch = next(loader_iter)  # this process's prompts only
      prompts = list(batch["prompt"])
      specs = [sw.Spec.from_json(s) if s else None for s in batch["spec"]]  # None: free text
      metadata = batch.get("metadata", [""] * len(prompts))
      tokens, mask = encode_prompts(tokenizer, prompts, config.data.max_prompt_len)
      # Every process passes the whole (tiny) prompt batch: the rollout is one global program.
      tokens = distributed.allgather_rows(tokens, "prompt_tokens")
      mask = distributed.allgather_rows(mask, "prompt_mask")
      key = jax.random.fold_in(base_key, step)
      tokens, mask = jax.device_put((tokens, mask), programs.prompt_sharding)
      traj = rollout_fn(train_state.params, tokens, mask, jax.random.fold_in(key, 0))
      # Only this process's rows come to the host (no gathering of all images to one host).
      host = [distributed.local_rows(a, row_lo, row_hi)
              for a in (traj.images, traj.reasoning_tokens, traj.reasoning_mask, traj.truncated)]
      t_rollout = time.time() - t0
      images = np.asarray(to_uint8(host[0]))
      reasoning = decode_reasoning(tokenizer, host[1], host[2])
      row_prompts = [p for p in prompts for _ in range(g)]
      row_specs = [s for s in specs for _ in range(g)]
      try:
        rewards = score_rollout(reward_fn, images, row_specs, reasoning, row_prompts,
                                [m for m in metadata for _ in range(g)], row_lo)
        reward = np.asarray(rewards["reward"], np.float32)
        # Reasoning accuracy only where there is a scene to match (NaN for free-text rows).
        reasoning_ok = [np.nan if s is None else float(sw.parse_reasoning(t) == s)
                        for t, s in zip(reasoning, row_specs)]
        local = np.stack([
            reward, np.asarray(rewards.get("shapeworld/strict", reward), np.float32),
            np.asarray(reasoning_ok, np.float32),
            np.sum(host[2], axis=1).astype(np.float32), np.asarray(host[3], np.float32)], 1)
      except RewardError as e:
        local = str(e)  # every process learns of it and stops (nobody waits for a dead peer)
      shared = distributed.exchange("row_stats", local)
      for item in shared:
        if isinstance(item, str):
          raise RewardError(item)
      stats = dict(zip(_ROW_STATS, np.concatenate(shared, axis=0).T))
      reward = stats["reward"]
      # Every row's prompt category, in global row order (process blocks are in process order).
      row_categories = [c for block in distributed.exchange("categories", list(batch["category"]))
                        for c in block for _ in range(g)]
      advantages = adv_lib.get_advantage_fn(config.advantage.estimator)(
          jnp.asarray(reward), g, eps=config.advantage.eps, clip=config.advantage.clip)
      if preemption.reached(2 * step):  # long rollouts: also check between rollout and update
        distributed.main_print(f"preempted: stopping at step {step} before its update; the "
                               f"checkpoint of step {step - 1} is saved")
        save_now = step - 1
        break
      t1 = time.time()
      traj, advantages = jax.device_put((traj, np.asarray(advantages)), batch_sh)
      new_state, m = train_step(train_state, ref_params, traj, advantages,
                                jax.random.fold_in(key, 1))
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      # Non-finite gradients never reach the params: the optimizer skips such updates
      # (optax.apply_if_finite inside the step); here they are counted and bounded.
      train_state = new_state
      finite = bool(np.isfinite(m["loss/total"]) and np.isfinite(m["grad_norm/total"]))
      nonfinite_in_row = 0 if finite else nonfinite_in_row + 1
      nonfinite_total += 0 if finite else 1
      if nonfinite_in_row >= config.max_nonfinite_in_row:
        raise NonFiniteError(f"{nonfinite_in_row} consecutive steps with non-finite loss or "
                             f"gradients at step {step} (loss {m['loss/total']}, grad norm "
                             f"{m['grad_norm/total']}); stopping. Lower the learning rates or "
                             "check the rewards.")
      scored = stats["reasoning_ok"][np.isfinite(stats["reasoning_ok"])]
      metrics = {f"train/{k}": v for k, v in m.items()}
      metrics["train/loss"] = m["loss/total"]
      metrics.update({
          "train/reward_mean": float(reward.mean()), "train/reward_std": float(reward.std()),
          "train/strict_mean": float(np.mean(stats["strict"])),
          **({"train/reasoning_accuracy": float(np.mean(scored))} if scored.size else {}),
          "train/zero_variance_groups": float(adv_lib.zero_variance_fraction(jnp.asarray(reward),
                                                                             g)),
          "train/reasoning_len": float(np.mean(stats["reasoning_len"])),
          "train/truncated_frac": float(np.mean(stats["truncated"])),
          "train/nonfinite_skipped_total": float(nonfinite_total),
          "perf/rollout_time_s": t_rollout, "perf/train_time_s": time.time() - t1,
      })
      # Per prompt category (ShapeWorld's, GenEval's tags, a prompt file's "category").
      metrics.update(geneval.per_category_accuracy(row_categories, reward,
                                                   prefix="train/reward/"))
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
        distributed.main_print(f"SIGTERM: saved step {step} to {ckpt.directory}; exiting")
        break
    if save_now is not None and save_now > start_step and save_now % config.checkpoint_every:
      save(save_now, iter_before)  # step - 1's state: this step's batch is read again on resume
    distributed.barrier("end of run")
  finally:
    preemption.restore()
    logger.close()
    ckpt.close()
  return last
