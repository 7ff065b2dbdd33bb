"""The FLUX VAE's checkpoint format: BFL (or diffusers) key names <-> NNX paths, the architecture
read off the tensor shapes, and ``load_flux_vae`` (tensor reading: ``models/safetensors_io.py``)."""
from __future__ import annotations

import logging
import re
import time
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from unigrpo_jax.models.flux_vae.autoencoder import FluxAutoencoder
from unigrpo_jax.models.flux_vae.model import (BAGEL_SCALE_FACTOR, BAGEL_SHIFT_FACTOR, FluxVAE,
                                               FluxVAEConfig)
from unigrpo_jax import paths
from unigrpo_jax.models.safetensors_io import TensorIndex

log = logging.getLogger(__name__)


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
  if paths.isdir(path):
    path = paths.join(path, "ae.safetensors")
  if not paths.isfile(path):
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
