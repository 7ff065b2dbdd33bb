"""Reward registry.

A reward fn has signature fn(images, specs, reasoning_texts=None) -> dict of float [B]
NumPy arrays that includes "reward". Exceptions propagate (the trainer reports them). A fn
that also takes ``prompts`` and/or ``metadata`` keywords gets them (the row prompts and their
metadata objects, e.g. GenEval's); remote rewards (rewards.remote) need them.
Rewards that need settings or a model (pickscore, clip_score) register a *factory*
``factory(config) -> reward fn``, built once when ``combined_reward`` gets the config.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import numpy as np

from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.rewards import jpeg
from unigrpo_jax.rewards import shapeworld as sw_reward

RewardFn = Callable[..., dict]
# Rewards that read the prompt's ShapeWorld spec (a prompt without one cannot be scored by them).
SPEC_REWARDS = frozenset({"shapeworld", "shapeworld_strict", "reasoning_match"})
_REGISTRY: dict[str, RewardFn] = {}
_FACTORIES: dict[str, Callable[..., RewardFn]] = {}


def register(name: str, requires: tuple[str, ...] = ()) -> Callable[[RewardFn], RewardFn]:
  """Decorator: register fn under `name` (re-registering a name raises). ``requires``: what
  every prompt must carry ("spec": a ShapeWorld scene), checked before training starts."""
  def deco(fn: RewardFn) -> RewardFn:
    if name in _REGISTRY and _REGISTRY[name] is not fn:
      raise ValueError(f"reward {name!r} is already registered")
    fn.requires = tuple(requires)
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


def requirements(name: str) -> tuple[str, ...]:
  """What every prompt must carry for reward `name` (see ``register``); () if nothing or unknown."""
  return tuple(getattr(_REGISTRY.get(name), "requires", ()))


def available() -> list[str]:
  return sorted({*_REGISTRY, *_FACTORIES})


def accepted_kwargs(f: RewardFn) -> tuple[str, ...]:
  """Which of the optional keywords ("prompts", "metadata") a reward fn declares."""
  try:
    params = inspect.signature(f).parameters
  except (TypeError, ValueError):  # builtins / C callables have no inspectable signature
    return ()
  return tuple(k for k in ("prompts", "metadata") if k in params)


def combined_reward(weights: dict[str, float], config=None,
                    extra: Optional[dict[str, RewardFn]] = None) -> RewardFn:
  """fn(images, specs, reasoning_texts=None, prompts=None, metadata=None) -> {"reward":
  sum_n w_n * reward_n, plus each component's outputs as "<name>/<key>"}. ``extra`` holds
  reward fns built from the config (remote rewards); they win over registered names. Factory
  rewards (models) are built now from ``config``. Components with weight 0 are not called.
  Unknown names raise KeyError now, not later."""
  weights = {k: float(v) for k, v in weights.items() if float(v) != 0.0}
  if not weights:
    raise ValueError("combined_reward needs at least one component with a nonzero weight")
  extra = extra or {}
  fns = {name: extra[name] if name in extra else get(name, config) for name in weights}
  kwargs_of = {name: accepted_kwargs(f) for name, f in fns.items()}

  def fn(images, specs, reasoning_texts: Optional[Sequence[str]] = None,
         prompts: Optional[Sequence[str]] = None, metadata: Optional[Sequence] = None) -> dict:
    out, total = {}, np.zeros(len(specs), np.float32)
    given = {"prompts": prompts, "metadata": metadata}
    for name, f in fns.items():
      part = f(images, specs, reasoning_texts=reasoning_texts,
               **{k: given[k] for k in kwargs_of[name]})
      if "reward" not in part:
        raise KeyError(f"reward fn {name!r} returned no 'reward' key (keys: {sorted(part)})")
      total = total + weights[name] * np.asarray(part["reward"], np.float32)
      out.update({f"{name}/{k}": np.asarray(v) for k, v in part.items()})
    out["reward"] = total.astype(np.float32)
    return out

  return fn


@register("shapeworld", requires=("spec",))
def shapeworld_reward(images, specs, reasoning_texts=None) -> dict:
  """GenEval-style partial score (rewards.shapeworld.score); reward = score."""
  del reasoning_texts
  out = sw_reward.score(images, specs)
  return {"reward": out["score"], **out}


@register("shapeworld_strict", requires=("spec",))
def shapeworld_strict_reward(images, specs, reasoning_texts=None) -> dict:
  """1 iff every clause is satisfied; reward = strict."""
  del reasoning_texts
  out = sw_reward.score(images, specs)
  return {"reward": out["strict"], **out}


@register("reasoning_match", requires=("spec",))
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
