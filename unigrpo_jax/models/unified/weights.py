"""The key tables of foreign checkpoints (HF Qwen2 / Qwen2.5 and BAGEL) for ``UnifiedModel``.

The one place that knows foreign layouts (``loading.py`` reads, ``export.py`` writes). Name maps are data tables below: each row is
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

"""
from __future__ import annotations

import json
from typing import Callable, Optional

import numpy as np
from flax import nnx

from unigrpo_jax import paths
from unigrpo_jax.models.safetensors_io import CheckpointFormatError
from unigrpo_jax.models.unified.config import ModelConfig

# Qwen2.5 tokenizer ids of BAGEL's image markers (Qwen2.5 tokenizer: added tokens; see docs/bagel.md).
QWEN2_VISION_START_ID, QWEN2_VISION_END_ID = 151652, 151653
# BAGEL's fixed image geometry: FLUX VAE (8x down, 16 ch) and 2x2 latent patches.
BAGEL_VAE_DOWNSAMPLE, BAGEL_PATCH = 8, 2

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
BAGEL_LM_PREFIX = "language_model."
# BAGEL tensors generation-only RL does not use: skipped on load, listed once.
BAGEL_SKIPPED_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.")


def _our_rows(cfg: ModelConfig, bagel: bool, gen_from_und: bool = False):
  """[(our dotted path, their key, kind)] for a config, in a stable order."""
  prefix = BAGEL_LM_PREFIX if bagel else ""
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


def normalize_index(index: tuple, shape: tuple) -> list:
  return [slice(*s.indices(n)[:2]) for s, n in zip(index, shape)]


def read_block(read: Callable, kind: str, ours: tuple, index: tuple) -> np.ndarray:
  """Reads only what our slice ``index`` of an ``ours``-shaped array needs, in our layout.

  read(their_index) returns that slice of the foreign tensor. For per-head kinds the smallest
  block of whole heads is read and the head_dim slice taken afterwards.
  """
  s = normalize_index(index, ours)
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

def flat_state(state: nnx.State) -> dict:
  """nnx.State -> {dotted path: Variable} (e.g. ``layers.0.und.q``)."""
  return {".".join(str(p) for p in path): leaf for path, leaf in nnx.to_flat_state(state)}


def leaf_value(leaf):
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


# Configs.
# ---------------------------------------------------------------------------------------------
def read_json(path: str) -> dict:
  if not paths.isfile(path):
    raise CheckpointFormatError(f"{path}: file not found")
  try:
    return json.loads(paths.read_text(path))
  except ValueError as e:
    raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None


def qwen2_fields(conf: dict, path: str) -> dict:
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


def _tokenizermarker_ids(directory: str):
  """(<|vision_start|>, <|vision_end|>) ids from ``directory/tokenizer.json``, or (None, None)."""
  path = paths.join(directory, "tokenizer.json")
  if not paths.isfile(path):
    return None, None
  from tokenizers import Tokenizer  # local: only needed when a tokenizer.json is there
  tok = Tokenizer.from_str(paths.read_text(path))
  return tok.token_to_id("<|vision_start|>"), tok.token_to_id("<|vision_end|>")


def marker_ids(directory: str, vocab: int, vs: Optional[int], ve: Optional[int]):
  """Explicit ids, else the directory's tokenizer.json, else Qwen2.5's 151652 / 151653."""
  if vs is None or ve is None:
    tvs, tve = _tokenizermarker_ids(directory)
    vs = tvs if vs is None and tvs is not None else vs
    ve = tve if ve is None and tve is not None else ve
  vs = QWEN2_VISION_START_ID if vs is None else vs
  ve = QWEN2_VISION_END_ID if ve is None else ve
  for name, v in (("vision_start_id", vs), ("vision_end_id", ve)):
    if not 0 <= v < vocab:
      raise CheckpointFormatError(f"{directory}: {name}={v} is outside the vocab_size={vocab} "
                                  "embedding table; pass vision_start_id= / vision_end_id=")
  return vs, ve

def config_note(cfg: ModelConfig) -> str:
  return (f"hidden_size={cfg.hidden}, heads={cfg.num_heads}, kv_heads={cfg.num_kv_heads}, "
          f"head_dim={cfg.resolved_head_dim}, intermediate_size={cfg.mlp_dim}, "
          f"vocab_size={cfg.vocab_size}")

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

