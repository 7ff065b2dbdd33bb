"""Writing ``UnifiedModel`` back in BAGEL's format (``ema.safetensors`` + ``llm_config.json``)."""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import numpy as np
from flax import nnx

from unigrpo_jax.models.safetensors_io import TensorIndex, numpy_dtype, write_streaming
from unigrpo_jax.models.unified import layout
from unigrpo_jax.models.unified.config import ModelConfig
from unigrpo_jax.models.unified.lora_io import merge_adapters
from unigrpo_jax.models.unified.model import UnifiedModel, abstract_model
from unigrpo_jax.models.unified.weights import (BAGEL_PATCH, BAGEL_SKIPPED_PREFIXES,
                                                BAGEL_VAE_DOWNSAMPLE, bagel_key_map,
                                                bagel_llm_config, flat_state, leaf_value,
                                                their_shape, to_theirs)


def _check_bagel_format(cfg: ModelConfig):
  need = dict(mot=True, qk_norm=True, tie_embeddings=False, qkv_bias=True,
              vae_downsample=BAGEL_VAE_DOWNSAMPLE, patch_size=BAGEL_PATCH)
  for name, want in need.items():
    if getattr(cfg, name) != want:
      raise ValueError(f"save_bagel: ModelConfig.{name}={getattr(cfg, name)!r}, BAGEL's format "
                       f"needs {want!r}")
  if not cfg.max_latent_size or not cfg.block_markers:
    raise ValueError("save_bagel: the model must use BAGEL's conventions (max_latent_size > 0 "
                     "and vision_start_id / vision_end_id set)")


def _host_array(x) -> np.ndarray:
  """A (possibly sharded, possibly multi-host) array gathered to this host as numpy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def save_bagel(model: UnifiedModel, path: str, *, dtype: str = "bfloat16",
               state: Optional[nnx.State] = None, source: Optional[str] = None,
               merge_lora: bool = False) -> list:
  """Writes ``path/ema.safetensors`` (BAGEL's key names and shapes) and ``path/llm_config.json``.

  ``state`` (e.g. a trained ``TrainState.params``) overrides the model's own arrays. ``source``,
  the original BAGEL directory, adds its ViT / connector / ``vit_pos_embed`` tensors unchanged,
  so the file is a complete BAGEL ``ema.safetensors`` (``load_state_dict(strict=True)``);
  without it BAGEL loads the file with ``strict=False`` (those keys missing). The file is
  streamed: one tensor (gathered from its shards) in host memory at a time; on a pod every
  process gathers and process 0 writes. Returns the written keys.

  A model with LoRA adapters needs ``merge_lora=True``: the file then holds the merged weights
  ``W + alpha / r * A B`` (``lora_io.merge_adapters``), a plain BAGEL checkpoint. (The
  adapters alone: ``lora_io.save_lora``.)
  """
  if model.cfg.lora_rank:
    if not merge_lora:
      raise ValueError("save_bagel: the model has LoRA adapters; pass merge_lora=True to write "
                       "the merged weights, or use lora_io.save_lora for the adapters alone")
    full = nnx.state(model)
    if state is not None:  # e.g. a TrainState's params: the model's other variables come along
      full = nnx.merge_state(nnx.state(model, nnx.Not(nnx.Param)), state)
    base_cfg, base_state = merge_adapters(full, model.cfg)
    graphdef = nnx.split(abstract_model(base_cfg))[0]
    model, state = nnx.merge(graphdef, base_state), None
  cfg = model.cfg
  _check_bagel_format(cfg)
  target = numpy_dtype(dtype)
  # BAGEL's keys are per layer: a stacked (scan_layers) state is split back first.
  source_state = state if state is not None else nnx.state(model)
  flat = flat_state(layout.convert_state(
      source_state, cfg, False, var_filter=nnx.Param if state is not None else ...))
  cfg = layout.per_layer(cfg)
  specs = []
  for our, key, kind in bagel_key_map(cfg):
    leaf = leaf_value(flat[our])
    produce = lambda leaf=leaf, kind=kind: to_theirs(kind, _host_array(leaf).astype(target))
    specs.append((key, target, their_shape(kind, tuple(leaf.shape)), produce))
  if source is not None:
    index = TensorIndex.from_path(source, "ema.safetensors")
    for key in sorted(k for k in index.shapes if k.startswith(BAGEL_SKIPPED_PREFIXES)):
      specs.append((key, target, index.shapes[key],
                    lambda key=key: index.read(key).astype(target)))
  if jax.process_index() != 0:  # gather collectively, write once
    for spec in specs:
      spec[3]()
    return [s[0] for s in specs]
  os.makedirs(path, exist_ok=True)
  write_streaming(os.path.join(path, "ema.safetensors"), specs, metadata={"format": "pt"})
  with open(os.path.join(path, "llm_config.json"), "w") as f:
    json.dump(bagel_llm_config(cfg), f, indent=2)
  return sorted(s[0] for s in specs)
