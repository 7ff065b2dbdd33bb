"""Loads an HF ``CLIPModel`` directory (config.json + safetensors) into ``models.clip.CLIPModel``.

The directory is validated completely before any tensor is read or anything is compiled: the
config fields, that every expected tensor exists, that no unexpected one does (a config with the
wrong number of layers shows up here), and every shape (read from the safetensors headers).
Each problem raises ``CLIPLoadError`` with one line naming the directory, the key, the expected
and the found value. Tensors are then read one at a time with ``safetensors.safe_open`` (numpy),
cast to float32 (F32, F16 and BF16 checkpoints load alike), so peak host memory is about one
float32 copy of the weights.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors can then read BF16)
import numpy as np
from flax import nnx

from unigrpo_jax import paths
from unigrpo_jax.models.clip.model import CLIPConfig, CLIPModel, CLIPTowerConfig
from unigrpo_jax.models.safetensors_io import CheckpointFormatError, TensorIndex, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Non-parameter buffers that older transformers versions saved; they carry nothing we need.
_IGNORED_SUFFIXES = ("position_ids",)

# HF CLIPTextConfig / CLIPVisionConfig defaults: save_pretrained writes only non-default values.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5)
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings", "eos_token_id", "num_channels",
               "image_size", "patch_size")


class CLIPLoadError(ValueError):
  """A CLIP directory that cannot be loaded (one line naming the file / key / field)."""


def _read_json(path: str) -> Any:
  if not paths.isfile(path):
    raise CLIPLoadError(f"{path}: file not found")
  try:
    return json.loads(paths.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CLIPLoadError(f"{path}: not valid JSON ({e})") from None


def _tower(raw: dict, defaults: dict, where: str) -> CLIPTowerConfig:
  if not isinstance(raw, dict):
    raise CLIPLoadError(f"{where}: expected an object, got {type(raw).__name__}")
  values = {k: raw.get(k, v) for k, v in defaults.items()}
  for k in _INT_FIELDS:
    if k in values and (not isinstance(values[k], int) or isinstance(values[k], bool)
                        or values[k] <= 0):
      raise CLIPLoadError(f"{where}.{k}: must be a positive integer, got {values[k]!r}")
  if not isinstance(values["layer_norm_eps"], (int, float)) or values["layer_norm_eps"] <= 0:
    raise CLIPLoadError(f"{where}.layer_norm_eps: must be a positive number, "
                        f"got {values['layer_norm_eps']!r}")
  try:
    return CLIPTowerConfig(**values)
  except ValueError as e:
    raise CLIPLoadError(f"{where}: {e}") from None


def read_config(directory: str) -> CLIPConfig:
  """``directory/config.json`` -> CLIPConfig (HF defaults for absent fields)."""
  path = paths.join(directory, "config.json")
  raw = _read_json(path)
  if not isinstance(raw, dict):
    raise CLIPLoadError(f"{path}: expected a JSON object")
  towers = {}
  for name, defaults in (("text", _TEXT_DEFAULTS), ("vision", _VISION_DEFAULTS)):
    # Very old configs carry the sub-config as "<name>_config_dict" (HF reads either).
    sub = raw.get(f"{name}_config", raw.get(f"{name}_config_dict"))
    if sub is None:
      raise CLIPLoadError(f"{path}: no '{name}_config' (is this a CLIPModel directory? "
                          f"model_type={raw.get('model_type')!r})")
    towers[name] = _tower(sub, defaults, f"{path}: {name}_config")
  proj = raw.get("projection_dim", 512)
  if not isinstance(proj, int) or proj <= 0:
    raise CLIPLoadError(f"{path}: projection_dim must be a positive integer, got {proj!r}")
  v = towers["vision"]
  if v.image_size % v.patch_size:
    raise CLIPLoadError(f"{path}: vision_config.image_size {v.image_size} is not a multiple of "
                        f"patch_size {v.patch_size}")
  return CLIPConfig(text=towers["text"], vision=v, projection_dim=proj)


def tensor_files(directory: str) -> dict[str, str]:
  """key -> safetensors file holding it (single file, or a sharded index's weight_map)."""
  single, index = paths.join(directory, SINGLE_FILE), paths.join(directory, INDEX_FILE)
  if paths.isfile(index):
    raw = _read_json(index)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
      raise CLIPLoadError(f"{index}: no 'weight_map' object")
    out = {}
    for key, fname in weight_map.items():
      path = paths.join(directory, fname)
      if not paths.isfile(path):
        raise CLIPLoadError(f"{index}: shard {fname!r} (holding {key!r}) not found")
      out[key] = path
    return out
  if paths.isfile(single):
    try:
      return {k: single for k in read_header(single)}
    except CheckpointFormatError as e:  # a truncated / non-safetensors file
      raise CLIPLoadError(f"cannot read safetensors header: {e}") from None
  present = paths.listdir(directory) if paths.isdir(directory) else None
  if present is None:
    raise CLIPLoadError(f"{directory}: CLIP model directory not found")
  raise CLIPLoadError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (found {present}; "
                      "pytorch_model.bin is not read: save the model with safetensors)")


def abstract_model(cfg: CLIPConfig):
  """(graphdef, flat state of ShapeDtypeStruct-like Params): the expected tensors, no memory."""
  model = nnx.eval_shape(lambda: CLIPModel(cfg))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_flat_state(state)


def _key(path) -> str:
  return ".".join(map(str, path))


def _check(directory: str, files: dict[str, str], flat) -> TensorIndex:
  """Every expected tensor present with its shape; -> the index that reads them."""
  expected = {_key(path): tuple(v.shape) for path, v in flat}
  present = {k for k in files if not k.endswith(_IGNORED_SUFFIXES)}
  missing = sorted(set(expected) - present)
  if missing:
    raise CLIPLoadError(f"{directory}: missing tensor {missing[0]!r} ({len(missing)} missing in "
                        "all; the config.json may not match the weights)")
  unexpected = sorted(present - set(expected))
  if unexpected:
    raise CLIPLoadError(f"{directory}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} "
                        "in all): config.json does not match the weights")
  try:
    index = TensorIndex(sorted(set(files.values())))
  except CheckpointFormatError as e:
    raise CLIPLoadError(str(e)) from None
  for key in expected:
    if key not in index.shapes:
      raise CLIPLoadError(f"{files[key]}: tensor {key!r} (named by {INDEX_FILE}) is not in it")
    found = tuple(index.shapes[key])
    if found != expected[key]:
      raise CLIPLoadError(f"{files[key]}: tensor {key!r} has shape {found}, but config.json "
                          f"implies {expected[key]}")
  return index


def load_clip_state(directory: str):
  """-> (CLIPConfig, graphdef, nnx.State of float32 numpy arrays). Validates first."""
  directory = os.fspath(directory)
  cfg = read_config(directory)
  files = tensor_files(directory)
  graphdef, flat = abstract_model(cfg)
  index = _check(directory, files, flat)
  arrays = {_key(path): np.asarray(index.read(_key(path)), np.float32) for path, _ in flat}
  index.close()
  leaves = [(path, var.replace(arrays[_key(path)])) for path, var in flat]
  return cfg, graphdef, nnx.from_flat_state(leaves)


def load_clip(directory: str) -> CLIPModel:
  """The model with its weights as jax arrays on the default device."""
  _, graphdef, state = load_clip_state(directory)
  return nnx.merge(graphdef, jax.tree.map(jax.numpy.asarray, state))
