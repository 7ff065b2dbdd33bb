"""Reward registry.

A reward fn has signature fn(images, specs, reasoning_texts=None) -> dict of float [B]
NumPy arrays that includes "reward". Exceptions propagate (the trainer reports them).
A fn that also declares a ``prompts`` parameter is given the B prompt strings.
Rewards that need settings or a model (pickscore, clip_score) register a *factory*
``factory(config) -> reward fn``, built once when ``combined_reward`` gets the config.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import numpy as np

from unigrpo_jax.data import shapeworld as sw
from unigrpo_jax.rewards import jpeg
from unigrpo_jax.rewards import shapeworld as sw_reward

RewardFn = Callable[..., dict]
# Rewards that read the prompt's ShapeWorld spec (a prompt without one cannot be scored by them).
SPEC_REWARDS = frozenset({"shapeworld", "shapeworld_strict", "reasoning_match"})
_REGISTRY: dict[str, RewardFn] = {}
_FACTORIES: dict[str, Callable[..., RewardFn]] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
  """Decorator: register fn under `name` (re-registering a name raises)."""
  def deco(fn: RewardFn) -> RewardFn:
    if name in _REGISTRY and _REGISTRY[name] is not fn:
      raise ValueError(f"reward {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn
  return deco


def register_factory(name: str) -> Callable:
  """Decorator: register factory(config) -> reward fn under `name`."""
  def deco(factory):
    if name in _FACTORIES and _FACTORIES[name] is not factory:
      raise ValueError(f"reward {name!r} is already registered")
    _FACTORIES[name] = factory
    return factory
  return deco


def get(name: str, config=None) -> RewardFn:
  """The reward fn `name`; a factory reward is built from `config` (required for those)."""
  if name in _FACTORIES:
    if config is None:
      raise ValueError(f"reward {name!r} is built from the run config; pass config=")
    return _FACTORIES[name](config)
  if name not in _REGISTRY:
    raise KeyError(f"unknown reward {name!r}; available: {available()}")
  return _REGISTRY[name]


def available() -> list[str]:
  return sorted({*_REGISTRY, *_FACTORIES})


def _takes_prompts(fn: RewardFn) -> bool:
  try:
    return "prompts" in inspect.signature(fn).parameters
  except (TypeError, ValueError):  # builtins / C callables have no inspectable signature
    return False


def combined_reward(weights: dict[str, float], config=None) -> RewardFn:
  """fn(images, specs, reasoning_texts=None, prompts=None) -> {"reward": sum_n w_n * reward_n,
  plus each component's outputs as "<name>/<key>"}. Unknown names raise KeyError now, not
  later; factory rewards (models) are built now from `config`."""
  if not weights:
    raise ValueError("combined_reward needs at least one component")
  fns = {name: get(name, config) for name in weights}
  with_prompts = {name for name, f in fns.items() if _takes_prompts(f)}
  weights = {k: float(v) for k, v in weights.items()}

  def fn(images, specs, reasoning_texts: Optional[Sequence[str]] = None,
         prompts: Optional[Sequence[str]] = None) -> dict:
    out, total = {}, np.zeros(len(specs), np.float32)
    for name, f in fns.items():
      extra = {"prompts": prompts} if name in with_prompts else {}
      part = f(images, specs, reasoning_texts=reasoning_texts, **extra)
      if "reward" not in part:
        raise KeyError(f"reward fn {name!r} returned no 'reward' key (keys: {sorted(part)})")
      total = total + weights[name] * np.asarray(part["reward"], np.float32)
      out.update({f"{name}/{k}": np.asarray(v) for k, v in part.items()})
    out["reward"] = total.astype(np.float32)
    return out

  return fn


@register("shapeworld")
def shapeworld_reward(images, specs, reasoning_texts=None) -> dict:
  """GenEval-style partial score (rewards.shapeworld.score); reward = score."""
  del reasoning_texts
  out = sw_reward.score(images, specs)
  return {"reward": out["score"], **out}


@register("shapeworld_strict")
def shapeworld_strict_reward(images, specs, reasoning_texts=None) -> dict:
  """1 iff every clause is satisfied; reward = strict."""
  del reasoning_texts
  out = sw_reward.score(images, specs)
  return {"reward": out["strict"], **out}


@register("reasoning_match")
def reasoning_match_reward(images, specs, reasoning_texts=None) -> dict:
  """1 iff the trace's final clause parses to the target spec (text-only reward)."""
  del images
  if reasoning_texts is None:
    raise ValueError("reasoning_match needs reasoning_texts")
  if len(reasoning_texts) != len(specs):
    raise ValueError(f"{len(reasoning_texts)} reasoning texts but {len(specs)} specs")
  parsed = [sw.parse_reasoning(t) for t in reasoning_texts]
  match = np.array([p == s for p, s in zip(parsed, specs)], np.float32)
  return {"reward": match, "parsed": np.array([p is not None for p in parsed], np.float32)}


@register_factory("pickscore")
def _pickscore_factory(config) -> RewardFn:
  """PickScore (flow_grpo's scaling); see rewards/clip.py. Model: config.reward_models."""
  from unigrpo_jax.rewards import clip as clip_rewards  # jax model code only when used
  return clip_rewards.make_reward("pickscore", config)


@register_factory("clip_score")
def _clip_score_factory(config) -> RewardFn:
  """CLIPScore 2.5 * max(cos, 0) (Hessel et al. 2021); see rewards/clip.py."""
  from unigrpo_jax.rewards import clip as clip_rewards
  return clip_rewards.make_reward("clip_score", config)


@register("jpeg_compressibility")
def jpeg_compressibility_reward(images, specs, reasoning_texts=None) -> dict:
  """DDPO: reward = -(quality-95 JPEG size in kB); also reports "kb"."""
  del specs, reasoning_texts
  kb = jpeg.jpeg_kilobytes(images)
  return {"reward": -kb, "kb": kb}


@register("jpeg_incompressibility")
def jpeg_incompressibility_reward(images, specs, reasoning_texts=None) -> dict:
  """DDPO: reward = quality-95 JPEG size in kB; also reports "kb"."""
  del specs, reasoning_texts
  kb = jpeg.jpeg_kilobytes(images)
  return {"reward": kb, "kb": kb}
