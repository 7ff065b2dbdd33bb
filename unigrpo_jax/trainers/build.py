"""Config -> objects, in one place: what training, evaluation and the AOT planner build from a
ConfigDict (the tokenizer, the model config and weights, the autoencoder, the rewards, the typed
rollout / objective / optimiser configs, the mesh and the two compiled programs).

Everything here fails with a message naming the config field or file before anything compiles.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Optional, Sequence

import jax
import ml_collections
from flax import nnx

from unigrpo_jax import checkpointing, distributed, parallel, paths
from unigrpo_jax.data import geneval
from unigrpo_jax.data.encoding import encode_prompts
from unigrpo_jax.data.pipeline import PromptFileSource, ShapeWorldSource, normalize_prompt
from unigrpo_jax.data.qwen_tokenizer import QwenTokenizer
from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.data.tokenizer import Tokenizer
from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.models.flux_vae.weights import load_flux_vae
from unigrpo_jax.models.unified import attention, layout, lora, lora_io
from unigrpo_jax.models.unified.config import ModelConfig, get_preset
from unigrpo_jax.models.unified.loading import bagel_config, load_bagel
from unigrpo_jax.models.unified.model import UnifiedModel, abstract_model
from unigrpo_jax.rewards import registry
from unigrpo_jax.rewards.remote import client as remote_client
from unigrpo_jax.rl.objective import ObjectiveConfig
from unigrpo_jax.rl.optim import OptimConfig
from unigrpo_jax.rl.train_step import make_train_step
from unigrpo_jax.rollout.program import RolloutConfig, make_rollout
from unigrpo_jax.rollout.text import MIN_WINDOW

# Fields a config may change on a loaded checkpoint without changing its shapes.
# Model settings that are not shapes: they come from the run's config, never from a checkpoint.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "remat_policy", "scan_layers",
                  "attention_impl", "attention_chunk")


def is_bagel_dir(path: str) -> bool:
  """A BAGEL download (``llm_config.json`` + ``ema.safetensors``) rather than our own format."""
  return bool(path) and paths.isfile(paths.join(path, "llm_config.json"))


def tokenizer_for(config: ml_collections.ConfigDict):
  """The BAGEL directory's ``tokenizer.json`` for BAGEL runs, else the ShapeWorld vocabulary."""
  if is_bagel_dir(config.init_checkpoint):
    return QwenTokenizer.from_file(config.init_checkpoint)
  return sw.shapeworld_tokenizer()


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
  try:  # LoRA fields on top of the base's shapes (params, if any, are the base's)
    model_cfg = model_cfg.replace(**lora_fields(config))
  except ValueError as e:
    raise ValueError(f"config.model.lora: {e}") from None
  platform = platform or jax.devices()[0].platform
  impl = attention.resolve_impl(model_cfg.attention_impl, platform, model_cfg.compute_dtype)
  return model_cfg.replace(attention_impl=impl), params


def lora_fields(config: ml_collections.ConfigDict) -> dict:
  """``config.model.lora`` -> ModelConfig's lora_* fields ({} for rank 0 or no section)."""
  section = config.model.get("lora")
  if section is None or not section.rank:
    return {}
  names = lambda v: tuple(x.strip() for x in v.split(",") if x.strip()) if isinstance(v, str) \
      else tuple(v)
  return dict(lora_rank=int(section.rank), lora_alpha=float(section.alpha),
              lora_targets=names(section.targets), lora_experts=names(section.experts))


def _model_and_params(config, tokenizer):
  runtime = {k: config.model[k] for k in RUNTIME_FIELDS if k in config.model}
  if is_bagel_dir(config.init_checkpoint):
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
    disk_cfg = layout.per_layer(model_cfg)
    abstract = nnx.state(abstract_model(disk_cfg), nnx.Param)
    params = checkpointing.load_params(config.init_checkpoint, abstract)
    return model_cfg, layout.load_layout(params, model_cfg)
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
  if not is_bagel_dir(config.init_checkpoint):
    return PatchAutoencoder.for_model(model_cfg)
  path = paths.join(config.init_checkpoint, "ae.safetensors")
  if not paths.isfile(path):
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
  into the mesh, else a fresh sharded init overwritten by ``init_params`` when given. With
  LoRA (``model_cfg.lora_rank``) the base is built so, then fresh adapters are added (or those
  of ``config.model.lora.adapters``, a PEFT directory)."""
  base_cfg = lora.base_config(model_cfg)
  if is_bagel_dir(config.init_checkpoint):
    # attention_impl as resolved for the platform by model_and_params (not the config's "auto")
    kw = {**_bagel_kwargs(config), "attention_impl": model_cfg.attention_impl}
    model = load_bagel(config.init_checkpoint, mesh=mesh, rules=rules, **kw)
    if model.cfg != base_cfg:
      raise AssertionError(f"loaded config {model.cfg} != validated {base_cfg}")
    graphdef, params = nnx.split(model)
  else:
    graphdef, params = parallel.create_sharded_model(base_cfg, config.seed, mesh, rules,
                                                     model_fn=UnifiedModel)
    if init_params is not None:  # host values, the same on every process -> global arrays
      params = jax.tree.map(distributed.global_array,
                            parallel.state_shardings(params, mesh, rules), init_params)
  if not model_cfg.lora_rank:
    return graphdef, params
  graphdef, params = lora_io.with_adapters((graphdef, params), model_cfg, config.seed, mesh,
                                           rules)
  if config.model.lora.get("adapters"):
    params = lora_io.load_lora(config.model.lora.adapters, params, model_cfg, mesh, rules)
  return graphdef, params


def reward_fn_for(config: ml_collections.ConfigDict):
  """The run's weighted reward (``config.rewards``), remote ones (``config.remote_rewards``)
  included; in-process reward models (CLIP) load now. An unknown name raises ValueError naming
  ``config.rewards``."""
  weights = dict(config.rewards)
  try:
    return registry.combined_reward(
        weights, config, extra=remote_client.build_reward_fns(config.get("remote_rewards"),
                                                       list(weights)))
  except KeyError as e:
    raise ValueError(f"config.rewards: {e.args[0]}") from None


# ------------------------------------------------------------------ config -> static configs
def text_distribution(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> dict:
  """The text sampling knobs, given to BOTH the rollout and the objective (the train step must
  rescore with the distribution that sampled). ``rollout.vocab_limit = -1`` means the
  tokenizer's vocabulary size (the embedding table may have more rows than it has words)."""
  r = config.rollout
  limit = tokenizer.vocab_size if r.vocab_limit == -1 else r.vocab_limit
  return dict(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, vocab_limit=limit)


def rollout_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> RolloutConfig:
  r = config.rollout
  return RolloutConfig(group_size=r.group_size, max_reasoning_len=r.max_reasoning_len,
                       stop_id=tokenizer.think_end_id, pad_id=tokenizer.pad_id,
                       vision_start_id=tokenizer.vision_start_id,
                       **text_distribution(config, tokenizer), num_steps=r.num_steps,
                       shift=r.shift, noise_level=r.noise_level,
                       window_range=tuple(r.window_range), window_size=r.window_size,
                       window_per_group=r.window_per_group,
                       group_initial_noise=r.group_initial_noise, sde_type=r.sde_type,
                       decode_tensor=r.decode_tensor,
                       decode_rows=r.get("decode_rows", 0),
                       denoise_chunks=r.get("denoise_chunks", 1),
                       decode_min_window=r.get("decode_min_window", MIN_WINDOW))


def objective_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ObjectiveConfig:
  o = config.objective
  return ObjectiveConfig(
      vision_start_id=tokenizer.vision_start_id, pad_id=tokenizer.pad_id,
      text_clip=tuple(o.text_clip) if isinstance(o.text_clip, (tuple, list)) else o.text_clip,
      text_aggregation=o.text_aggregation, text_kl_coef=o.text_kl_coef,
      flow_clip=tuple(o.flow_clip) if isinstance(o.flow_clip, (tuple, list)) else o.flow_clip,
      ratio_norm=o.ratio_norm, reweight_by_dt=o.reweight_by_dt, flow_weight=o.flow_weight,
      regularizer=o.regularizer, reg_weight=o.reg_weight, stop_context_grad=o.stop_context_grad,
      separate_window_blocks=o.get("separate_window_blocks", False),
      recompute_old_logp=o.get("recompute_old_logp", False),
      train_text=o.train_text, train_image=o.train_image, **text_distribution(config, tokenizer),
      noise_level=config.rollout.noise_level, sde_type=config.rollout.sde_type)


def optim_config(config: ml_collections.ConfigDict) -> OptimConfig:
  o = config.optim
  return OptimConfig(lr_und=o.lr_und, lr_gen=o.lr_gen, weight_decay=o.weight_decay, b1=o.b1,
                     b2=o.b2, eps=o.eps, grad_clip=o.grad_clip, ppo_epochs=o.ppo_epochs,
                     num_minibatches=o.num_minibatches, grad_accum=o.grad_accum)


def prompt_source(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                  held_out: Sequence[dict] = ()):
  """The training prompts: a validated prompt file, or the ShapeWorld train split.

  Every training and evaluation prompt must fit ``data.max_prompt_len``, and no evaluation
  prompt may also be a training prompt (compared lowercased, whitespace-collapsed): raises
  ValueError naming the first evaluation prompt that is.
  """
  if config.data.prompt_file:
    source = PromptFileSource(config.data.prompt_file, tokenizer,
                              free_text=is_bagel_dir(config.init_checkpoint))
  else:
    source = ShapeWorldSource("train", config.data.train_tasks)
  spec_rewards = sorted(registry.SPEC_REWARDS & set(config.rewards))
  train_prompts = set()
  for i in range(len(source)):  # every prompt must fit: fail now, not at step 900
    prompt = source[i]["prompt"]
    encode_prompts(tokenizer, [prompt], config.data.max_prompt_len)
    train_prompts.add(normalize_prompt(prompt))
    if spec_rewards and not source[i]["spec"]:
      raise ValueError(f"data.prompt_file {config.data.prompt_file}, line {i + 1}: prompt "
                       f"{prompt!r} has no ShapeWorld spec, which reward {spec_rewards[0]!r} "
                       f"needs")
  for r in held_out:
    encode_prompts(tokenizer, [r["prompt"]], config.data.max_prompt_len)
    if normalize_prompt(r["prompt"]) in train_prompts:
      where = (f"data.eval_prompt_file {config.data.eval_prompt_file}"
               if config.data.eval_prompt_file else "the ShapeWorld test split")
      train = (f"data.prompt_file {config.data.prompt_file}" if config.data.prompt_file
               else "the ShapeWorld train split")
      raise ValueError(f"evaluation prompt {r['prompt']!r} ({where}) is also a training prompt "
                       f"({train}): the evaluation set must be held out")
  return source


# ------------------------------------------------------------------ mesh and compiled programs
def mesh_and_rules(config: ml_collections.ConfigDict, devices=None):
  """The run's mesh over ``devices`` (default: all) and its logical rules (None: defaults).

  Fails before any compile when the mesh does not match the devices or the rollout batch
  ``prompts_per_batch * group_size`` is not a multiple of the mesh's batch parallelism.
  """
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
  rules = parallel.normalize_rules(tuple(config.logical_rules) + parallel.DEFAULT_RULES) \
      if config.logical_rules else None
  batch_rows = config.rollout.prompts_per_batch * config.rollout.group_size
  if batch_rows % parallel.batch_parallelism(mesh):
    raise ValueError(f"config.rollout: prompts_per_batch * group_size = {batch_rows} is not a "
                     f"multiple of the mesh's batch parallelism "
                     f"{parallel.batch_parallelism(mesh)} (mesh {dict(mesh.shape)})")
  return mesh, rules


@dataclasses.dataclass(frozen=True)
class Programs:
  """The two jitted programs of a UniGRPO step and where their batch inputs live.

  rollout(params, prompt_tokens, prompt_mask, key) -> Trajectory (rows split over the mesh);
  train_step(train_state, ref_params, trajectory, advantages, key) -> (train_state, metrics).
  prompt_sharding: of the [prompts_per_batch, P] prompt arrays; batch_sharding: of the
  trajectory and advantages.
  """
  rollout: Callable
  train_step: Callable
  prompt_sharding: jax.sharding.NamedSharding
  batch_sharding: jax.sharding.NamedSharding


def build_programs(config: ml_collections.ConfigDict, graphdef, params, model_cfg, mesh, rules,
                   rcfg: RolloutConfig, ocfg: ObjectiveConfig, optcfg: OptimConfig,
                   autoencoder=None) -> Programs:
  """The rollout and train step exactly as the trainer runs them (``unigrpo_jax.aot`` compiles
  these same functions for TPU topologies). ``params``: the full model state, concrete or
  abstract (only shapes and logical names are read). ``autoencoder``: default the model's
  ``PatchAutoencoder``."""
  autoencoder = autoencoder or PatchAutoencoder.for_model(model_cfg)
  rollout_fn = make_rollout(graphdef, rcfg, autoencoder, mesh=mesh)
  train_step = make_train_step(graphdef, params, ocfg, optcfg, mesh, rules)
  return Programs(rollout_fn, train_step,
                  parallel.rows_sharding(mesh, config.rollout.prompts_per_batch),
                  parallel.batch_sharding(mesh))


def standalone_rollout(config: ml_collections.ConfigDict):
  """The trainer's rollout program and its inputs, for tools that only roll out (benchmarks).

  Returns (tokenizer, params, rollout_cfg, rollout) with ``rollout(params, prompt_tokens
  [Bp, P], prompt_mask [Bp, P], key) -> Trajectory`` of Bp * group_size rows."""
  tokenizer = tokenizer_for(config)
  model_cfg, init_params = model_and_params(config, tokenizer)
  mesh, rules = mesh_and_rules(config)
  graphdef, params = build_params(config, model_cfg, init_params, mesh, rules)
  rcfg = rollout_config(config, tokenizer)
  rollout = make_rollout(graphdef, rcfg, autoencoder_for(config, model_cfg), mesh=mesh)
  return tokenizer, params, rcfg, rollout


def check_reward_inputs(config: ml_collections.ConfigDict, source) -> None:
  """Every prompt has what each weighted reward reads (a ShapeWorld spec, GenEval metadata):
  ValueError naming the reward and the first prompt without it, before any compile."""
  if isinstance(source, ShapeWorldSource):  # every task has a spec (GenEval's is derived)
    return
  remotes = config.get("remote_rewards") or {}
  for name, w in config.rewards.items():
    if w == 0:
      continue
    needs_spec = name not in remotes and "spec" in registry.requirements(name)
    needs_geneval = name in remotes and remotes[name].kind == "geneval"
    if not (needs_spec or needs_geneval):
      continue
    for i in range(len(source)):
      r = source[i]
      if needs_spec and not r["spec"]:
        raise ValueError(f"config.rewards.{name}: reward {name!r} needs a ShapeWorld spec, and "
                         f"prompt {r['prompt']!r} ({source!r}, record {i}) has none")
      if needs_geneval:
        spec = sw.Spec.from_json(r["spec"]) if r["spec"] else None
        try:
          geneval.batch_metadata([spec], [r.get("metadata", "")], [r["prompt"]],
                                 require_geneval=True)
        except ValueError as e:
          raise ValueError(f"config.rewards.{name}: reward {name!r} needs GenEval metadata: "
                           f"{source!r}, record {i}: {e}") from None
