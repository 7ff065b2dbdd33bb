"""Builds what every mode needs from a config: the model config and (optionally) its weights."""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import ml_collections
from flax import nnx

from unigrpo_jax import checkpointing, parallel
from unigrpo_jax.data.tokenizer import Tokenizer
from unigrpo_jax.models import ModelConfig, UnifiedModel, attention, get_preset, layer_layout

# Fields a config may change on a loaded checkpoint without changing its shapes.
# Model settings that are not shapes: they come from the run's config, never from a checkpoint.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "remat_policy", "scan_layers",
                  "attention_impl", "attention_chunk")


def is_bagel_dir(path: str) -> bool:
  """A BAGEL download (``llm_config.json`` + ``ema.safetensors``) rather than our own format."""
  return bool(path) and os.path.isfile(os.path.join(path, "llm_config.json"))


def tokenizer_for(config: ml_collections.ConfigDict):
  """The BAGEL directory's ``tokenizer.json`` for BAGEL runs, else the ShapeWorld vocabulary."""
  if is_bagel_dir(config.init_checkpoint):
    from unigrpo_jax.data.qwen_tokenizer import QwenTokenizer
    return QwenTokenizer.from_file(config.init_checkpoint)
  return Tokenizer.for_shapeworld()


def _bagel_kwargs(config: ml_collections.ConfigDict) -> dict:
  passed = ("dtype", "param_dtype", "remat")  # given by name below
  extra = {k: config.model[k] for k in RUNTIME_FIELDS if k not in passed and k in config.model}
  return dict(dtype=config.model.param_dtype, compute_dtype=config.model.dtype,
              remat=config.model.remat, image_size=config.model.get("image_size", 1024), **extra)


def model_and_params(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                     platform: Optional[str] = None) -> tuple[ModelConfig, Optional[nnx.State]]:
  """-> (model config, params or None for a fresh init).

  ``platform``: where the programs will run ("tpu", "gpu", "cpu"; default this process's
  devices): ``model.attention_impl="auto"`` is resolved for it (``attention.resolve_impl``).

  With ``config.init_checkpoint`` the shapes come from the checkpoint (the preset is ignored)
  and its tokenizer must equal ours; otherwise from ``config.model.preset``. A BAGEL directory
  is only validated here (config, file headers: cheap); ``build_params`` loads it sharded.
  """
  model_cfg, params = _model_and_params(config, tokenizer)
  platform = platform or jax.devices()[0].platform
  impl = attention.resolve_impl(model_cfg.attention_impl, platform, model_cfg.compute_dtype)
  return model_cfg.replace(attention_impl=impl), params


def _model_and_params(config, tokenizer):
  runtime = {k: config.model[k] for k in RUNTIME_FIELDS if k in config.model}
  if is_bagel_dir(config.init_checkpoint):
    from unigrpo_jax.models.pretrained import bagel_config
    kw = _bagel_kwargs(config)
    return bagel_config(config.init_checkpoint, dtype=kw.pop("dtype"), **kw), None
  if config.init_checkpoint:
    meta = checkpointing.read_meta(config.init_checkpoint)
    ckpt_tok = Tokenizer.from_json(json.dumps(meta["tokenizer"]))
    if ckpt_tok != tokenizer:
      raise checkpointing.CheckpointError(
          f"checkpoint {config.init_checkpoint!r} was trained with another tokenizer "
          f"(vocab {ckpt_tok.vocab_size} vs {tokenizer.vocab_size})")
    model_cfg = checkpointing.model_config_from_meta(meta, **runtime)
    # On disk the layers are per-layer arrays; a scan_layers run stacks them after reading.
    disk_cfg = layer_layout.per_layer(model_cfg)
    abstract = nnx.state(nnx.eval_shape(lambda: UnifiedModel(disk_cfg, nnx.Rngs(0))), nnx.Param)
    params = checkpointing.load_params(config.init_checkpoint, abstract)
    return model_cfg, layer_layout.load_layout(params, model_cfg)
  # A fresh model gets exactly the tokenizer's vocabulary: no id can be sampled that no word has.
  # A larger model.vocab_size keeps a real model's table (its shapes, for planning with aot).
  vocab = config.model.get("vocab_size", 0) or tokenizer.vocab_size
  if vocab < tokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size={vocab} is smaller than the tokenizer's "
                     f"{tokenizer.vocab_size}")
  if config.model.get("num_layers", 0):
    runtime["num_layers"] = config.model.num_layers
  return get_preset(config.model.preset, vocab_size=vocab, **runtime), None



def autoencoder_for(config: ml_collections.ConfigDict, model_cfg: ModelConfig):
  """The image autoencoder of a run: a BAGEL directory's FLUX VAE (``<dir>/ae.safetensors``),
  else the pixel ``PatchAutoencoder`` of the toy world. Its token shape must be the model's."""
  from unigrpo_jax.models import PatchAutoencoder
  if not is_bagel_dir(config.init_checkpoint):
    return PatchAutoencoder.for_model(model_cfg)
  from unigrpo_jax.models.flux_vae import load_flux_vae
  path = os.path.join(config.init_checkpoint, "ae.safetensors")
  if not os.path.isfile(path):
    raise ValueError(f"BAGEL directory {config.init_checkpoint!r} has no ae.safetensors (the FLUX "
                     f"VAE that turns its image latents into pixels)")
  ae = load_flux_vae(path, image_size=model_cfg.image_size)
  if (ae.latent_dim, ae.cfg.downsample) != (model_cfg.latent_dim, model_cfg.vae_downsample):
    raise ValueError(f"{path}: the VAE's {ae.latent_dim}-wide tokens at {ae.cfg.downsample}x down "
                     f"do not match the model's {model_cfg.latent_dim} at "
                     f"{model_cfg.vae_downsample}x")
  return ae


def build_params(config: ml_collections.ConfigDict, model_cfg: ModelConfig,
                 init_params: Optional[nnx.State], mesh, rules=None):
  """-> (graphdef, full model state in its shardings): loaded from a BAGEL directory straight
  into the mesh, else a fresh sharded init overwritten by ``init_params`` when given."""
  if is_bagel_dir(config.init_checkpoint):
    from unigrpo_jax.models.pretrained import load_bagel
    # attention_impl as resolved for the platform by model_and_params (not the config's "auto")
    kw = {**_bagel_kwargs(config), "attention_impl": model_cfg.attention_impl}
    model = load_bagel(config.init_checkpoint, mesh=mesh, rules=rules, **kw)
    if model.cfg != model_cfg:
      raise AssertionError(f"loaded config {model.cfg} != validated {model_cfg}")
    return nnx.split(model)
  graphdef, params = parallel.create_sharded_model(model_cfg, config.seed, mesh, rules)
  if init_params is not None:  # host values, the same on every process -> global arrays
    from unigrpo_jax import distributed
    params = jax.tree.map(distributed.global_array,
                          parallel.state_shardings(params, mesh, rules), init_params)
  return graphdef, params


def reward_fn_for(config: ml_collections.ConfigDict):
  """The run's weighted reward (``config.rewards``), remote ones (``config.remote_rewards``)
  included; in-process reward models (CLIP) load now. An unknown name raises ValueError naming
  ``config.rewards``."""
  from unigrpo_jax.rewards import registry, remote  # reward code only when a run needs it
  weights = dict(config.rewards)
  try:
    return registry.combined_reward(
        weights, config, extra=remote.build_reward_fns(config.get("remote_rewards"),
                                                       list(weights)))
  except KeyError as e:
    raise ValueError(f"config.rewards: {e.args[0]}") from None
