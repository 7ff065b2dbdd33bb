"""The autoencoder interface between pixels and latent tokens, and its toy implementation.

``PatchAutoencoder`` (pixel patches, the toy world) and ``flux_vae.autoencoder.FluxAutoencoder``
(BAGEL's FLUX VAE) implement it; the rollout and the trainers only see ``Autoencoder``.
"""
from __future__ import annotations

import abc

import einops
import jax
import jax.numpy as jnp

from unigrpo_jax.models.unified.config import ModelConfig


class Autoencoder(abc.ABC):
  """Maps images to sequences of latent tokens and back. Implementations: pixel patches here;
  a FLUX-VAE wrapper plugs in by implementing the same three members."""

  num_tokens: int
  latent_dim: int

  @abc.abstractmethod
  def encode(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] in [-1, 1] -> tokens [B, N, latent_dim]."""

  @abc.abstractmethod
  def decode(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, N, latent_dim] -> images [B, H, W, C] in about [-1, 1]."""


class PatchAutoencoder(Autoencoder):
  """The identity autoencoder on non-overlapping pixel patches (for toy worlds)."""

  def __init__(self, image_size: int, patch_size: int, channels: int = 3):
    if image_size % patch_size:
      raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
    self.grid = image_size // patch_size
    self.num_tokens = self.grid ** 2
    self.latent_dim = channels * patch_size ** 2

  @classmethod
  def for_model(cls, cfg: ModelConfig) -> "PatchAutoencoder":
    if cfg.vae_downsample != 1:
      raise ValueError("PatchAutoencoder needs ModelConfig.vae_downsample == 1 (pixel latents)")
    return cls(cfg.image_size, cfg.patch_size, cfg.image_channels)

  def encode(self, images):
    return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)",
                            p=self.patch_size, q=self.patch_size)

  def decode(self, tokens):
    return einops.rearrange(tokens, "b (h w) (p q c) -> b (h p) (w q) c", h=self.grid,
                            p=self.patch_size, q=self.patch_size)


def to_uint8(images: jax.Array) -> jax.Array:
  """[..., C] images in [-1, 1] -> uint8 in [0, 255] (clipped)."""
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def from_uint8(images) -> jax.Array:
  """uint8 [..., C] -> float32 in [-1, 1]."""
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0
