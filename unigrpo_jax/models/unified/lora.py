"""LoRA adapters for the experts' projections, and what they need around them.

A projection ``y = x W`` (W [in..., out...], e.g. q: [D, H, hd], o: [H, hd, D]) gains
``(alpha / r) * (x A) B`` with A [in..., r] and B [r, out...]. Adapters are ``nnx.LoRAParam``
variables (a subclass of ``nnx.Param``) kept in float32 whatever the base's dtype: GRPO's
updates are ~1e-4 of a weight, below bf16's resolution (UniRL found a bf16 adapter master
drifting to white images). A has the base's fan-in init, B is zero, so a model with fresh
adapters computes exactly what the base does.

The base weights stay ``nnx.Param``: ``trainable_filter`` picks what the optimizer sees (the
adapters when there are any), and the frozen reference of the velocity MSE / latent KL is the
same state with the adapters zeroed (``reference_state``), not a second copy of the weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unigrpo_jax.models.unified.config import ModelConfig
from unigrpo_jax.models.unified.layers import annotated_param, fan_in_init, zeros_init


def projection_shapes(cfg: ModelConfig) -> dict:
  """target -> (in shape, in logical axes, out shape, out logical axes) of the base weight."""
  d, h, hkv, hd, m = (cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                      cfg.mlp_dim)
  return {"q": ((d,), ("embed",), (h, hd), ("heads", "head_dim")),
          "k": ((d,), ("embed",), (hkv, hd), ("kv_heads", "head_dim")),
          "v": ((d,), ("embed",), (hkv, hd), ("kv_heads", "head_dim")),
          "o": ((h, hd), ("heads", "head_dim"), (d,), ("embed",)),
          "gate": ((d,), ("embed",), (m,), ("mlp",)),
          "up": ((d,), ("embed",), (m,), ("mlp",)),
          "down": ((m,), ("mlp",), (d,), ("embed",))}


class ExpertAdapters(nnx.Module):
  """The adapters of one expert: ``<target>_a`` [in..., r] and ``<target>_b`` [r, out...]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.targets = tuple(cfg.lora_targets)
    self.scale = cfg.lora_scale
    self.dtype = cfg.compute_dtype
    r = cfg.lora_rank
    for name, (ins, in_axes, outs, out_axes) in projection_shapes(cfg).items():
      if name not in self.targets:
        continue
      # The rank axis is "lora_rank" (fsdp by default): it takes the mesh axis whenever the
      # matrix's other axis does not (B of q / k / v / gate / up, A of o / down), so no adapter
      # is replicated whole on every chip of an all-FSDP mesh.
      a = annotated_param(rngs, fan_in_init(len(ins)), (*ins, r), (*in_axes, "lora_rank"),
                          jnp.float32, kind=nnx.LoRAParam)
      b = annotated_param(rngs, zeros_init, (r, *outs), ("lora_rank", *out_axes), jnp.float32,
                          kind=nnx.LoRAParam)
      setattr(self, f"{name}_a", a)
      setattr(self, f"{name}_b", b)

  def add(self, name: str, y: jax.Array, x: jax.Array) -> jax.Array:
    """``y + scale * (x A) B`` for target ``name`` (y unchanged if it has no adapter).

    x: [..., in...] (the projection's input, in the compute dtype); y: [..., out...].
    """
    if name not in self.targets:
      return y
    a, b = getattr(self, f"{name}_a")[...], getattr(self, f"{name}_b")[...]
    xa = jnp.tensordot(x.astype(self.dtype), a.astype(self.dtype), axes=a.ndim - 1)
    delta = jnp.tensordot(xa, b.astype(self.dtype), axes=1) * self.scale
    return y + delta.astype(y.dtype)


def base_config(cfg: ModelConfig) -> ModelConfig:
  """``cfg`` without adapters (what base checkpoints hold and loaders read)."""
  return cfg.replace(lora_rank=0)


def has_adapters(state) -> bool:
  """Whether a model state holds any ``nnx.LoRAParam``."""
  return any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(state))


def trainable_filter(state):
  """What the optimizer trains: the adapters if the state has any, else every Param."""
  return nnx.LoRAParam if has_adapters(state) else nnx.Param


def reference_state(state):
  """The frozen base as a model state: ``state`` with every adapter zeroed (B = 0 suffices,
  but zeroing both keeps the reference free of the adapters' values entirely). The base
  arrays are shared, not copied."""
  adapters, rest = nnx.split_state(state, nnx.LoRAParam, ...)
  return nnx.merge_state(jax.tree.map(jnp.zeros_like, adapters), rest)


def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, scale: float,
                  stacked: bool) -> jax.Array:
  """W + scale * A B in W's shape and dtype (computed in float32); stacked: a leading layer
  axis on all three."""
  if stacked:
    return jax.vmap(lambda w, a, b: merged_weight(w, a, b, scale, False))(w, a, b)
  r = a.shape[-1]
  delta = (a.astype(jnp.float32).reshape(-1, r) @ b.astype(jnp.float32).reshape(r, -1))
  return (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)


def adapter_count(state) -> int:
  """Number of adapter values in a model state."""
  return int(sum(np.prod(v.shape) for _, v in nnx.to_flat_state(state)
                 if isinstance(v, nnx.LoRAParam)))
