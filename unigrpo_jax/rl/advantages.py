"""Group-relative advantages (docs/method.md §3).

Rewards come as a flat [B] vector, B = num_groups * group_size, with the rows of one group
contiguous. One advantage per trajectory is shared by all its text tokens and denoising steps.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

_STD_MODES = ("group", "batch")


def _grouped(rewards, group_size: int) -> Array:
    """[B] -> float32 [B // group_size, group_size]; validates the static shapes."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {rewards.shape}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"batch size {rewards.shape[0]} is not divisible by group_size {group_size}")
    return rewards.reshape(-1, group_size)


def group_advantages(rewards, group_size: int, eps: float = 1e-4, *, clip: float | None = None,
                     std_mode: str = "group", mean_only: bool = False) -> Array:
    """``A = (r - group mean) / (std + eps)``, optionally clipped to [-clip, clip].

    Args:
      rewards: [B] float, groups contiguous.
      group_size: G (static); B % G must be 0.
      eps: added to the std (population std, ddof=0, as Flow-GRPO's np.std).
      clip: if set, clip advantages to [-clip, clip] (Flow-GRPO uses 5).
      std_mode: "group" (per-group std) or "batch" (std of the whole batch).
      mean_only: Dr.GRPO: return ``r - group mean`` (no std division).
    Returns: float32 [B]. A group whose rewards are all equal gets exactly 0, even with eps=0
      (its float mean need not equal its members exactly, so this is enforced with a where).
    """
    if std_mode not in _STD_MODES:
        raise ValueError(f"std_mode must be one of {_STD_MODES}, got {std_mode!r}")
    g = _grouped(rewards, group_size)
    centred = g - jnp.mean(g, axis=1, keepdims=True)
    flat_group = (jnp.max(g, axis=1) == jnp.min(g, axis=1))[:, None]  # [num_groups, 1]
    if mean_only:
        adv = centred
    else:
        if std_mode == "group":
            std = jnp.std(g, axis=1, keepdims=True)
        else:
            std = jnp.std(g)
        denom = std + jnp.float32(eps)
        # Safe denominator: flat groups are overwritten below, but must not produce 0/0 first.
        denom = jnp.where(flat_group | (denom == 0), 1.0, denom)
        adv = centred / denom
    adv = jnp.where(flat_group, 0.0, adv)
    if clip is not None:
        adv = jnp.clip(adv, -clip, clip)
    return adv.reshape(-1)


def zero_variance_fraction(rewards, group_size: int) -> Array:
    """Fraction (float32 scalar) of groups whose rewards are all equal (they carry no signal)."""
    g = _grouped(rewards, group_size)
    return jnp.mean((jnp.max(g, axis=1) == jnp.min(g, axis=1)).astype(jnp.float32))


# Estimators selectable by name from config; each is called as fn(rewards, group_size, **kw).
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Array]] = {
    "grpo": group_advantages,
    "dr_grpo": functools.partial(group_advantages, mean_only=True),
    "batch_std": functools.partial(group_advantages, std_mode="batch"),
}


def get_advantage_fn(name: str) -> Callable[..., Array]:
    """Looks up an estimator in ``ADVANTAGE_ESTIMATORS``; KeyError lists the valid names."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise KeyError(
            f"unknown advantage estimator {name!r}; choose from {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
