"""Building blocks of the Qwen2-style decoder: annotated params, RMSNorm, RoPE, SwiGLU.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv_heads``,
``head_dim``, ``vocab``, ``latent``, ``norm``); ``unigrpo_jax.parallel`` maps them onto a mesh.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]


def annotated_param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
                    axes: Sequence[str | None], dtype, kind=nnx.Param) -> nnx.Param:
  """An ``nnx.Param`` (or subclass ``kind``, e.g. ``nnx.LoRAParam``) with logical sharding names
  (not eagerly sharded: parallel.py does it)."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {shape}")
  if _ABSTRACT.get():  # shapes only: no initializer runs and no key is drawn
    value = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
  else:
    value = init(rngs.params(), tuple(shape), dtype)
  return kind(value, out_sharding=tuple(axes), eager_sharding=False)


_ABSTRACT = contextvars.ContextVar("abstract_params", default=False)


@contextlib.contextmanager
def abstract_params():
  """Within: ``annotated_param`` makes ShapeDtypeStruct-valued params (what ``nnx.eval_shape``
  gives) without tracing anything.

  Why not ``nnx.eval_shape``: under it, flax's ``Variable.set_value`` reads ``.sharding`` of the
  traced RNG counter once per parameter, and JAX builds that AttributeError's message by walking
  every equation traced so far: quadratic in the parameter count. For BAGEL-7B-MoT (4,740
  arrays) one ``nnx.eval_shape`` of the model took ~190 s on the loaded 2-core VM, and the
  rollout's layout conversion did two of them inside its trace (``aot`` profile, 2026-12-07).
  """
  token = _ABSTRACT.set(True)
  try:
    yield
  finally:
    _ABSTRACT.reset(token)


def fan_in_init(fan_in_axes: int = 1) -> Initializer:
  """Normal init with std 1/sqrt(fan_in), fan_in the product of the first ``fan_in_axes`` dims."""

  def init(key, shape, dtype):
    fan_in = 1
    for d in shape[:fan_in_axes]:
      fan_in *= d
    return (jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(fan_in)).astype(dtype)

  return init


def zeros_init(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, computed in float32: ``x / rms(x) * scale``."""

  def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = annotated_param(rngs, ones_init, (dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half convention of Qwen2/LLaMA).

  Args:
    x: [B, L, H, D] queries or keys.
    positions: [B, L] integer position ids.
    theta: base of the frequencies.
  Returns:
    [B, L, H, D] in x's dtype.
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [D/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class SwiGLU(nnx.Module):
  """``down(silu(gate(x)) * up(x))``; x [..., D] -> [..., D]."""

  def __init__(self, hidden: int, mlp_dim: int, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.gate = annotated_param(rngs, fan_in_init(), (hidden, mlp_dim), ("embed", "mlp"),
                                param_dtype)
    self.up = annotated_param(rngs, fan_in_init(), (hidden, mlp_dim), ("embed", "mlp"),
                              param_dtype)
    self.down = annotated_param(rngs, fan_in_init(), (mlp_dim, hidden), ("mlp", "embed"),
                                param_dtype)

  def __call__(self, x: jax.Array, adapters=None) -> jax.Array:
    """adapters: the expert's ``lora.ExpertAdapters`` (None: the plain MLP)."""
    x = x.astype(self.dtype)
    gate = x @ self.gate[...].astype(self.dtype)
    up = x @ self.up[...].astype(self.dtype)
    if adapters is not None:
      gate, up = adapters.add("gate", gate, x), adapters.add("up", up, x)
    hidden = jax.nn.silu(gate) * up
    out = hidden @ self.down[...].astype(self.dtype)
    return out if adapters is None else adapters.add("down", out, hidden)
