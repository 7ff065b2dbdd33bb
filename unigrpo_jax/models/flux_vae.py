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
import functools
import logging
import os
import re
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unigrpo_jax.models.image import Autoencoder
from unigrpo_jax.models.latent_patches import patchify, unpatchify
from unigrpo_jax.models.safetensors_io import TensorIndex

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------------------------
# The Autoencoder the project uses.


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


# ----------------------------------------------------------------------------------------------
# Checkpoint format: BFL key names <-> NNX paths, architecture inference (reading: safetensors_io).

_DIFFUSERS_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                   "to_out.0": "proj_out", "query": "q", "key": "k", "value": "v",
                   "proj_attn": "proj_out"}


def diffusers_to_bfl(keys: Sequence[str]) -> dict[str, str]:
  """Maps diffusers ``AutoencoderKL`` key names to BFL ones ({diffusers_key: bfl_key}).

  Keys that follow no rule map to themselves (and are then reported as unexpected).
  """
  ups = {int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
  n_up = max(ups) + 1 if ups else 0
  out = {}
  for key in keys:
    k = key
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.",
               r"encoder.down.\1.downsample.", k)
    # diffusers numbers decoder blocks coarse -> fine; BFL by resolution level (fine = 0).
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
               lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.", k)
    k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
    m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k)
    if m and m.group(2) in _DIFFUSERS_ATTN:
      k = f"{m.group(1)}.mid.attn_1.{_DIFFUSERS_ATTN[m.group(2)]}.{m.group(3)}"
    k = k.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
    out[key] = k
  return out


def infer_config(shapes: dict[str, tuple], path: str, *, num_groups: int = 32) -> FluxVAEConfig:
  """Reads ch, ch_mult, num_res_blocks, z/in/out channels off BFL-named tensor shapes."""
  def need(key):   # a conv weight [out, in, kh, kw] the architecture is read from
    if key not in shapes:
      raise ValueError(f"{path}: missing tensor {key!r} (cannot infer the VAE architecture)")
    if len(shapes[key]) != 4:
      raise ValueError(f"{path}: tensor {key!r} has shape {list(shapes[key])}, expected a 4-D "
                       f"conv weight [out, in, kh, kw]")
    return shapes[key]

  ch, in_ch = need("encoder.conv_in.weight")[:2]
  levels = sorted({int(m.group(1)) for k in shapes
                   if (m := re.match(r"encoder\.down\.(\d+)\.block\.", k))})
  if not levels or levels != list(range(len(levels))):
    raise ValueError(f"{path}: encoder.down.<i>.block levels are {levels}, expected 0..n-1")
  blocks = {int(m.group(1)) for k in shapes
            if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
  ch_mult = []
  for i in levels:
    key = f"encoder.down.{i}.block.0.conv1.weight"
    width = need(key)[0]
    if width % ch:
      raise ValueError(f"{path}: {key} has {width} output channels, not a multiple of ch={ch}")
    ch_mult.append(width // ch)
  z = need("decoder.conv_in.weight")[1]
  out_ch = need("decoder.conv_out.weight")[0]
  cfg = FluxVAEConfig(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=len(blocks), z_channels=z,
                      in_channels=in_ch, out_channels=out_ch, num_groups=num_groups)
  try:
    return cfg.validate()
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def _bfl_key(path: tuple) -> str:
  parts = [str(p) for p in path]
  parts[-1] = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
  return ".".join(parts)


def _torch_shape(shape: tuple) -> tuple:
  """NNX param shape -> the shape BFL stores: HWIO conv -> OIHW; [in, out] linear -> 1x1 conv."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0], 1, 1)
  return tuple(shape)


def _to_nnx(arr: np.ndarray, target_ndim: int) -> np.ndarray:
  if target_ndim == 4:
    return np.transpose(arr, (2, 3, 1, 0))
  if target_ndim == 2:
    return np.transpose(arr.reshape(arr.shape[0], arr.shape[1]))
  return arr


def expected_keys(cfg: FluxVAEConfig) -> dict[str, tuple]:
  """{BFL key: shape as stored in ae.safetensors} for a given architecture."""
  abstract = nnx.eval_shape(lambda: FluxVAE(cfg, rngs=nnx.Rngs(0)))
  _, state = nnx.split(abstract)
  return {_bfl_key(p): _torch_shape(v.shape) for p, v in nnx.to_flat_state(state)}


def load_flux_vae(path: str, *, dtype="float32", num_groups: int = 32,
                  scale_factor: float = BAGEL_SCALE_FACTOR,
                  shift_factor: float = BAGEL_SHIFT_FACTOR,
                  image_size: Optional[int] = None) -> FluxAutoencoder:
  """Loads a FLUX-format ``ae.safetensors`` (BFL or diffusers key names) as a FluxAutoencoder.

  path: the file, or a directory holding ``ae.safetensors``. The architecture is inferred from
  the tensor shapes; ``num_groups`` (GroupNorm groups, 32 for FLUX) is not visible in the weights.
  Every key and shape is checked before any tensor is read; tensors are then read one at a time
  (peak host memory about one tensor above the final weights). Unknown extra tensors are logged
  once and ignored; quant convs (an SD-style VAE, not FLUX) are an error.
  """
  if os.path.isdir(path):
    path = os.path.join(path, "ae.safetensors")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  t0 = time.perf_counter()
  tensors = TensorIndex([path])  # header checked: dtypes, sizes, truncation
  if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in tensors.shapes):
    names = diffusers_to_bfl(list(tensors.shapes))  # {file key: BFL key}
  else:
    names = {k: k for k in tensors.shapes}
  quant = [k for k in names.values() if k.startswith(("quant_conv.", "post_quant_conv."))]
  if quant:
    raise ValueError(f"{path}: has {quant[0]!r}: a VAE with quant convs is not FLUX-format")
  bfl_shapes = {}
  for file_key, bfl in names.items():
    shape = tensors.shapes[file_key]
    if re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight", bfl) and \
        len(shape) == 2:
      shape = shape + (1, 1)                         # diffusers stores these as linear weights
    bfl_shapes[bfl] = shape
  cfg = infer_config(bfl_shapes, path, num_groups=num_groups)
  expected = expected_keys(cfg)
  by_key = {b: f for f, b in names.items()}     # {BFL key: the file's own key}
  named = lambda k: repr(k) if by_key.get(k, k) == k else f"{by_key[k]!r} (BFL {k!r})"
  missing = [k for k in expected if k not in bfl_shapes]
  if missing:
    raise ValueError(f"{path}: missing {len(missing)} tensor(s) for the inferred architecture "
                     f"{cfg}, first {missing[0]!r}")
  for key, shape in expected.items():
    if bfl_shapes[key] != shape:
      raise ValueError(f"{path}: tensor {named(key)} has shape {list(bfl_shapes[key])}, "
                       f"expected {list(shape)} for the inferred architecture {cfg}")
  extras = sorted(k for k in bfl_shapes if k not in expected)
  if extras:
    log.warning("%s: ignoring %d unexpected tensor(s): %s", path, len(extras),
                ", ".join(by_key.get(k, k) for k in extras))

  jdtype = jnp.dtype(dtype)
  abstract = nnx.eval_shape(lambda: FluxVAE(cfg, dtype=jdtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = []
  for p, var in nnx.to_flat_state(state):
    key = _bfl_key(p)
    arr = _to_nnx(tensors.read(by_key[key]).reshape(expected[key]), len(var.shape))
    flat.append((p, var.replace(jnp.asarray(arr, jdtype))))
    del arr
  state = nnx.from_flat_state(flat)
  vae = nnx.merge(graphdef, state)
  log.info("loaded FLUX VAE %s from %s in %.1fs", cfg, path, time.perf_counter() - t0)
  return FluxAutoencoder(vae, scale_factor=scale_factor, shift_factor=shift_factor,
                         image_size=image_size)


def write_random_flux_ae(path: str, *, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4),
                         num_res_blocks: int = 2, z_channels: int = 16, in_channels: int = 3,
                         out_channels: int = 3, seed: int = 0, dtype=np.float32) -> str:
  """Writes a random BFL-format ``ae.safetensors`` (numpy + safetensors only) and returns its path.

  path: a file path, or a directory to write ``ae.safetensors`` into. Conv/linear weights are
  N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.02^2): outputs stay O(1) through the
  stack, and no weight is trivially 0/1 (so a swapped tensor shows in a parity test).
  """
  from safetensors.numpy import save_file

  cfg = FluxVAEConfig(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                      z_channels=z_channels, in_channels=in_channels, out_channels=out_channels,
                      num_groups=1)   # groups do not change any weight shape
  if os.path.isdir(path) or path.endswith(os.sep):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, "ae.safetensors")
  rng = np.random.default_rng(seed)
  tensors = {}
  for key, shape in expected_keys(cfg).items():
    if len(shape) == 4:
      w = rng.standard_normal(shape) / np.sqrt(shape[1] * shape[2] * shape[3])
    elif key.endswith(".weight"):   # GroupNorm scale
      w = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      w = 0.02 * rng.standard_normal(shape)
    tensors[key] = w.astype(dtype)
  save_file(tensors, path)
  return path
