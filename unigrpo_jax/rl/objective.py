"""The UniGRPO objective: text GRPO + lambda * Flow-GRPO + w * regulariser, on one minibatch.

One minibatch loss (``loss_fn``), docs/method.md §4-6:

1. ``context_layout`` packs ``[prompt | reasoning | <vision_start>]`` exactly as the rollout did.
2. ONE policy forward over ``[context | K window blocks]`` (latents = ``window.x_t``, times =
   ``window.t``) gives the logits and the K velocities. The logit at slot s predicts the token
   at slot s + 1, so reasoning token t (slot P + t) is scored by the logits at slot P + t - 1.
3. ``mean_theta = sde_step(x_t, v, t, t_next, 0, a).mean`` and
   ``logp_theta = step_logprob(x_next, mean_theta, std_recorded)``: the rollout's formulas.
4. A second forward of the frozen reference (gradient stopped) gives ``v_ref`` / ``mean_ref``
   (and the reference logits when ``text_kl_coef > 0``); skipped when nothing needs it.
5. ``loss = text_loss + flow_weight * flow_loss + reg_weight * reg`` (a frozen side's terms are
   dropped from the sum but still reported).

The formulas themselves are ``losses.py``; ``train_step.py`` runs this loss over PPO epochs and
minibatches in one jit.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from unigrpo_jax.rl import losses
from unigrpo_jax.rollout import distribution, flow
from unigrpo_jax.rollout.distribution import token_logprobs
from unigrpo_jax.rollout.trajectory import Trajectory, context_layout

ClipRange = Union[float, tuple[float, float]]
_STEP_FNS = {"sde": flow.sde_step, "cps": flow.cps_step}
_AGGREGATIONS = ("seq_mean", "token_mean")


def _check_clip(name: str, clip) -> ClipRange:
  vals = tuple(clip) if isinstance(clip, (tuple, list)) else (clip,)
  if len(vals) not in (1, 2) or any(not isinstance(v, (int, float)) or v <= 0 for v in vals):
    raise ValueError(f"ObjectiveConfig.{name} must be a positive float or a (low, high) pair of "
                     f"positive floats, got {clip!r}")
  return vals[0] if len(vals) == 1 else vals


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
  """What the loss optimises. Static (hashable): part of the compiled step.

  vision_start_id / pad_id: token ids of the context layout (as in the rollout).
  text_clip: e_txt, or (low, high) for asymmetric clipping; ratio in [1 - low, 1 + high].
  text_aggregation: "seq_mean" (paper) or "token_mean". text_kl_coef: beta_txt (paper 0).
  flow_clip: e_img (paper 1e-6). ratio_norm: GRPO-Guard RatioNorm (paper: on).
  reweight_by_dt: divide each step's objective by -dt [ours, off].
  flow_weight: lambda. regularizer: "velocity_mse" | "latent_kl" | "none"; reg_weight: its
    weight (paper 1.5e-5).
  stop_context_grad: the flow loss does not reach the text policy through the context [ours].
  separate_window_blocks: one rematerialised forward per window block (``_forward``): the
    train step's activations of one block instead of K (memory), for K - 1 more forwards of
    the context (each block's forward runs it; the text log-probs come from block 0's).
  recompute_old_logp: the PPO ratio's "old" log-probs (and the window steps' old means, which
    RatioNorm reads) come from the train step's own forward under the rollout's params, before
    any update, instead of from the rollout. In bf16 the rollout's cached forward and the packed
    train forward differ by ~5e-5 in a window step's log-prob (tiny BAGEL), 50x a 1e-6 flow
    clip: every first-epoch ratio would be clipped. One more forward per step (no backward).
  train_text / train_image: False freezes that side (its params stay bit-identical) and drops
    its loss terms from the objective.
  temperature / top_k / top_p / vocab_limit: the text sampling distribution
    (``distribution.masked_logits``); must equal the rollout's, else the first-epoch text ratio
    is not 1. noise_level / sde_type: the rollout's SDE (must equal the rollout's likewise).
  """
  vision_start_id: int
  pad_id: int = 0
  text_clip: ClipRange = 0.2
  text_aggregation: str = "seq_mean"
  text_kl_coef: float = 0.0
  flow_clip: ClipRange = 1e-6
  ratio_norm: bool = True
  reweight_by_dt: bool = False
  flow_weight: float = 1.0
  regularizer: str = "velocity_mse"
  reg_weight: float = 1.5e-5
  stop_context_grad: bool = True
  separate_window_blocks: bool = False
  recompute_old_logp: bool = False
  train_text: bool = True
  train_image: bool = True
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  vocab_limit: int = 0
  noise_level: float = 0.8
  sde_type: str = "sde"

  def __post_init__(self):
    for name in ("vision_start_id", "pad_id"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 0:
        raise ValueError(f"ObjectiveConfig.{name} must be an int >= 0, got {v!r}")
    object.__setattr__(self, "text_clip", _check_clip("text_clip", self.text_clip))
    object.__setattr__(self, "flow_clip", _check_clip("flow_clip", self.flow_clip))
    if self.text_aggregation not in _AGGREGATIONS:
      raise ValueError(f"ObjectiveConfig.text_aggregation must be one of {_AGGREGATIONS}, got "
                       f"{self.text_aggregation!r}")
    if self.regularizer not in losses.REGULARIZERS:
      raise ValueError(f"ObjectiveConfig.regularizer must be one of {losses.REGULARIZERS}, got "
                       f"{self.regularizer!r}")
    if self.sde_type not in _STEP_FNS:
      raise ValueError(f"ObjectiveConfig.sde_type must be one of {sorted(_STEP_FNS)}, got "
                       f"{self.sde_type!r}")
    for name in ("text_kl_coef", "flow_weight", "reg_weight", "noise_level"):
      if getattr(self, name) < 0:
        raise ValueError(f"ObjectiveConfig.{name} must be >= 0, got {getattr(self, name)}")
    distribution.check_knobs("ObjectiveConfig", temperature=self.temperature, top_k=self.top_k,
                             top_p=self.top_p, vocab_limit=self.vocab_limit)
    if not (self.train_text or self.train_image):
      raise ValueError("ObjectiveConfig.train_text and train_image are both False: nothing "
                       "to train")

  def text_logprobs(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log pi(targets) under the rollout's text distribution: [B, L, V], [B, L] -> [B, L]."""
    return token_logprobs(logits, targets, self.temperature, top_k=self.top_k, top_p=self.top_p,
                          vocab_limit=self.vocab_limit)

  @property
  def needs_reference(self) -> bool:
    return self.regularizer != "none" or self.text_kl_coef > 0


def window_mask(window) -> jax.Array:
  """[B, K] 1.0 for recorded stochastic steps (slots the window never reached have index -1;
  a zero-std step, e.g. CPS at t_next = 0, carries no log-prob)."""
  return ((window.step_index >= 0) & (window.std > 0)).astype(jnp.float32)


def _step_means(step_fn, window, v, noise_level) -> jax.Array:
  """Mean of each window step's Gaussian under velocity v [B, K, N, Dl] -> [B, K, N, Dl] (the
  rollout's formula; its first-step rule is selected by the recorded step index)."""
  x_t = window.x_t
  b, k = window.t.shape
  flat = lambda a: a.reshape((b * k,) + a.shape[2:])
  _, mean, _ = step_fn(flat(x_t), flat(v), flat(window.t), flat(window.t_next),
                       jnp.zeros_like(flat(x_t)), noise_level,
                       first_step=flat(window.step_index == 0))
  return mean.reshape(x_t.shape)


def _packed(graphdef, state, layout, x_t, t, cfg: ObjectiveConfig, compute_logits: bool,
            reasoning_slots: tuple[int, int]):
  model = nnx.merge(graphdef, state)
  p_slots, t_slots = reasoning_slots
  return model(layout.tokens, layout.positions, layout.valid, latents=x_t, times=t,
               image_position=layout.image_position, stop_context_grad=cfg.stop_context_grad,
               compute_logits=compute_logits,
               logits_slice=(p_slots - 1, t_slots) if compute_logits else None)


def _forward(graphdef, state, layout, window, cfg: ObjectiveConfig, targets=None,
             reasoning_slots: tuple[int, int] = (0, 0)):
  """The packed forward -> (text log-probs [B, T] of ``targets`` (None without targets), the K
  window blocks' velocities [B, K, N, Dl]). With ``targets`` [B, T] the LM head runs only on the
  slots that predict the reasoning tokens: ``reasoning_slots`` = (P, T) gives logits [B, T, V] at
  slots P - 1 .. P + T - 2 (slot s predicts the token at s + 1), never over the whole context.

  ``cfg.separate_window_blocks``: one forward of the context and ONE block at a time, in a
  ``lax.scan`` whose body is under ``jax.checkpoint`` (the blocks are isolated from each other
  and the text never attends to them, so the values are the same). The backward pass then holds
  one block's activations at a time, not K: a loop, because XLA overlaps the recomputations of
  independent checkpointed calls written one after another. Every block's forward also runs
  the context, so the text log-probs come from block 0's instead of from a text-only forward:
  one loop body fewer to compile (the TPU compile of BAGEL's train step is bound by its distinct
  bodies) and one forward of the context fewer per row; the LM head, on T slots only, runs K
  times.
  """
  compute_logits = targets is not None
  logprobs = lambda out: cfg.text_logprobs(out.logits, targets) if compute_logits else None
  k = window.x_t.shape[1]
  if not cfg.separate_window_blocks or k == 1:
    out = _packed(graphdef, state, layout, window.x_t, window.t, cfg, compute_logits,
                  reasoning_slots)
    return logprobs(out), out.velocity

  def one_block(carry, block):
    x_t, t = block  # [B, 1, N, Dl], [B, 1]
    out = _packed(graphdef, state, layout, x_t, t, cfg, compute_logits, reasoning_slots)
    return carry, (logprobs(out), out.velocity)

  blocks = (jnp.moveaxis(window.x_t, 1, 0)[:, :, None], jnp.moveaxis(window.t, 1, 0)[:, :, None])
  _, (logp, velocity) = jax.lax.scan(jax.checkpoint(one_block), None, blocks)  # [K, B, ...]
  return (None if logp is None else logp[0]), jnp.moveaxis(velocity[:, :, 0], 0, 1)


def _context_layout(graphdef, params, batch: Trajectory, cfg: ObjectiveConfig):
  """The rollout's context layout; the model config says whether the image block carries its
  own markers (BAGEL) or ``<vision_start>`` ends the context."""
  markers = nnx.merge(graphdef, params).cfg.block_markers
  return context_layout(batch.prompt_tokens, batch.prompt_mask, batch.reasoning_tokens,
                        batch.reasoning_mask, cfg.vision_start_id, cfg.pad_id,
                        block_markers=markers)


def _prefix(prefix: str, metrics: dict) -> dict:
  return {f"{prefix}/{k}": v for k, v in metrics.items()}


def _policy_terms(params, graphdef, batch: Trajectory, layout, cfg: ObjectiveConfig):
  """One policy forward -> text log-probs [B, T], flow log-probs [B, K], v, mean_theta."""
  step_fn = _STEP_FNS[cfg.sde_type]
  window = batch.window
  p_slots, t_slots = batch.prompt_tokens.shape[1], batch.reasoning_tokens.shape[1]
  if p_slots < 1:
    raise ValueError("the trajectory needs >= 1 prompt slot (its last logit predicts the first "
                     "reasoning token)")
  # Reasoning token t (slot P + t) is predicted by the logits at slot P + t - 1.
  logp, v = _forward(graphdef, params, layout, window, cfg, targets=batch.reasoning_tokens,
                     reasoning_slots=(p_slots, t_slots))  # [B, T], [B, K, N, Dl] f32
  flow_mask = window_mask(window)
  mean_theta = _step_means(step_fn, window, v, cfg.noise_level)
  # The recorded std depends only on (t, t_next, a); masked slots get 1 so nothing divides by 0
  # (their values are discarded, but 0 * inf in the backward pass would still give NaN).
  std = jnp.where(flow_mask > 0, window.std, 1.0)
  b, k = std.shape
  flat = lambda a: a.reshape((b * k,) + a.shape[2:])
  flow_logp = flow.step_logprob(flat(window.x_next), flat(mean_theta), std.reshape(-1))
  return dict(logp=logp, flow_logp=flow_logp.reshape(b, k), v=v, mean_theta=mean_theta,
              std=std, flow_mask=flow_mask)


def policy_logprobs(params: nnx.State, graphdef: nnx.GraphDef, batch: Trajectory,
                    cfg: ObjectiveConfig):
  """Log-probs of a trajectory's actions under ``params``: (text [B, T] (0 where the reasoning
  mask is off), flow [B, K] (0 on unused window slots)). The same computation as ``loss_fn``."""
  layout = _context_layout(graphdef, params, batch, cfg)
  terms = _policy_terms(params, graphdef, batch, layout, cfg)
  return (jnp.where(batch.reasoning_mask, terms["logp"], 0.0),
          jnp.where(terms["flow_mask"] > 0, terms["flow_logp"], 0.0))


def behaviour_terms(params: nnx.State, graphdef: nnx.GraphDef, batch: Trajectory,
                    cfg: ObjectiveConfig):
  """The train path's view of the rollout's actions under ``params`` (no gradient): text
  log-probs [B, T], window log-probs [B, K] and window means [B, K, N, Dl], in the fields the
  loss reads them from (``reasoning_logp``, ``window.logp``, ``window.mean``)."""
  layout = _context_layout(graphdef, params, batch, cfg)
  terms = jax.lax.stop_gradient(_policy_terms(params, graphdef, batch, layout, cfg))
  return terms["logp"], terms["flow_logp"], terms["mean_theta"]


def loss_fn(params: nnx.State, ref_params: Optional[nnx.State], graphdef: nnx.GraphDef,
            batch: Trajectory, advantages: jax.Array, cfg: ObjectiveConfig):
  """UniGRPO loss of one minibatch (see module docstring).

  Args:
    params: full model state of the policy (differentiated).
    ref_params: full model state of the frozen reference (None allowed iff
      ``cfg.needs_reference`` is False).
    batch: Trajectory with B rows (prompt [B, P], reasoning [B, T], window [B, K, N, Dl]).
    advantages: [B] float, shared by every token and window step of a row.
  Returns:
    (loss [] f32, metrics dict of [] f32): ``loss/{total,text,flow,reg}``, ``text/*`` and
    ``flow/*`` (ratio_mean/min/max, clip_frac, ratio_out_frac, approx_kl, policy_loss),
    ``flow/velocity_mse`` (when a reference is used), ``reg/*`` and
    ``onpolicy/{text,flow}_logp_maxdiff`` (max |recomputed - rollout| log-prob).
  """
  step_fn = _STEP_FNS[cfg.sde_type]
  window = batch.window
  adv = advantages.astype(jnp.float32)
  layout = _context_layout(graphdef, params, batch, cfg)
  p_slots, t_slots = batch.prompt_tokens.shape[1], batch.reasoning_tokens.shape[1]
  terms = _policy_terms(params, graphdef, batch, layout, cfg)
  logp, flow_logp, v, mean_theta = terms["logp"], terms["flow_logp"], terms["v"], terms[
      "mean_theta"]
  std, flow_mask = terms["std"], terms["flow_mask"]
  text_mask = batch.reasoning_mask.astype(jnp.float32)
  b, k = std.shape
  # With gradient: part of RatioNorm's normalised ratio.
  mean_sq_diff = jnp.mean(jnp.square(window.mean - mean_theta).reshape(b, k, -1), axis=-1)

  # ---- frozen reference (one more forward, no gradient).
  ref_logp = v_ref = None
  if cfg.needs_reference:
    if ref_params is None:
      raise ValueError(f"regularizer={cfg.regularizer!r} / text_kl_coef={cfg.text_kl_coef} "
                       "need ref_params")
    ref_targets = batch.reasoning_tokens if cfg.text_kl_coef > 0 else None
    ref_logp, v_ref = jax.lax.stop_gradient(_forward(graphdef, ref_params, layout, window, cfg,
                                                     targets=ref_targets,
                                                     reasoning_slots=(p_slots, t_slots)))

  text_loss, text_m = losses.text_grpo_loss(
      logp, batch.reasoning_logp, adv, text_mask, cfg.text_clip,
      aggregation=cfg.text_aggregation, ref_logp=ref_logp, kl_coef=cfg.text_kl_coef)
  flow_loss, flow_m = losses.flow_grpo_loss(
      flow_logp, window.logp, adv, cfg.flow_clip, step_std=window.std,
      mean_sq_diff=mean_sq_diff, ratio_norm=cfg.ratio_norm, dt=window.t_next - window.t,
      reweight_by_dt=cfg.reweight_by_dt, mask=flow_mask)

  metrics = {}
  reg = jnp.float32(0.0)
  if v_ref is not None:
    mean_ref = None
    if cfg.regularizer == "latent_kl":
      mean_ref = _step_means(step_fn, window, v_ref, cfg.noise_level)
    reg, reg_m = losses.regularizer_loss(
        cfg.regularizer, v=v, v_ref=v_ref, mean_theta=mean_theta, mean_ref=mean_ref,
        std=flow.kl_std(std, window.t, window.t_next, cfg.sde_type), mask=flow_mask)
    metrics.update(_prefix("reg", reg_m))
    metrics["flow/velocity_mse"] = jax.lax.stop_gradient(
        losses.velocity_mse(v, v_ref, flow_mask)[0])

  total = jnp.float32(0.0)
  if cfg.train_text:
    total = total + text_loss
  if cfg.train_image:
    total = total + cfg.flow_weight * flow_loss + cfg.reg_weight * reg

  sg = jax.lax.stop_gradient
  metrics.update(_prefix("text", text_m))
  metrics.update(_prefix("flow", flow_m))
  metrics.update({
      "loss/total": sg(total), "loss/text": sg(text_loss), "loss/flow": sg(flow_loss),
      "loss/reg": sg(reg),
      "onpolicy/text_logp_maxdiff": sg(masked_absmax(logp - batch.reasoning_logp, text_mask)),
      "onpolicy/flow_logp_maxdiff": sg(masked_absmax(flow_logp - window.logp, flow_mask)),
  })
  return total, metrics


def masked_absmax(diff, mask):
  """max |diff| over the entries where mask is on (0 when none is)."""
  return jnp.max(jnp.where(mask > 0, jnp.abs(diff), 0.0))


# --------------------------------------------------------------------------------------------
# Metric reduction: *_min -> min, *_max / *maxdiff -> max, everything else -> mean.
# --------------------------------------------------------------------------------------------

