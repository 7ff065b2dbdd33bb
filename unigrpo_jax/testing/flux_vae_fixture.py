"""Writes random FLUX-format ``ae.safetensors`` files for tests and smoke runs."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from unigrpo_jax.models.flux_vae.model import FluxVAEConfig
from unigrpo_jax.models.flux_vae.weights import expected_keys


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
