"""Loading HF Qwen2 / Qwen2.5 and BAGEL directories into ``UnifiedModel``.

Everything is validated before a byte of tensor data is read or anything compiles: config
fields, the file headers (missing / truncated files), every expected key's presence and shape
(the error names the key, the expected and the found shape and the config fields it came from).
Extra tensors are listed once and ignored; BAGEL's ViT, connector and ``vit_pos_embed`` are
skipped by design (generation-only RL does not use them). Tensors are then read one at a time,
cast to ``dtype`` and, with a ``mesh``, placed straight into their sharding with
``jax.make_array_from_callback`` (each device's slice read on its own, so every host of a pod
reads only what its devices hold). The key tables are ``weights.py``.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unigrpo_jax import parallel, paths
from unigrpo_jax.models.safetensors_io import CheckpointFormatError, TensorIndex
from unigrpo_jax.models.unified import layout
from unigrpo_jax.models.unified.config import ModelConfig
from unigrpo_jax.models.unified.latent_io import LatentIO
from unigrpo_jax.models.unified.model import UnifiedModel, abstract_model
from unigrpo_jax.models.unified.weights import (BAGEL_PATCH, BAGEL_SKIPPED_PREFIXES,
                                                BAGEL_VAE_DOWNSAMPLE, bagel_key_map, config_note,
                                                flat_state, leaf_value, marker_ids, normalize_index,
                                                qwen2_fields, qwen2_key_map, read_block, read_json,
                                                their_shape)


def _check_tensors(index: TensorIndex, rows, abstract: dict, source: str, cfg_note: str):
  """Presence and shape of every expected key; returns the unused keys."""
  for path, key, kind in rows:
    if key not in index.shapes:
      raise CheckpointFormatError(f"{source}: missing tensor {key!r} (for {path})")
    want = their_shape(kind, tuple(abstract[path].shape))
    got = tuple(index.shapes[key])
    if want != got:
      raise CheckpointFormatError(f"{index.file_of[key]}: tensor {key!r} has shape {list(got)}, "
                                  f"expected {list(want)} from {cfg_note}")
  used = {key for _, key, _ in rows}
  return sorted(k for k in index.shapes if k not in used)


def _report_unused(source: str, unused, skipped_prefixes=()):
  skipped = [k for k in unused if k.startswith(skipped_prefixes)]
  unknown = [k for k in unused if not k.startswith(skipped_prefixes)]
  if skipped:
    groups = sorted({k.split(".")[0] for k in skipped})
    print(f"{source}: skipped {len(skipped)} tensors not used by generation-only RL "
          f"({', '.join(groups)})", file=sys.stderr, flush=True)
  if unknown:
    shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
    print(f"{source}: ignored {len(unknown)} unknown tensors: {shown}", file=sys.stderr,
          flush=True)


class _Progress:
  """One stderr line every few seconds on long loads: tensors and GB read so far."""

  def __init__(self, source: str, total_tensors: int, total_bytes: int, every_s: float = 5.0):
    self.source, self.n, self.every_s = source, total_tensors, every_s
    self.total_bytes = total_bytes
    self.done = self.bytes = 0
    self.start = self.last = time.perf_counter()

  def step(self, nbytes: int):
    self.done += 1
    self.bytes += nbytes
    now = time.perf_counter()
    final = self.done == self.n and now - self.start >= self.every_s
    if final or (now - self.last >= self.every_s and self.done < self.n):
      self.last = now
      print(f"{self.source}: {self.done}/{self.n} tensors, {self.bytes / 1e9:.2f}/"
            f"{self.total_bytes / 1e9:.2f} GB, {now - self.start:.0f}s", file=sys.stderr,
            flush=True)


def _once(get: Callable, shape: tuple) -> Callable:
  """``get`` memoised per slice: devices holding the same slice (replicas) share one read."""
  cache = {}

  def cached(index):
    key = tuple((s.start, s.stop) for s in normalize_index(index, shape))
    if key not in cache:
      cache[key] = get(index)
    return cache[key]

  return cached


def _materialise(cfg: ModelConfig, index: TensorIndex, rows, source: str, mesh,
                 fill: Optional[dict] = None, rules=None) -> UnifiedModel:
  """Builds the model: every leaf read from ``rows`` (or taken from ``fill``), cast, placed."""
  graphdef, abstract = nnx.split(abstract_model(cfg))
  flat = flat_state(abstract)
  by_path = {path: (key, kind) for path, key, kind in rows}
  fill = fill or {}
  missing = sorted(set(flat) - set(by_path) - set(fill))
  if missing:  # a bug in the tables, not in the user's file
    raise AssertionError(f"no source for model leaves {missing[:5]}")
  shardings = None
  if mesh is not None:
    shardings = flat_state(parallel.state_shardings(abstract, mesh, rules))
  progress = _Progress(source, len(by_path), index.nbytes(k for k, _ in by_path.values()))
  pure = nnx.to_pure_dict(abstract)
  for path, leaf in flat.items():
    shape, target = tuple(leaf.shape), np.dtype(leaf_value(leaf).dtype)
    if path in by_path:
      key, kind = by_path[path]
      get = lambda idx, key=key, kind=kind, shape=shape: read_block(
          lambda their: index.read(key, their), kind, shape, idx).astype(target)
    else:
      value = np.asarray(fill[path]).astype(target)
      get = lambda idx, value=value: value[idx]
    if shardings is None:
      array = jnp.asarray(get(tuple(slice(None) for _ in shape)))
    else:
      array = jax.make_array_from_callback(shape, leaf_value(shardings[path]), _once(get, shape))
    if path in by_path:
      progress.step(index.nbytes([by_path[path][0]]))
    node = pure
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = array
  index.close()
  nnx.replace_by_pure_dict(abstract, pure)
  return nnx.merge(graphdef, abstract)


def load_qwen2(path: str, *, dtype: str = "float32", mesh=None, mot: bool = False,
               image_size: int = 1024, max_latent_size: int = 64,
               vision_start_id: Optional[int] = None, vision_end_id: Optional[int] = None,
               seed: int = 0, rules=None, compute_dtype: Optional[str] = None,
               remat: bool = False, **runtime) -> UnifiedModel:
  """An HF Qwen2 / Qwen2.5 directory -> UnifiedModel (BAGEL's image conventions).

  ``path`` holds ``config.json`` and ``model.safetensors`` (or shards + an index). Tied or untied
  embeddings, GQA, rope theta / rms eps from the config; no QK-norm (Qwen2 has none). ``mot``
  adds a generation expert (and its final norm) initialised as a copy of the understanding
  expert, as BAGEL did. The image side (``latent_io``) is not in a Qwen2 checkpoint: it gets a
  fresh init from ``seed`` (``llm2vae`` zero, BAGEL's sin-cos position table). Marker ids:
  explicit, else ``tokenizer.json``, else Qwen2.5's. ``dtype`` is the parameter dtype;
  ``compute_dtype`` (default: ``dtype``), ``remat``, the other runtime fields of ModelConfig
  (``runtime``: ``scan_layers``, ``remat_policy``, ...) and the sharding ``rules`` are passed
  through.
  """
  conf_path = paths.join(path, "config.json")
  fields = qwen2_fields(read_json(conf_path), conf_path)
  vs, ve = marker_ids(path, fields["vocab_size"], vision_start_id, vision_end_id)
  tied = bool(read_json(conf_path).get("tie_word_embeddings", False))
  try:
    cfg = ModelConfig(**fields, qk_norm=False, tie_embeddings=tied, mot=mot,
                      image_size=image_size, image_channels=16,
                      vae_downsample=BAGEL_VAE_DOWNSAMPLE, patch_size=BAGEL_PATCH,
                      timestep_scale=1.0, max_latent_size=max_latent_size,
                      vision_start_id=vs, vision_end_id=ve, dtype=compute_dtype or dtype,
                      param_dtype=dtype, remat=remat, **runtime)
  except ValueError as e:
    raise CheckpointFormatError(f"{conf_path}: {e}") from None
  index = TensorIndex.from_path(path, "model.safetensors", "model.safetensors.index.json")
  run_cfg, cfg = cfg, layout.per_layer(cfg)  # read per layer, stack after (scan_layers)
  rows = qwen2_key_map(cfg, gen_from_und=True)
  abstract = flat_state(nnx.state(abstract_model(cfg)))
  note = f"{conf_path} ({config_note(cfg)})"
  unused = _check_tensors(index, rows, abstract, path, note)
  if tied:  # some exports also store the tied head: it must then equal the embedding (unread)
    unused = [k for k in unused if k != "lm_head.weight"]
  _report_unused(path, unused)
  latent = nnx.state(LatentIO(cfg, nnx.Rngs(seed)))
  fill = {f"latent_io.{k}": leaf_value(v) for k, v in flat_state(latent).items()}
  model = _materialise(cfg, index, rows, path, mesh, fill, rules)
  return layout.convert_model(model, run_cfg.scan_layers, mesh=mesh, rules=rules)



def bagel_config(path: str, *, dtype: str = "float32", image_size: int = 1024,
                 vision_start_id: Optional[int] = None, vision_end_id: Optional[int] = None,
                 index: Optional[TensorIndex] = None, compute_dtype: Optional[str] = None,
                 remat: bool = False, **runtime) -> ModelConfig:
  """The ModelConfig of a BAGEL directory: text shapes from ``llm_config.json``, QK-norm on and
  the head untied (BAGEL forces both), image shapes from the generation-head tensors."""
  conf_path = paths.join(path, "llm_config.json")
  fields = qwen2_fields(read_json(conf_path), conf_path)
  index = index or TensorIndex.from_path(path, "ema.safetensors")
  ema = paths.join(path, "ema.safetensors")
  shapes = index.shapes
  for key in ("vae2llm.weight", "time_embedder.mlp.0.weight", "latent_pos_embed.pos_embed"):
    if key not in shapes:
      raise CheckpointFormatError(f"{ema}: missing tensor {key!r} (not a BAGEL checkpoint?)")
  latent_dim = shapes["vae2llm.weight"][1]
  rows = shapes["latent_pos_embed.pos_embed"][0]
  side = int(round(rows ** 0.5))
  if side * side != rows or latent_dim % (BAGEL_PATCH ** 2):
    raise CheckpointFormatError(f"{ema}: latent_pos_embed.pos_embed has {rows} rows (not a "
                                f"square) or vae2llm.weight {list(shapes['vae2llm.weight'])} "
                                f"is not 2x2 patches")
  if image_size > side * BAGEL_VAE_DOWNSAMPLE * BAGEL_PATCH:
    raise CheckpointFormatError(f"{ema}: image_size={image_size} exceeds the position table "
                                f"({side}x{side} latents = "
                                f"{side * BAGEL_VAE_DOWNSAMPLE * BAGEL_PATCH} px)")
  vs, ve = marker_ids(path, fields["vocab_size"], vision_start_id, vision_end_id)
  try:
    return ModelConfig(**fields, qk_norm=True, tie_embeddings=False, mot=True,
                       image_size=image_size, image_channels=latent_dim // BAGEL_PATCH ** 2,
                       vae_downsample=BAGEL_VAE_DOWNSAMPLE, patch_size=BAGEL_PATCH,
                       timestep_freq_dim=shapes["time_embedder.mlp.0.weight"][1],
                       timestep_scale=1.0, max_latent_size=side, vision_start_id=vs,
                       vision_end_id=ve, dtype=compute_dtype or dtype, param_dtype=dtype,
                       remat=remat, **runtime)
  except ValueError as e:
    raise CheckpointFormatError(f"{conf_path}: {e}") from None


def load_bagel(path: str, *, dtype: str = "float32", image_size: int = 1024,
               vision_start_id: Optional[int] = None, vision_end_id: Optional[int] = None,
               mesh=None, rules=None, compute_dtype: Optional[str] = None,
               remat: bool = False, **runtime) -> UnifiedModel:
  """A BAGEL directory (``llm_config.json`` + ``ema.safetensors``) -> UnifiedModel.

  Both experts, both final norms, untied head, QK-norm, the generation heads and the stored
  ``latent_pos_embed`` table are loaded; ViT / connector / ``vit_pos_embed`` are skipped.
  ``image_size`` picks the training resolution (<= 16 * sqrt(table rows)); marker ids default
  to the directory's tokenizer.json (Qwen2.5: 151652 / 151653). ``dtype`` is the parameter
  dtype; ``compute_dtype`` (default: ``dtype``), ``remat`` and the sharding ``rules`` (default
  ``parallel.DEFAULT_RULES``) are passed through.
  """
  index = TensorIndex.from_path(path, "ema.safetensors")
  cfg = bagel_config(path, dtype=dtype, image_size=image_size, vision_start_id=vision_start_id,
                     vision_end_id=vision_end_id, index=index, compute_dtype=compute_dtype,
                     remat=remat, **runtime)
  run_cfg, cfg = cfg, layout.per_layer(cfg)  # read per layer, stack after (scan_layers)
  rows = bagel_key_map(cfg)
  abstract = flat_state(nnx.state(abstract_model(cfg)))
  note = f"{paths.join(path, 'llm_config.json')} ({config_note(cfg)})"
  unused = _check_tensors(index, rows, abstract, paths.join(path, "ema.safetensors"), note)
  _report_unused(paths.join(path, "ema.safetensors"), unused, BAGEL_SKIPPED_PREFIXES)
  model = _materialise(cfg, index, rows, paths.join(path, "ema.safetensors"), mesh,
                       rules=rules)
  return layout.convert_model(model, run_cfg.scan_layers, mesh=mesh, rules=rules)


# ---------------------------------------------------------------------------------------------
# Saving.
