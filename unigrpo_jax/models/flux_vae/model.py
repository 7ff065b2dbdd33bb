"""The FLUX autoencoder (as BAGEL ships it in ``ae.safetensors``) in Flax NNX, NHWC.

Architecture (BFL ``flux/modules/autoencoder.py``, identical in BAGEL ``modeling/autoencoder.py``):
GroupNorm(num_groups, eps 1e-6) + swish pre-activation ResnetBlocks with a 1x1 ``nin_shortcut``
where the width changes; ``Downsample`` = zero pad right/bottom by one, then a 3x3 stride-2 conv;
``Upsample`` = nearest x2 then a 3x3 conv; one single-head self-attention block in each ``mid``
(1x1 q/k/v/proj_out, stored as 1x1 convs); the encoder's ``conv_out`` gives mean | logvar
(2 * z channels); no quant convs. FLUX-dev/schnell: ch 128, ch_mult (1, 2, 4, 4), 2 res blocks per
encoder level (3 per decoder level), z 16, 32 groups: 84M parameters, 335 MB in float32.

Module attribute names mirror BFL's state-dict keys, so a key maps to an NNX path by splitting on
dots (``encoder.down.1.block.0.conv1.weight`` -> ``encoder/down/1/block/0/conv1/kernel``); the
expected key set and every expected shape are derived from the abstract module (one source of
truth), never written out by hand.

Latents follow BAGEL: ``encode`` gives ``(z - shift) * scale`` (shift 0.1159, scale 0.3611) of the
posterior mean (or of a posterior sample when ``key`` is given, as BAGEL's own encoder does),
``decode`` undoes that first. Images are NHWC in [-1, 1].
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


BAGEL_SCALE_FACTOR = 0.3611
BAGEL_SHIFT_FACTOR = 0.1159
GROUPNORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class FluxVAEConfig:
  """Shape of a FLUX-format autoencoder. ``num_groups`` is not visible in the weights (FLUX: 32)."""
  ch: int = 128
  ch_mult: tuple = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 16
  in_channels: int = 3
  out_channels: int = 3
  num_groups: int = 32

  @property
  def downsample(self) -> int:
    """Spatial reduction factor image -> latent (8 for FLUX)."""
    return 2 ** (len(self.ch_mult) - 1)

  def validate(self) -> "FluxVAEConfig":
    if not self.ch_mult or any(m < 1 for m in self.ch_mult):
      raise ValueError(f"FluxVAEConfig.ch_mult must be positive integers, got {self.ch_mult}")
    for width in sorted({self.ch * m for m in self.ch_mult}):
      if width % self.num_groups:
        raise ValueError(f"FluxVAEConfig: channel width {width} is not divisible by "
                         f"num_groups={self.num_groups}")
    return self


# ----------------------------------------------------------------------------------------------
# Modules (NHWC).


def _norm(c: int, cfg: FluxVAEConfig, dtype, rngs) -> nnx.GroupNorm:
  # use_fast_variance=False: E[(x-m)^2] like torch, not E[x^2]-m^2 (cancellation at 1e-4 tol).
  return nnx.GroupNorm(c, num_groups=cfg.num_groups, epsilon=GROUPNORM_EPS,
                       use_fast_variance=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _conv(cin: int, cout: int, k: int, dtype, rngs, *, stride: int = 1, padding="SAME"):
  pad = ((k // 2, k // 2),) * 2 if padding == "SAME" else padding
  return nnx.Conv(cin, cout, kernel_size=(k, k), strides=(stride, stride), padding=pad,
                  dtype=dtype, param_dtype=dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
  """x [B, H, W, cin] -> [B, H, W, cout]: x' + conv2(swish(norm2(conv1(swish(norm1(x))))))."""

  def __init__(self, cin: int, cout: int, cfg: FluxVAEConfig, dtype, rngs: nnx.Rngs):
    self.norm1 = _norm(cin, cfg, dtype, rngs)
    self.conv1 = _conv(cin, cout, 3, dtype, rngs)
    self.norm2 = _norm(cout, cfg, dtype, rngs)
    self.conv2 = _conv(cout, cout, 3, dtype, rngs)
    self.nin_shortcut = _conv(cin, cout, 1, dtype, rngs) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over all H*W positions: x [B, H, W, C] -> same shape."""

  def __init__(self, c: int, cfg: FluxVAEConfig, dtype, rngs: nnx.Rngs):
    self.norm = _norm(c, cfg, dtype, rngs)
    # 1x1 convs in the checkpoint; in NHWC they are plain matmuls over the channel axis.
    lin = lambda: nnx.Linear(c, c, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.q, self.k, self.v, self.proj_out = lin(), lin(), lin(), lin()

  def __call__(self, x):
    b, hh, ww, c = x.shape
    h = self.norm(x).reshape(b, hh * ww, c)
    q, k, v = self.q(h), self.k(h), self.v(h)
    scores = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / np.sqrt(c)
    attn = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = self.proj_out(jnp.einsum("bqk,bkc->bqc", attn, v))
    return x + out.reshape(b, hh, ww, c)


class Downsample(nnx.Module):
  """[B, H, W, C] -> [B, H/2, W/2, C]: pad one zero row/column at the bottom/right, 3x3 stride 2."""

  def __init__(self, c: int, dtype, rngs: nnx.Rngs):
    self.conv = _conv(c, c, 3, dtype, rngs, stride=2, padding="VALID")

  def __call__(self, x):
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """[B, H, W, C] -> [B, 2H, 2W, C]: nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, c: int, dtype, rngs: nnx.Rngs):
    self.conv = _conv(c, c, 3, dtype, rngs)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Mid(nnx.Module):
  """ResnetBlock -> AttnBlock -> ResnetBlock at constant width."""

  def __init__(self, c: int, cfg: FluxVAEConfig, dtype, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(c, c, cfg, dtype, rngs)
    self.attn_1 = AttnBlock(c, cfg, dtype, rngs)
    self.block_2 = ResnetBlock(c, c, cfg, dtype, rngs)

  def __call__(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


class Level(nnx.Module):
  """One resolution: a list of ResnetBlocks, then an optional Downsample/Upsample."""

  def __init__(self, blocks: list, resample: Optional[nnx.Module], name: str):
    self.block = nnx.List(blocks)
    if name == "downsample":
      self.downsample = resample
    else:
      self.upsample = resample

  def blocks(self, x):
    for blk in self.block:
      x = blk(x)
    return x


class Encoder(nnx.Module):
  """images [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * z_channels] (mean | logvar)."""

  def __init__(self, cfg: FluxVAEConfig, dtype, rngs: nnx.Rngs):
    self.conv_in = _conv(cfg.in_channels, cfg.ch, 3, dtype, rngs)
    levels, block_in = [], cfg.ch
    for i, mult in enumerate(cfg.ch_mult):
      block_out = cfg.ch * mult
      blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out, cfg, dtype, rngs)
                for j in range(cfg.num_res_blocks)]
      last = i == len(cfg.ch_mult) - 1
      levels.append(Level(blocks, None if last else Downsample(block_out, dtype, rngs),
                          "downsample"))
      block_in = block_out
    self.down = nnx.List(levels)
    self.mid = Mid(block_in, cfg, dtype, rngs)
    self.norm_out = _norm(block_in, cfg, dtype, rngs)
    self.conv_out = _conv(block_in, 2 * cfg.z_channels, 3, dtype, rngs)

  def __call__(self, x):
    h = self.conv_in(x)
    for level in self.down:
      h = level.blocks(h)
      if level.downsample is not None:
        h = level.downsample(h)
    h = self.mid(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
  """z [B, h, w, z_channels] (raw, un-normalised) -> images [B, h*f, w*f, out_channels]."""

  def __init__(self, cfg: FluxVAEConfig, dtype, rngs: nnx.Rngs):
    n = len(cfg.ch_mult)
    block_in = cfg.ch * cfg.ch_mult[-1]
    self.conv_in = _conv(cfg.z_channels, block_in, 3, dtype, rngs)
    self.mid = Mid(block_in, cfg, dtype, rngs)
    levels: list = [None] * n
    # Built top (coarsest) first like BFL, but stored at index = resolution level, so ``up.0``
    # is the finest level (diffusers' up_blocks are numbered the other way round).
    for i in reversed(range(n)):
      block_out = cfg.ch * cfg.ch_mult[i]
      blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out, cfg, dtype, rngs)
                for j in range(cfg.num_res_blocks + 1)]
      levels[i] = Level(blocks, Upsample(block_out, dtype, rngs) if i != 0 else None, "upsample")
      block_in = block_out
    self.up = nnx.List(levels)
    self.norm_out = _norm(block_in, cfg, dtype, rngs)
    self.conv_out = _conv(block_in, cfg.out_channels, 3, dtype, rngs)

  def __call__(self, z):
    h = self.mid(self.conv_in(z))
    for level in reversed(list(self.up)):
      h = level.blocks(h)
      if level.upsample is not None:
        h = level.upsample(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))


class FluxVAE(nnx.Module):
  """The encoder/decoder pair; raw (un-normalised) latents. See ``FluxAutoencoder`` for BAGEL's."""

  def __init__(self, cfg: FluxVAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg.validate()
    self.encoder = Encoder(cfg, dtype, rngs)
    self.decoder = Decoder(cfg, dtype, rngs)
