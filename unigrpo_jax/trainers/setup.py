"""Builds what every mode needs from a config: the model config and (optionally) its weights."""
from __future__ import annotations

import json
from typing import Optional

import ml_collections
from flax import nnx

from unigrpo_jax import checkpointing
from unigrpo_jax.data.tokenizer import Tokenizer
from unigrpo_jax.models import ModelConfig, UnifiedModel, get_preset

# Fields a config may change on a loaded checkpoint without changing its shapes.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat")


def model_and_params(config: ml_collections.ConfigDict, tokenizer: Tokenizer
                     ) -> tuple[ModelConfig, Optional[nnx.State]]:
  """-> (model config, params or None for a fresh init).

  With ``config.init_checkpoint`` the shapes come from the checkpoint (the preset is ignored)
  and its tokenizer must equal ours; otherwise from ``config.model.preset``.
  """
  runtime = {k: config.model[k] for k in RUNTIME_FIELDS if k in config.model}
  if config.init_checkpoint:
    meta = checkpointing.read_meta(config.init_checkpoint)
    ckpt_tok = Tokenizer.from_json(json.dumps(meta["tokenizer"]))
    if ckpt_tok != tokenizer:
      raise checkpointing.CheckpointError(
          f"checkpoint {config.init_checkpoint!r} was trained with another tokenizer "
          f"(vocab {ckpt_tok.vocab_size} vs {tokenizer.vocab_size})")
    model_cfg = checkpointing.model_config_from_meta(meta, **runtime)
    abstract = nnx.state(nnx.eval_shape(lambda: UnifiedModel(model_cfg, nnx.Rngs(0))), nnx.Param)
    return model_cfg, checkpointing.load_params(config.init_checkpoint, abstract)
  # A fresh model gets exactly the tokenizer's vocabulary: no id can be sampled that no word has.
  # A larger model.vocab_size keeps a real model's table (its shapes, for planning with aot).
  vocab = config.model.get("vocab_size", 0) or tokenizer.vocab_size
  if vocab < tokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size={vocab} is smaller than the tokenizer's "
                     f"{tokenizer.vocab_size}")
  if config.model.get("num_layers", 0):
    runtime["num_layers"] = config.model.num_layers
  return get_preset(config.model.preset, vocab_size=vocab, **runtime), None

