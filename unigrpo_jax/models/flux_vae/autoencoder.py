"""``FluxAutoencoder``: the FLUX VAE behind the project's ``Autoencoder`` interface, with BAGEL's
latent normalisation and 2x2 token patches."""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unigrpo_jax.models.autoencoder import Autoencoder
from unigrpo_jax.models.flux_vae.model import BAGEL_SCALE_FACTOR, BAGEL_SHIFT_FACTOR, FluxVAE
from unigrpo_jax.models.flux_vae.patches import patchify, unpatchify



class FluxAutoencoder(Autoencoder):
  """BAGEL-normalised FLUX VAE behind the project's ``Autoencoder`` interface.

  ``encode(images [B, H, W, 3] in [-1, 1], key=None) -> latents [B, H/f, W/f, z]`` (f = 8 for
  FLUX) and ``decode(latents) -> images [B, H, W, 3]`` work on spatial latents. ``decode`` also
  takes BAGEL's 2x2-patchified tokens ``[B, N, 4z]`` (N a square number; this is what the flow
  sampler produces, so the rollout can call it like ``PatchAutoencoder.decode``), and
  ``encode_tokens`` gives those tokens. ``latent_dim`` is the token width 4z; ``num_tokens`` is
  defined once an ``image_size`` is given. Both calls are jitted and can be called inside an
  enclosing ``jax.jit``; there the weights enter that computation as constants unless the caller
  passes them through as an argument (``decode(tokens, state=vae_state)``), which is what a
  full-size (335 MB) VAE inside a rollout should do.
  """

  def __init__(self, vae: FluxVAE, *, scale_factor: float = BAGEL_SCALE_FACTOR,
               shift_factor: float = BAGEL_SHIFT_FACTOR, image_size: Optional[int] = None):
    self.cfg = vae.cfg
    self.scale_factor, self.shift_factor = float(scale_factor), float(shift_factor)
    self.latent_dim = 4 * self.cfg.z_channels
    self.image_size = image_size
    if image_size is not None and image_size % (2 * self.cfg.downsample):
      raise ValueError(f"image_size={image_size} is not a multiple of {2 * self.cfg.downsample} "
                       f"(VAE factor {self.cfg.downsample} x 2x2 patches)")
    self.graphdef, self.state = nnx.split(vae)

  @property
  def num_tokens(self) -> int:
    if self.image_size is None:
      raise ValueError("FluxAutoencoder.num_tokens needs image_size (load_flux_vae(..., "
                       "image_size=N))")
    return (self.image_size // (2 * self.cfg.downsample)) ** 2

  @property
  def vae(self) -> FluxVAE:
    return nnx.merge(self.graphdef, self.state)

  # -- public API -------------------------------------------------------------------------------
  def _check_images(self, images):
    f, c = self.cfg.downsample, self.cfg.in_channels
    if images.ndim != 4 or images.shape[-1] != c or images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"FluxAutoencoder.encode wants images [B, H, W, {c}] with H, W multiples "
                       f"of {f}, got shape {tuple(images.shape)}")

  def encode(self, images, key: Optional[jax.Array] = None, *, state=None) -> jax.Array:
    """images [B, H, W, 3] in [-1, 1] -> normalised latents [B, H/f, W/f, z] (float32).

    state: the weights to use (default ``self.state``), e.g. a traced argument of a caller's jit.
    """
    images = jnp.asarray(images)
    self._check_images(images)
    state = self.state if state is None else state
    return _encode(self.graphdef, self.scale_factor, self.shift_factor, state, images, key)

  def encode_tokens(self, images, key: Optional[jax.Array] = None) -> jax.Array:
    """images [B, H, W, 3] -> BAGEL tokens [B, (H/2f)*(W/2f), 4z]."""
    return patchify(self.encode(images, key))

  def decode(self, latents, *, state=None) -> jax.Array:
    """latents [B, h, w, z] or tokens [B, N, 4z] (square grid) -> images [B, h*f, w*f, 3].

    state: the weights to use (default ``self.state``), e.g. a traced argument of a caller's jit.
    """
    latents = jnp.asarray(latents)
    zc = self.cfg.z_channels
    if latents.ndim == 3 and latents.shape[-1] == 4 * zc:
      grid = int(round(np.sqrt(latents.shape[1])))
      if grid * grid != latents.shape[1]:
        raise ValueError(f"FluxAutoencoder.decode: {latents.shape[1]} tokens is not a square "
                         f"grid; unpatchify non-square latents yourself")
      latents = unpatchify(latents, grid, grid)
    if latents.ndim != 4 or latents.shape[-1] != zc:
      raise ValueError(f"FluxAutoencoder.decode wants latents [B, h, w, {zc}] or tokens "
                       f"[B, N, {4 * zc}], got shape {tuple(latents.shape)}")
    state = self.state if state is None else state
    return _decode(self.graphdef, self.scale_factor, self.shift_factor, state, latents)


# Module-level jits keyed on the (hashable) graphdef: every FluxAutoencoder of one architecture
# shares the compiled code.
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _encode(graphdef, scale, shift, state, images, key):
  """images [B, H, W, C] -> BAGEL-normalised latents [B, H/f, W/f, z] (float32)."""
  vae = nnx.merge(graphdef, state)
  moments = vae.encoder(images.astype(state_dtype(state))).astype(jnp.float32)
  z = vae.cfg.z_channels
  mean, logvar = moments[..., :z], moments[..., z:]       # BFL chunks mean first, then logvar
  if key is not None:   # BAGEL's DiagonalGaussian(sample=True)
    mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
  return (mean - shift) * scale


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode(graphdef, scale, shift, state, latents):
  """BAGEL-normalised latents [B, h, w, z] -> images [B, h*f, w*f, C] (float32)."""
  vae = nnx.merge(graphdef, state)
  z = latents.astype(jnp.float32) / scale + shift
  return vae.decoder(z.astype(state_dtype(state))).astype(jnp.float32)


def state_dtype(state) -> jnp.dtype:
  """The (single) floating dtype of the VAE weights: activations run in it."""
  return jax.tree.leaves(state)[0].dtype
