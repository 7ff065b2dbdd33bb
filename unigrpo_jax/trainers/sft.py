"""Supervised warm start: cross-entropy on reasoning tokens + flow-matching MSE on image tokens.

One packed forward per batch over ``[prompt | reasoning | <vision_start> | noisy image]`` (the same
layout the RL train step uses). The image loss is rectified flow: ``x_t = (1 - t) x0 + t eps``,
target velocity ``eps - x0``, with t drawn on the sampler's shifted grid distribution.
"""
from __future__ import annotations

import functools
import time

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from unigrpo_jax import checkpointing, paths
from unigrpo_jax.data.encoding import encode_prompts, encode_reasoning
from unigrpo_jax.data.shapeworld.sft_examples import sample_sft_batch
from unigrpo_jax.data.tokenizer import Tokenizer
from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.models.autoencoder import from_uint8
from unigrpo_jax.rollout.trajectory import context_layout, token_logprobs
from unigrpo_jax.trainers import build
from unigrpo_jax.trainers.metrics import CompileCounter, MetricsLogger, Progress
from unigrpo_jax.data.shapeworld.world import shapeworld_tokenizer


@flax.struct.dataclass
class SFTState:
  params: nnx.State
  opt_state: optax.OptState
  step: jax.Array


def sft_loss(params, graphdef, batch: dict, key, *, vision_start_id: int, pad_id: int,
             image_weight: float, shift: float):
  """Loss of one batch.

  batch: prompt_tokens/prompt_mask [B, P], reasoning_tokens/reasoning_mask [B, T],
    latents [B, N, Dl] clean image tokens in [-1, 1].
  Returns (loss, metrics).
  """
  model = nnx.merge(graphdef, params)
  p = batch["prompt_tokens"].shape[1]
  t_len = batch["reasoning_tokens"].shape[1]
  layout = context_layout(batch["prompt_tokens"], batch["prompt_mask"],
                          batch["reasoning_tokens"], batch["reasoning_mask"], vision_start_id,
                          pad_id, block_markers=model.cfg.block_markers)
  x0 = batch["latents"]
  t_key, e_key = jax.random.split(key)
  u = jax.random.uniform(t_key, (x0.shape[0],))
  t = shift * u / (1 + (shift - 1) * u)  # the density of the shifted sampling grid
  eps = jax.random.normal(e_key, x0.shape)
  x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
  # Logit at slot s predicts the token at slot s + 1: the LM head runs on slots P-1 .. P+T-2.
  out = model(layout.tokens, layout.positions, layout.valid, latents=x_t, times=t,
              image_position=layout.image_position, logits_slice=(p - 1, t_len))
  logits = out.logits
  logp = token_logprobs(logits, batch["reasoning_tokens"])
  mask = batch["reasoning_mask"].astype(jnp.float32)
  ce = -jnp.sum(logp * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  token_acc = jnp.sum((jnp.argmax(logits, -1) == batch["reasoning_tokens"]) * mask) / jnp.maximum(
      jnp.sum(mask), 1.0)
  mse = jnp.mean((out.velocity - (eps - x0)) ** 2)
  loss = ce + image_weight * mse
  return loss, {"sft/ce": ce, "sft/flow_mse": mse, "sft/token_acc": token_acc, "sft/loss": loss}


def make_sft_step(graphdef, optimizer: optax.GradientTransformation, **loss_kwargs):
  """-> jitted ``step(state, batch, key) -> (state, metrics)`` with the state donated."""
  loss_fn = functools.partial(sft_loss, graphdef=graphdef, **loss_kwargs)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state: SFTState, batch: dict, key):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch=batch,
                                                                     key=key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["sft/grad_norm"] = optax.global_norm(grads)
    return SFTState(params, opt_state, state.step + 1), metrics

  return step


def make_sft_batch(rng: np.random.Generator, tokenizer: Tokenizer, autoencoder,
                   config: ml_collections.ConfigDict) -> tuple[dict, np.ndarray]:
  """Host-side batch: tokens, masks and clean latents; also the fraction of correct traces."""
  sft = config.sft
  ex = sample_sft_batch(rng, sft.batch_size, autoencoder.image_size, sft.wrong_reasoning_prob,
                        layout_seed=None if sft.layout_seed < 0 else sft.layout_seed,
                        wrong_image_prob=sft.wrong_image_prob)
  pt, pm = encode_prompts(tokenizer, ex.prompts, config.data.max_prompt_len)
  rt, rm = encode_reasoning(tokenizer, ex.reasoning, config.rollout.max_reasoning_len)
  latents = np.asarray(autoencoder.encode(from_uint8(ex.images)))
  batch = {"prompt_tokens": pt, "prompt_mask": pm, "reasoning_tokens": rt,
           "reasoning_mask": rm, "latents": latents}
  return batch, ex.correct


def run_sft(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Trains from scratch (or ``config.init_checkpoint``) and writes ``workdir/model``.

  Returns the path of the saved model directory.
  """
  tokenizer = shapeworld_tokenizer()
  model_cfg, init_params = build.model_and_params(config, tokenizer)
  model = UnifiedModel(model_cfg, nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  if init_params is not None:
    params = init_params
  autoencoder = PatchAutoencoder.for_model(model_cfg)
  sft = config.sft
  schedule = optax.warmup_cosine_decay_schedule(0.0, sft.learning_rate, sft.warmup_steps,
                                                max(sft.steps, sft.warmup_steps + 1))
  optimizer = optax.chain(optax.clip_by_global_norm(sft.grad_clip),
                          optax.adamw(schedule, weight_decay=sft.weight_decay))
  step_fn = make_sft_step(graphdef, optimizer, vision_start_id=tokenizer.vision_start_id,
                          pad_id=tokenizer.pad_id, image_weight=sft.image_loss_weight,
                          shift=config.rollout.shift)
  state = SFTState(params, optimizer.init(params), jnp.int32(0))
  logger = MetricsLogger(workdir, tensorboard=config.tensorboard)
  compiles = CompileCounter.install()
  progress = Progress(sft.steps, every=config.log_every)
  rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed)
  out_dir = paths.join(workdir, "model")
  for step in range(1, sft.steps + 1):
    t0 = time.time()
    batch, correct = make_sft_batch(rng, tokenizer, autoencoder, config)
    state, metrics = step_fn(state, batch, jax.random.fold_in(key, step))
    if step % config.log_every == 0 or step == sft.steps:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics.update({"sft/correct_trace_frac": float(np.mean(correct)),
                      "perf/step_time_s": time.time() - t0,
                      "perf/num_compiles": compiles.count})
      logger.write(step, metrics)
      progress.update(step, {"ce": metrics["sft/ce"], "mse": metrics["sft/flow_mse"]})
    if sft.save_every and step % sft.save_every == 0:
      checkpointing.save_model(out_dir, state.params, model_cfg, tokenizer.to_json(),
                               {"sft_step": step})
  checkpointing.save_model(out_dir, state.params, model_cfg, tokenizer.to_json(),
                           {"sft_step": sft.steps, "config": config.to_json()})
  logger.close()
  return out_dir
