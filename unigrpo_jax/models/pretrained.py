"""Foreign checkpoints <-> ``UnifiedModel``: HF Qwen2 / Qwen2.5 and BAGEL (load and save).

The one place that knows foreign layouts. Name maps are data tables below: each row is
``(our state path, their key, kind)``, where ``kind`` says how a torch ``nn.Linear``-style tensor
becomes ours:

=============  ======================  =================  =====================================
kind           theirs                  ours               why
=============  ======================  =================  =====================================
``copy``       any                     same               norms, embeddings, biases, tables
``T``          [out, in]               [in, out]          our kernels are ``x @ W``
``in_heads``   [H*hd, D]               [D, H, hd]         q/k/v projections, per head
``bias_heads`` [H*hd]                  [H, hd]            q/k/v biases
``out_heads``  [D, H*hd]               [H, hd, D]         o projection
=============  ======================  =================  =====================================

Loading (``load_qwen2`` / ``load_bagel``) validates everything before reading a byte of tensor
data or compiling anything: config fields, the file headers (missing / truncated files), every
expected key's presence and shape (the error names the key, the expected and the found shape and
the config fields it came from). Extra tensors are listed once and ignored; BAGEL's ViT,
connector and ``vit_pos_embed`` are skipped by design (generation-only RL does not use them).
Tensors are then read one at a time, cast to ``dtype`` and, with a ``mesh``, placed straight into
their sharding with ``jax.make_array_from_callback`` (each device's slice read from disk on its
own, so every host of a pod reads only what its devices hold).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unigrpo_jax.models.config import ModelConfig
from unigrpo_jax.models.flux_vae import load_flux_vae  # re-exported: the public loader API
from unigrpo_jax.models.image import LatentIO
from unigrpo_jax.models.latent_patches import patchify, unpatchify  # re-exported
from unigrpo_jax.models.safetensors_io import (CheckpointFormatError, TensorIndex, numpy_dtype,
                                               write_streaming)
from unigrpo_jax.models import layer_layout
from unigrpo_jax.models.unified import UnifiedModel

__all__ = ["CheckpointFormatError", "load_qwen2", "load_bagel", "save_bagel", "load_flux_vae",
           "patchify", "unpatchify",
           "bagel_key_map", "qwen2_key_map", "QWEN2_VISION_START_ID", "QWEN2_VISION_END_ID"]

# Qwen2.5 tokenizer ids of BAGEL's image markers (Qwen2.5 tokenizer: added tokens; see docs/bagel.md).
QWEN2_VISION_START_ID, QWEN2_VISION_END_ID = 151652, 151653
# BAGEL's fixed image geometry: FLUX VAE (8x down, 16 ch) and 2x2 latent patches.
_BAGEL_VAE_DOWNSAMPLE, _BAGEL_PATCH = 8, 2

# ---------------------------------------------------------------------------------------------
# Name maps (data). Per-expert rows: (our path under layers.{i}.{und|gen}, HF key suffix of the
# understanding expert, BAGEL key suffix of the generation expert, kind).
# ---------------------------------------------------------------------------------------------
_EXPERT_ROWS = (
    ("input_norm.scale", "input_layernorm.weight", "input_layernorm_moe_gen.weight", "copy"),
    ("post_attn_norm.scale", "post_attention_layernorm.weight",
     "post_attention_layernorm_moe_gen.weight", "copy"),
    ("q", "self_attn.q_proj.weight", "self_attn.q_proj_moe_gen.weight", "in_heads"),
    ("q_bias", "self_attn.q_proj.bias", "self_attn.q_proj_moe_gen.bias", "bias_heads"),
    ("k", "self_attn.k_proj.weight", "self_attn.k_proj_moe_gen.weight", "in_heads"),
    ("k_bias", "self_attn.k_proj.bias", "self_attn.k_proj_moe_gen.bias", "bias_heads"),
    ("v", "self_attn.v_proj.weight", "self_attn.v_proj_moe_gen.weight", "in_heads"),
    ("v_bias", "self_attn.v_proj.bias", "self_attn.v_proj_moe_gen.bias", "bias_heads"),
    ("o", "self_attn.o_proj.weight", "self_attn.o_proj_moe_gen.weight", "out_heads"),
    ("q_norm.scale", "self_attn.q_norm.weight", "self_attn.q_norm_moe_gen.weight", "copy"),
    ("k_norm.scale", "self_attn.k_norm.weight", "self_attn.k_norm_moe_gen.weight", "copy"),
    ("mlp.gate", "mlp.gate_proj.weight", "mlp_moe_gen.gate_proj.weight", "T"),
    ("mlp.up", "mlp.up_proj.weight", "mlp_moe_gen.up_proj.weight", "T"),
    ("mlp.down", "mlp.down_proj.weight", "mlp_moe_gen.down_proj.weight", "T"),
)
# Top-level rows of the language model: (our path, HF key, kind); BAGEL prefixes the keys.
_TOP_ROWS = (
    ("embed", "model.embed_tokens.weight", "copy"),
    ("und_norm.scale", "model.norm.weight", "copy"),
    ("gen_norm.scale", "model.norm_moe_gen.weight", "copy"),
    ("lm_head", "lm_head.weight", "T"),
)
# BAGEL's generation heads (outside the language model).
_BAGEL_HEAD_ROWS = (
    ("latent_io.vae2llm_kernel", "vae2llm.weight", "T"),
    ("latent_io.vae2llm_bias", "vae2llm.bias", "copy"),
    ("latent_io.time_in", "time_embedder.mlp.0.weight", "T"),
    ("latent_io.time_in_bias", "time_embedder.mlp.0.bias", "copy"),
    ("latent_io.time_out", "time_embedder.mlp.2.weight", "T"),
    ("latent_io.time_out_bias", "time_embedder.mlp.2.bias", "copy"),
    ("latent_io.llm2vae_kernel", "llm2vae.weight", "T"),
    ("latent_io.llm2vae_bias", "llm2vae.bias", "copy"),
    ("latent_io.pos_embed", "latent_pos_embed.pos_embed", "copy"),
)
_BAGEL_LM = "language_model."
# BAGEL tensors generation-only RL does not use: skipped on load, listed once.
_BAGEL_SKIPPED = ("vit_model.", "connector.", "vit_pos_embed.")


def _our_rows(cfg: ModelConfig, bagel: bool, gen_from_und: bool = False):
  """[(our dotted path, their key, kind)] for a config, in a stable order."""
  prefix = _BAGEL_LM if bagel else ""
  rows = []
  for path, key, kind in _TOP_ROWS:
    if path == "gen_norm.scale" and not cfg.mot:
      continue
    if path == "gen_norm.scale" and gen_from_und:
      key = "model.norm.weight"
    if path == "lm_head" and cfg.tie_embeddings:
      continue
    rows.append((path, prefix + key, kind))
  for i in range(cfg.num_layers):
    layer = f"{prefix}model.layers.{i}."
    for path, und_key, gen_key, kind in _EXPERT_ROWS:
      if path.endswith("_bias") and not cfg.qkv_bias:
        continue
      if path.split(".")[0] in ("q_norm", "k_norm") and not cfg.qk_norm:
        continue
      rows.append((f"layers.{i}.und.{path}", layer + und_key, kind))
      if cfg.mot:
        rows.append((f"layers.{i}.gen.{path}", layer + (und_key if gen_from_und else gen_key),
                     kind))
  if bagel:
    rows += [r for r in _BAGEL_HEAD_ROWS if r[0] != "latent_io.pos_embed" or cfg.max_latent_size]
  return rows


def bagel_key_map(cfg: ModelConfig) -> list:
  """[(our path, BAGEL ``ema.safetensors`` key, kind)] of a BAGEL-format config."""
  return _our_rows(cfg, bagel=True)


def qwen2_key_map(cfg: ModelConfig, gen_from_und: bool = False) -> list:
  """[(our path, HF Qwen2 key, kind)]; ``gen_from_und`` maps the gen expert onto und's keys."""
  return _our_rows(cfg, bagel=False, gen_from_und=gen_from_und)


# ---------------------------------------------------------------------------------------------
# Layout conversions (one definition each way, plus slice mapping for sharded reads).
# ---------------------------------------------------------------------------------------------
def their_shape(kind: str, ours: tuple) -> tuple:
  """Shape of the foreign tensor that becomes our ``ours``-shaped array."""
  if kind == "copy":
    return tuple(ours)
  if kind == "T":
    return tuple(reversed(ours))
  if kind == "in_heads":  # ours [D, H, hd]
    return (ours[1] * ours[2], ours[0])
  if kind == "bias_heads":  # ours [H, hd]
    return (ours[0] * ours[1],)
  if kind == "out_heads":  # ours [H, hd, D]
    return (ours[2], ours[0] * ours[1])
  raise ValueError(f"unknown kind {kind!r}")


def to_ours(kind: str, x: np.ndarray, ours: tuple) -> np.ndarray:
  """Foreign tensor (or a block of it read by ``read_block``) -> our layout, shape ``ours``."""
  if kind == "copy":
    return x.reshape(ours)
  if kind == "T":
    return x.T
  if kind == "in_heads":
    return x.T.reshape(ours)
  if kind == "bias_heads":
    return x.reshape(ours)
  if kind == "out_heads":
    return x.T.reshape(ours)
  raise ValueError(f"unknown kind {kind!r}")


def to_theirs(kind: str, x: np.ndarray) -> np.ndarray:
  """Our array -> the foreign layout (inverse of ``to_ours``)."""
  if kind == "copy":
    return x
  if kind == "T":
    return x.T
  if kind == "in_heads":
    d, h, hd = x.shape
    return x.reshape(d, h * hd).T
  if kind == "bias_heads":
    return x.reshape(-1)
  if kind == "out_heads":
    h, hd, d = x.shape
    return x.reshape(h * hd, d).T
  raise ValueError(f"unknown kind {kind!r}")


def _norm(index: tuple, shape: tuple) -> list:
  return [slice(*s.indices(n)[:2]) for s, n in zip(index, shape)]


def read_block(read: Callable, kind: str, ours: tuple, index: tuple) -> np.ndarray:
  """Reads only what our slice ``index`` of an ``ours``-shaped array needs, in our layout.

  read(their_index) returns that slice of the foreign tensor. For per-head kinds the smallest
  block of whole heads is read and the head_dim slice taken afterwards.
  """
  s = _norm(index, ours)
  if kind == "copy":
    return read(tuple(s))
  if kind == "T":
    return read(tuple(reversed(s))).T
  if kind == "in_heads":  # ours (D, H, hd); theirs rows (H, hd) flattened, cols D
    hd = ours[2]
    rows = slice(s[1].start * hd, s[1].stop * hd)
    block = read((rows, s[0])).T  # [D', H'*hd]
    return block.reshape(block.shape[0], -1, hd)[:, :, s[2]]
  if kind == "bias_heads":  # ours (H, hd)
    hd = ours[1]
    block = read((slice(s[0].start * hd, s[0].stop * hd),))
    return block.reshape(-1, hd)[:, s[1]]
  if kind == "out_heads":  # ours (H, hd, D); theirs rows D, cols (H, hd)
    hd = ours[1]
    block = read((s[2], slice(s[0].start * hd, s[0].stop * hd))).T  # [H'*hd, D']
    return block.reshape(-1, hd, block.shape[1])[:, s[1], :]
  raise ValueError(f"unknown kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise CheckpointFormatError(f"{path}: file not found")
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None


def _qwen2_fields(conf: dict, path: str) -> dict:
  """Qwen2 config.json / llm_config.json -> ModelConfig text fields (validated)."""
  arch = conf.get("architectures") or []
  if conf.get("model_type") != "qwen2" and "Qwen2ForCausalLM" not in arch:
    raise CheckpointFormatError(f"{path}: unknown architecture (model_type="
                                f"{conf.get('model_type')!r}, architectures={arch}); expected "
                                "qwen2 / Qwen2ForCausalLM")
  required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size")
  for name in required:
    if not isinstance(conf.get(name), int) or conf[name] <= 0:
      raise CheckpointFormatError(f"{path}: field {name!r} must be a positive int, got "
                                  f"{conf.get(name)!r}")
  if conf.get("hidden_act", "silu") != "silu":
    raise CheckpointFormatError(f"{path}: hidden_act={conf['hidden_act']!r} is not supported "
                                "(only silu)")
  if conf.get("rope_scaling"):
    raise CheckpointFormatError(f"{path}: rope_scaling={conf['rope_scaling']!r} is not "
                                "supported (only plain RoPE)")
  # transformers < 5 writes rope_theta; >= 5 writes rope_parameters {rope_type, rope_theta}.
  rope = conf.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    raise CheckpointFormatError(f"{path}: rope_parameters={rope!r} is not supported (only "
                                "rope_type 'default')")
  theta = conf.get("rope_theta", rope.get("rope_theta", 1e4))
  heads = conf["num_attention_heads"]
  fields = dict(vocab_size=conf["vocab_size"], hidden=conf["hidden_size"],
                num_layers=conf["num_hidden_layers"], num_heads=heads,
                num_kv_heads=conf.get("num_key_value_heads") or heads,
                mlp_dim=conf["intermediate_size"], rope_theta=float(theta),
                rms_eps=float(conf.get("rms_norm_eps", 1e-6)), qkv_bias=True)
  if conf.get("head_dim") and conf["head_dim"] * heads != conf["hidden_size"]:
    fields["head_dim"] = conf["head_dim"]  # only when it is not the default hidden // heads
  try:
    ModelConfig(**fields)  # field relations (heads dividing width, ...) named by ModelConfig
  except ValueError as e:
    raise CheckpointFormatError(f"{path}: {e}") from None
  return fields


def _tokenizer_marker_ids(directory: str):
  """(<|vision_start|>, <|vision_end|>) ids from ``directory/tokenizer.json``, or (None, None)."""
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    return None, None
  from tokenizers import Tokenizer  # local: only needed when a tokenizer.json is there
  tok = Tokenizer.from_file(path)
  return tok.token_to_id("<|vision_start|>"), tok.token_to_id("<|vision_end|>")


def _marker_ids(directory: str, vocab: int, vs: Optional[int], ve: Optional[int]):
  """Explicit ids, else the directory's tokenizer.json, else Qwen2.5's 151652 / 151653."""
  if vs is None or ve is None:
    tvs, tve = _tokenizer_marker_ids(directory)
    vs = tvs if vs is None and tvs is not None else vs
    ve = tve if ve is None and tve is not None else ve
  vs = QWEN2_VISION_START_ID if vs is None else vs
  ve = QWEN2_VISION_END_ID if ve is None else ve
  for name, v in (("vision_start_id", vs), ("vision_end_id", ve)):
    if not 0 <= v < vocab:
      raise CheckpointFormatError(f"{directory}: {name}={v} is outside the vocab_size={vocab} "
                                  "embedding table; pass vision_start_id= / vision_end_id=")
  return vs, ve


# ---------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------
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


def _flat_abstract(state: nnx.State) -> dict:
  """nnx.State -> {dotted path: Variable} (e.g. ``layers.0.und.q``)."""
  return {".".join(str(p) for p in path): leaf for path, leaf in nnx.to_flat_state(state)}


def _value(leaf):
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _once(get: Callable, shape: tuple) -> Callable:
  """``get`` memoised per slice: devices holding the same slice (replicas) share one read."""
  cache = {}

  def cached(index):
    key = tuple((s.start, s.stop) for s in _norm(index, shape))
    if key not in cache:
      cache[key] = get(index)
    return cache[key]

  return cached


def _materialise(cfg: ModelConfig, index: TensorIndex, rows, source: str, mesh,
                 fill: Optional[dict] = None, rules=None) -> UnifiedModel:
  """Builds the model: every leaf read from ``rows`` (or taken from ``fill``), cast, placed."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: UnifiedModel(cfg, nnx.Rngs(0))))
  flat = _flat_abstract(abstract)
  by_path = {path: (key, kind) for path, key, kind in rows}
  fill = fill or {}
  missing = sorted(set(flat) - set(by_path) - set(fill))
  if missing:  # a bug in the tables, not in the user's file
    raise AssertionError(f"no source for model leaves {missing[:5]}")
  shardings = None
  if mesh is not None:
    from unigrpo_jax import parallel  # local: parallel imports nothing of ours at module level
    shardings = _flat_abstract(parallel.state_shardings(abstract, mesh, rules))
  progress = _Progress(source, len(by_path), index.nbytes(k for k, _ in by_path.values()))
  pure = nnx.to_pure_dict(abstract)
  for path, leaf in flat.items():
    shape, target = tuple(leaf.shape), np.dtype(_value(leaf).dtype)
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
      array = jax.make_array_from_callback(shape, _value(shardings[path]), _once(get, shape))
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
  conf_path = os.path.join(path, "config.json")
  fields = _qwen2_fields(_read_json(conf_path), conf_path)
  vs, ve = _marker_ids(path, fields["vocab_size"], vision_start_id, vision_end_id)
  tied = bool(_read_json(conf_path).get("tie_word_embeddings", False))
  try:
    cfg = ModelConfig(**fields, qk_norm=False, tie_embeddings=tied, mot=mot,
                      image_size=image_size, image_channels=16,
                      vae_downsample=_BAGEL_VAE_DOWNSAMPLE, patch_size=_BAGEL_PATCH,
                      timestep_scale=1.0, max_latent_size=max_latent_size,
                      vision_start_id=vs, vision_end_id=ve, dtype=compute_dtype or dtype,
                      param_dtype=dtype, remat=remat, **runtime)
  except ValueError as e:
    raise CheckpointFormatError(f"{conf_path}: {e}") from None
  index = TensorIndex.from_path(path, "model.safetensors", "model.safetensors.index.json")
  run_cfg, cfg = cfg, layer_layout.per_layer(cfg)  # read per layer, stack after (scan_layers)
  rows = qwen2_key_map(cfg, gen_from_und=True)
  abstract = _flat_abstract(nnx.state(nnx.eval_shape(lambda: UnifiedModel(cfg, nnx.Rngs(0)))))
  note = f"{conf_path} ({_config_note(cfg)})"
  unused = _check_tensors(index, rows, abstract, path, note)
  if tied:  # some exports also store the tied head: it must then equal the embedding (unread)
    unused = [k for k in unused if k != "lm_head.weight"]
  _report_unused(path, unused)
  latent = nnx.state(LatentIO(cfg, nnx.Rngs(seed)))
  fill = {f"latent_io.{k}": _value(v) for k, v in _flat_abstract(latent).items()}
  model = _materialise(cfg, index, rows, path, mesh, fill, rules)
  return layer_layout.convert_model(model, run_cfg.scan_layers, mesh=mesh, rules=rules)


def _config_note(cfg: ModelConfig) -> str:
  return (f"hidden_size={cfg.hidden}, heads={cfg.num_heads}, kv_heads={cfg.num_kv_heads}, "
          f"head_dim={cfg.resolved_head_dim}, intermediate_size={cfg.mlp_dim}, "
          f"vocab_size={cfg.vocab_size}")


def bagel_config(path: str, *, dtype: str = "float32", image_size: int = 1024,
                 vision_start_id: Optional[int] = None, vision_end_id: Optional[int] = None,
                 index: Optional[TensorIndex] = None, compute_dtype: Optional[str] = None,
                 remat: bool = False, **runtime) -> ModelConfig:
  """The ModelConfig of a BAGEL directory: text shapes from ``llm_config.json``, QK-norm on and
  the head untied (BAGEL forces both), image shapes from the generation-head tensors."""
  conf_path = os.path.join(path, "llm_config.json")
  fields = _qwen2_fields(_read_json(conf_path), conf_path)
  index = index or TensorIndex.from_path(path, "ema.safetensors")
  ema = os.path.join(path, "ema.safetensors")
  shapes = index.shapes
  for key in ("vae2llm.weight", "time_embedder.mlp.0.weight", "latent_pos_embed.pos_embed"):
    if key not in shapes:
      raise CheckpointFormatError(f"{ema}: missing tensor {key!r} (not a BAGEL checkpoint?)")
  latent_dim = shapes["vae2llm.weight"][1]
  rows = shapes["latent_pos_embed.pos_embed"][0]
  side = int(round(rows ** 0.5))
  if side * side != rows or latent_dim % (_BAGEL_PATCH ** 2):
    raise CheckpointFormatError(f"{ema}: latent_pos_embed.pos_embed has {rows} rows (not a "
                                f"square) or vae2llm.weight {list(shapes['vae2llm.weight'])} "
                                f"is not 2x2 patches")
  if image_size > side * _BAGEL_VAE_DOWNSAMPLE * _BAGEL_PATCH:
    raise CheckpointFormatError(f"{ema}: image_size={image_size} exceeds the position table "
                                f"({side}x{side} latents = "
                                f"{side * _BAGEL_VAE_DOWNSAMPLE * _BAGEL_PATCH} px)")
  vs, ve = _marker_ids(path, fields["vocab_size"], vision_start_id, vision_end_id)
  try:
    return ModelConfig(**fields, qk_norm=True, tie_embeddings=False, mot=True,
                       image_size=image_size, image_channels=latent_dim // _BAGEL_PATCH ** 2,
                       vae_downsample=_BAGEL_VAE_DOWNSAMPLE, patch_size=_BAGEL_PATCH,
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
  run_cfg, cfg = cfg, layer_layout.per_layer(cfg)  # read per layer, stack after (scan_layers)
  rows = bagel_key_map(cfg)
  abstract = _flat_abstract(nnx.state(nnx.eval_shape(lambda: UnifiedModel(cfg, nnx.Rngs(0)))))
  note = f"{os.path.join(path, 'llm_config.json')} ({_config_note(cfg)})"
  unused = _check_tensors(index, rows, abstract, os.path.join(path, "ema.safetensors"), note)
  _report_unused(os.path.join(path, "ema.safetensors"), unused, _BAGEL_SKIPPED)
  model = _materialise(cfg, index, rows, os.path.join(path, "ema.safetensors"), mesh,
                       rules=rules)
  return layer_layout.convert_model(model, run_cfg.scan_layers, mesh=mesh, rules=rules)


# ---------------------------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------------------------
def bagel_llm_config(cfg: ModelConfig) -> dict:
  """The ``llm_config.json`` of a BAGEL-format config (Qwen2 fields; BAGEL forces the rest)."""
  return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.resolved_head_dim,
          "intermediate_size": cfg.mlp_dim, "rope_theta": cfg.rope_theta,
          "rms_norm_eps": cfg.rms_eps, "hidden_act": "silu", "rope_scaling": None,
          "tie_word_embeddings": False, "max_position_embeddings": 32768,
          "use_sliding_window": False, "qk_norm": True, "torch_dtype": "bfloat16"}


def _check_bagel_format(cfg: ModelConfig):
  need = dict(mot=True, qk_norm=True, tie_embeddings=False, qkv_bias=True,
              vae_downsample=_BAGEL_VAE_DOWNSAMPLE, patch_size=_BAGEL_PATCH)
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
               state: Optional[nnx.State] = None, source: Optional[str] = None) -> list:
  """Writes ``path/ema.safetensors`` (BAGEL's key names and shapes) and ``path/llm_config.json``.

  ``state`` (e.g. a trained ``TrainState.params``) overrides the model's own arrays. ``source``,
  the original BAGEL directory, adds its ViT / connector / ``vit_pos_embed`` tensors unchanged,
  so the file is a complete BAGEL ``ema.safetensors`` (``load_state_dict(strict=True)``);
  without it BAGEL loads the file with ``strict=False`` (those keys missing). The file is
  streamed: one tensor (gathered from its shards) in host memory at a time; on a pod every
  process gathers and process 0 writes. Returns the written keys.
  """
  cfg = model.cfg
  _check_bagel_format(cfg)
  target = numpy_dtype(dtype)
  # BAGEL's keys are per layer: a stacked (scan_layers) state is split back first.
  source_state = state if state is not None else nnx.state(model)
  flat = _flat_abstract(layer_layout.convert_state(
      source_state, cfg, False, var_filter=nnx.Param if state is not None else ...))
  cfg = layer_layout.per_layer(cfg)
  specs = []
  for our, key, kind in bagel_key_map(cfg):
    leaf = _value(flat[our])
    produce = lambda leaf=leaf, kind=kind: to_theirs(kind, _host_array(leaf).astype(target))
    specs.append((key, target, their_shape(kind, tuple(leaf.shape)), produce))
  if source is not None:
    index = TensorIndex.from_path(source, "ema.safetensors")
    for key in sorted(k for k in index.shapes if k.startswith(_BAGEL_SKIPPED)):
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
