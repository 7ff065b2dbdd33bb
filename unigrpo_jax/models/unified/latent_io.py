"""Image side of the unified model: latent tokens in, velocity out.

A latent token is ``vae2llm(x_t) + time_embed(t) + pos_embed[n]`` on the way in, and the
generation expert's last hidden state goes through ``llm2vae`` (zero-initialised, so a fresh
model predicts zero velocity) on the way out. The autoencoder that makes the latents is
``models/autoencoder.py``.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unigrpo_jax.models.unified.config import ModelConfig
from unigrpo_jax.models.unified.layers import annotated_param, fan_in_init, zeros_init


def timestep_sinusoid(t: jax.Array, dim: int, scale: float, max_period: float = 10000.0):
  """[...] times in [0, 1] -> [..., dim] float32 sinusoidal features (cos | sin)."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = (t.astype(jnp.float32) * scale)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def sincos_2d(grid: int, dim: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding of a grid x grid raster: [grid*grid, dim] float32.

  Half of the channels encode the row, half the column (each as sin | cos of dim/4 frequencies).
  """
  quarter = dim // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

  def embed(pos):
    angles = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([embed(rows), embed(cols)], axis=1).astype(np.float32)


def bagel_sincos_table(max_latent_size: int, dim: int) -> np.ndarray:
  """BAGEL's ``latent_pos_embed`` table: [max_latent_size**2, dim] float32.

  Row ``row * max_latent_size + col``; the first dim/2 channels encode the COLUMN and the last
  dim/2 the row (BAGEL meshgrids (w, h)), each as sin | cos of dim/4 frequencies
  ``1 / 10000**(i / (dim/4))``. Real checkpoints store this table; it is only computed for models
  that start from a checkpoint without one (e.g. a Qwen2 backbone).
  """
  quarter = dim // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(max_latent_size), np.arange(max_latent_size), indexing="ij")

  def embed(pos):
    angles = pos.reshape(-1)[:, None].astype(np.float64) * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([embed(cols), embed(rows)], axis=1).astype(np.float32)


def latent_position_ids(grid: int, max_latent_size: int) -> np.ndarray:
  """[grid*grid] int32 table rows of a grid x grid raster: ``row * max_latent_size + col``."""
  return (np.arange(grid)[:, None] * max_latent_size + np.arange(grid)[None]).reshape(-1).astype(
      np.int32)


class FixedTable(nnx.Variable):
  """A stored constant (BAGEL's ``latent_pos_embed``): part of the model state and of checkpoints,
  never an ``nnx.Param``, so no optimizer updates it (BAGEL freezes it too)."""


class LatentIO(nnx.Module):
  """``vae2llm`` + timestep MLP + position table in, zero-initialised ``llm2vae`` out."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd, d = cfg.weight_dtype, cfg.hidden
    self.cfg = cfg
    self.vae2llm_kernel = annotated_param(rngs, fan_in_init(), (cfg.latent_dim, d),
                                          ("latent", "embed"), pd)
    self.vae2llm_bias = annotated_param(rngs, zeros_init, (d,), ("embed",), pd)
    self.time_in = annotated_param(rngs, fan_in_init(), (cfg.timestep_freq_dim, d),
                                   (None, "embed"), pd)
    self.time_in_bias = annotated_param(rngs, zeros_init, (d,), ("embed",), pd)
    self.time_out = annotated_param(rngs, fan_in_init(), (d, d), ("mlp", "embed"), pd)
    self.time_out_bias = annotated_param(rngs, zeros_init, (d,), ("embed",), pd)
    self.llm2vae_kernel = annotated_param(rngs, zeros_init, (d, cfg.latent_dim),
                                          ("embed", "latent"), pd)
    self.llm2vae_bias = annotated_param(rngs, zeros_init, (cfg.latent_dim,), ("latent",), pd)
    if cfg.max_latent_size:
      table = bagel_sincos_table(cfg.max_latent_size, d)
      self.pos_embed = FixedTable(jnp.asarray(table, pd), out_sharding=(None, "embed"),
                                  eager_sharding=False)

  def embed(self, x: jax.Array, t: jax.Array) -> jax.Array:
    """x: [B, K, N, latent_dim] noisy latents, t: [B, K] times -> [B, K, N, hidden]."""
    dt = self.cfg.compute_dtype
    tok = x.astype(dt) @ self.vae2llm_kernel[...].astype(dt) + self.vae2llm_bias[...].astype(dt)
    feats = timestep_sinusoid(t, self.cfg.timestep_freq_dim, self.cfg.timestep_scale)
    temb = jax.nn.silu(feats.astype(dt) @ self.time_in[...].astype(dt)
                       + self.time_in_bias[...].astype(dt))
    temb = temb @ self.time_out[...].astype(dt) + self.time_out_bias[...].astype(dt)
    return tok + temb[:, :, None, :] + self.positions().astype(dt)

  def positions(self) -> jax.Array:
    """[N, hidden] position embedding of the N = latent_grid**2 tokens (row-major)."""
    cfg = self.cfg
    if cfg.max_latent_size:  # BAGEL: rows row * max_latent_size + col of the stored table
      ids = latent_position_ids(cfg.latent_grid, cfg.max_latent_size)
      return jnp.take(self.pos_embed[...], jnp.asarray(ids), axis=0)
    # A fixed table, not state: built in NumPy at trace time and folded in as a constant.
    return jnp.asarray(sincos_2d(cfg.latent_grid, cfg.hidden))

  def velocity(self, h: jax.Array) -> jax.Array:
    """h: [B, K, N, hidden] normed hidden states -> [B, K, N, latent_dim] float32 velocity."""
    v = h @ self.llm2vae_kernel[...].astype(h.dtype) + self.llm2vae_bias[...].astype(h.dtype)
    return v.astype(jnp.float32)
