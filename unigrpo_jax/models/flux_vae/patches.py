"""2x2 patchify of VAE latents into LLM tokens, in BAGEL's order.

BAGEL (``modeling/bagel/bagel.py``) turns a latent ``[C, 2h, 2w]`` into ``h*w`` tokens of ``4C``
features with ``reshape(C, h, 2, w, 2)`` and ``einsum("chpwq->hwpqc")``. So in NHWC terms

    tokens[b, row * w + col, p * 2C + q * C + c] = latents[b, 2 * row + p, 2 * col + q, c]

with ``p`` the vertical and ``q`` the horizontal sub-pixel and the channel fastest. This is NOT
FLUX's transformer packing ``"(c ph pw)"`` (channel slowest); the two give the same shapes, so
using the wrong one fails silently against BAGEL's ``vae2llm`` / ``llm2vae`` weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def patchify(latents: jax.Array) -> jax.Array:
  """latents [B, 2h, 2w, C] -> tokens [B, h*w, 4C] (BAGEL order, see module docstring)."""
  if latents.ndim != 4:
    raise ValueError(f"patchify wants latents [B, 2h, 2w, C], got shape {tuple(latents.shape)}")
  b, hh, ww, c = latents.shape
  if hh % 2 or ww % 2:
    raise ValueError(f"patchify needs even latent height/width, got {hh}x{ww}")
  h, w = hh // 2, ww // 2
  x = jnp.reshape(latents, (b, h, 2, w, 2, c))            # b, row, p, col, q, c
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))                 # b, row, col, p, q, c
  return jnp.reshape(x, (b, h * w, 4 * c))


def unpatchify(tokens: jax.Array, h: int, w: int) -> jax.Array:
  """tokens [B, h*w, 4C] -> latents [B, 2h, 2w, C]; the exact inverse of ``patchify``."""
  if tokens.ndim != 3:
    raise ValueError(f"unpatchify wants tokens [B, h*w, 4C], got shape {tuple(tokens.shape)}")
  b, n, d = tokens.shape
  if n != h * w:
    raise ValueError(f"unpatchify: {n} tokens is not h*w = {h}*{w}")
  if d % 4:
    raise ValueError(f"unpatchify: token width {d} is not 4 * channels")
  c = d // 4
  x = jnp.reshape(tokens, (b, h, w, 2, 2, c))             # b, row, col, p, q, c
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))                 # b, row, p, col, q, c
  return jnp.reshape(x, (b, 2 * h, 2 * w, c))
