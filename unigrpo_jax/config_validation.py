"""Checks a config before anything expensive runs; errors name the field."""
from __future__ import annotations

import ml_collections

from unigrpo_jax import paths

MODES = ("train", "sft", "eval", "sample")


class ConfigError(ValueError):
  pass


def _require(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ConfigError(f"config.{field}: {message}")


def validate(c: ml_collections.ConfigDict) -> None:
  _require(c.mode in MODES, "mode", f"{c.mode!r} is not one of {MODES}")
  for field in ("total_steps", "eval_every", "checkpoint_every", "log_every",
                "keep_checkpoints", "max_nonfinite_in_row"):
    _require(isinstance(c[field], int) and c[field] > 0, field,
             f"must be a positive integer, got {c[field]!r}")
  r = c.rollout
  for field in ("prompts_per_batch", "group_size", "max_reasoning_len", "num_steps",
                "window_size"):
    _require(isinstance(r[field], int) and r[field] > 0, f"rollout.{field}",
             f"must be a positive integer, got {r[field]!r}")
  _require(r.group_size >= 2, "rollout.group_size", "GRPO needs at least 2 members per group")
  lo, hi = r.window_range
  _require(0 <= lo < hi <= r.num_steps, "rollout.window_range",
           f"{tuple(r.window_range)} must satisfy 0 <= lo < hi <= num_steps={r.num_steps}")
  _require(r.window_size <= hi - lo, "rollout.window_size",
           f"{r.window_size} does not fit in window_range {tuple(r.window_range)}")
  _require(r.temperature > 0, "rollout.temperature", "must be > 0")
  _require(r.noise_level >= 0, "rollout.noise_level", "must be >= 0")
  _require(r.sde_type in ("sde", "cps"), "rollout.sde_type", f"{r.sde_type!r} not in sde, cps")
  _require(isinstance(r.vocab_limit, int) and r.vocab_limit >= -1, "rollout.vocab_limit",
           f"must be -1 (the tokenizer's vocabulary), 0 (the whole table) or a positive int, "
           f"got {r.vocab_limit!r}")
  _require(r.cfg_scale == 1.0, "rollout.cfg_scale",
           f"{r.cfg_scale!r}: training rollouts sample without classifier-free guidance (the "
           "paper's setting; nothing reads this key); use eval.cfg_scale for evaluation")
  _require(isinstance(r.get("decode_rows", 0), int) and r.get("decode_rows", 0) >= 0,
           "rollout.decode_rows", f"must be an int >= 0 (0: all at once), got "
           f"{r.get('decode_rows')!r}")
  _require(isinstance(r.window_per_group, bool), "rollout.window_per_group",
           f"must be True or False, got {r.window_per_group!r}")
  _require(isinstance(r.decode_tensor, int) and r.decode_tensor >= -1, "rollout.decode_tensor",
           f"must be an int >= -1 (-1: automatic, 0 or 1: the trainer's layout), got "
           f"{r.decode_tensor!r}")
  _require(isinstance(r.group_initial_noise, bool), "rollout.group_initial_noise",
           f"must be True or False, got {r.group_initial_noise!r}")
  o = c.optim
  for field in ("ppo_epochs", "num_minibatches", "grad_accum"):
    _require(isinstance(o[field], int) and o[field] > 0, f"optim.{field}",
             f"must be a positive integer, got {o[field]!r}")
  batch = r.prompts_per_batch * r.group_size
  _require(batch % o.num_minibatches == 0, "optim.num_minibatches",
           f"{o.num_minibatches} does not divide the rollout batch {batch}")
  _require(batch % (o.num_minibatches * o.grad_accum) == 0, "optim.grad_accum",
           f"{o.grad_accum} micro-batches do not divide a minibatch of "
           f"{batch // o.num_minibatches} rows (rollout batch {batch} / num_minibatches "
           f"{o.num_minibatches})")
  for field in ("wrong_reasoning_prob", "wrong_image_prob"):
    p = c.sft[field]
    _require(isinstance(p, (int, float)) and 0 <= p <= 1, f"sft.{field}",
             f"must be a probability in [0, 1], got {p!r}")
  for field in ("prompt_file", "eval_prompt_file"):
    path = c.data[field]
    _require(not path or paths.isfile(paths.resolve_path(path)), f"data.{field}",
             f"{path!r} is not a file")
  _require(c.objective.regularizer in ("velocity_mse", "latent_kl", "none"),
           "objective.regularizer", f"{c.objective.regularizer!r} is not one of "
           "velocity_mse, latent_kl, none")
  _require(c.objective.train_text or c.objective.train_image, "objective",
           "train_text and train_image are both False: nothing to train")
  from unigrpo_jax.rl.advantages import ADVANTAGE_ESTIMATORS
  _require(c.advantage.estimator in ADVANTAGE_ESTIMATORS, "advantage.estimator",
           f"{c.advantage.estimator!r} is not one of {sorted(ADVANTAGE_ESTIMATORS)}")
  _require(len(c.rewards) > 0, "rewards", "needs at least one reward name with a weight")
  validate_rewards(c)
  if "distributed" in c:  # process count/id, timeouts; the batch must split over processes
    from unigrpo_jax import distributed
    try:
      distributed.DistributedConfig.from_config(c.distributed).validate()
    except distributed.DistributedError as e:
      raise ConfigError(f"config.{e}") from None
    n = c.distributed.num_processes
    _require(r.prompts_per_batch % n == 0, "rollout.prompts_per_batch",
             f"{r.prompts_per_batch} prompts cannot be split evenly over "
             f"distributed.num_processes={n}")
  _require(c.eval.num_steps > 0, "eval.num_steps", "must be positive")
  _require(c.sft.steps > 0 and c.sft.batch_size > 0, "sft", "steps and batch_size must be > 0")
  lora = c.model.get("lora")
  if lora is not None:
    _require(isinstance(lora.rank, int) and lora.rank >= 0, "model.lora.rank",
             f"must be an integer >= 0, got {lora.rank!r}")
    _require(not (lora.rank and c.mode == "sft"), "model.lora.rank",
             "SFT trains the full model: set model.lora.rank=0 for mode=sft")
    _require(not lora.get("adapters") or lora.rank > 0, "model.lora.adapters",
             "adapters given but model.lora.rank is 0")
    if lora.get("adapters"):
      _require(paths.isfile(paths.join(lora.adapters, "adapter_config.json")),
               "model.lora.adapters", f"{lora.adapters!r} has no adapter_config.json")


def validate_rewards(c: ml_collections.ConfigDict) -> None:
  """Reward names, weights and the remote entries they use (URL, token env var, judge fields).
  Contacts no server."""
  from unigrpo_jax.rewards import registry
  from unigrpo_jax.rewards.remote import client as remote
  remotes = c.get("remote_rewards") or {}
  known = sorted(set(registry.available()) | set(remotes))
  for name, w in c.rewards.items():
    _require(name in known, f"rewards.{name}", f"unknown reward; available: {known}")
    _require(isinstance(w, (int, float)) and not isinstance(w, bool), f"rewards.{name}",
             f"weight must be a number, got {w!r}")
  _require(any(w != 0 for w in c.rewards.values()), "rewards", "all weights are 0")
  try:
    remote.build_reward_fns(remotes, [n for n, w in c.rewards.items() if w != 0])
  except ValueError as e:  # already names config.remote_rewards.<name>.<field>
    raise ConfigError(str(e)) from None
