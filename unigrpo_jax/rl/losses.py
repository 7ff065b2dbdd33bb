"""Policy losses and regularisers (docs/method.md §4-6).

Convention: every function returns ``(loss, metrics)``: a float32 scalar to MINIMISE and a dict
of float32 scalars for logging. Everything is computed in float32.

Metric glossary (shared by the two policy losses, over valid entries only):
  ratio_mean / ratio_min / ratio_max: the importance ratio (exactly 1 on-policy).
  clip_frac: fraction where the clipped branch of the min is active, i.e. the entry gets no
    gradient (ratio > 1 + hi with A > 0, or ratio < 1 - lo with A < 0).
  ratio_out_frac: fraction with the ratio outside [1 - lo, 1 + hi] (the PPO/Flow-GRPO "clipfrac").
  Both are decided in log space, like the loss itself (see ``clipped_surrogate``).
  approx_kl: k3 estimate of KL(old || theta) from samples of the old policy,
    ``exp(d) - d - 1`` with ``d = logp - old_logp`` (>= 0, exactly 0 on-policy).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _f32(a) -> Array:
    return jnp.asarray(a, jnp.float32)


def _clip_range(clip_eps) -> tuple[float, float]:
    """float e -> (e, e); (lo, hi) pair -> itself. Ratios are clipped to [1 - lo, 1 + hi]."""
    if isinstance(clip_eps, (tuple, list)):
        if len(clip_eps) != 2:
            raise ValueError(f"clip_eps pair must be (low, high), got {clip_eps!r}")
        lo, hi = clip_eps
    else:
        lo = hi = clip_eps
    return lo, hi


def _masked_mean(x: Array, mask: Array) -> Array:
    """Sum over valid entries / number of valid entries (0 if there are none)."""
    n = jnp.sum(mask)
    return jnp.sum(jnp.where(mask > 0, x, 0.0) * mask) / jnp.maximum(n, 1.0)


def _log1p_f32(x):
    """float32 ``log1p(x)``: computed in float64 for a concrete x, -inf for x <= -1 (a lower
    clip range >= 1 never binds: ratios are > 0)."""
    if isinstance(x, (int, float, np.floating, np.integer)):
        return np.float32(math.log1p(x)) if x > -1 else np.float32(-np.inf)
    x = jnp.asarray(x, jnp.float32)
    return jnp.where(x > -1, jnp.log1p(jnp.maximum(x, -1.0)), -jnp.inf)


def log_clip_bounds(clip_eps):
    """``(log1p(-lo), log1p(hi))`` in float32: the clip band ``[1 - lo, 1 + hi]`` in log space.

    Args:
      clip_eps: float e or (lo, hi) (Python numbers, or float32 scalars under jit).
    Returns: (log_lo, log_hi); np.float32 for Python numbers, else float32 arrays.
    """
    lo, hi = _clip_range(clip_eps)
    return _log1p_f32(-lo), _log1p_f32(hi)


def clipped_surrogate(log_ratio: Array, adv: Array, clip_eps):
    """PPO's ``min(r A, clip(r, 1 - lo, 1 + hi) A)`` with the clip decided in LOG space.

    The one clipped surrogate of the text and flow losses. Entry-wise, the clipped branch is
    active iff ``A > 0 and log r > log1p(hi)`` or ``A < 0 and log r < log1p(-lo)`` (exactly
    the entries where PPO's min picks the clipped term); there the value is the constant
    ``(1 + hi) A`` / ``(1 - lo) A`` with NO gradient. Everywhere else (a ratio on the bound
    included) the value is ``r A`` with the full gradient ``d/d log r = r A``.

    Why not ``jnp.minimum(r A, jnp.clip(r, ...) A)``: at Flow-GRPO's clip ranges (1e-6) the band
    holds about 8 float32 ratios (spacing 1.19e-7 above 1), so exp(log r) lands exactly on
    ``1 +- e`` for a whole interval of log-ratios, and JAX splits the gradient of every tie
    (clip's bound, then min): 0.75 of the gradient inside the band, and 0.75 instead of 0 just
    outside it. A log-space comparison has float32 resolution ~1e-13 at 1e-6 and no ties.

    Args:
      log_ratio: [B, N] float32 ``log r`` (finite where used; garbage must be masked before).
      adv: [B, 1] (or broadcastable to log_ratio) float32 advantages.
      clip_eps: float e or (lo, hi).
    Returns: (obj [B, N] float32 per-entry objective to MAXIMISE, clipped [B, N] bool: the
      clipped branch is active, i.e. the entry gets no gradient).
    """
    log_lo, log_hi = log_clip_bounds(clip_eps)
    clipped = ((adv > 0) & (log_ratio > log_hi)) | ((adv < 0) & (log_ratio < log_lo))
    lo, hi = _clip_range(clip_eps)
    bound = jnp.where(adv > 0, 1.0 + hi, 1.0 - lo).astype(jnp.float32)
    # exp of 0 (not of log_ratio) on clipped entries: an overflowing r there would otherwise
    # give 0 * inf = NaN in the backward pass of the where.
    r = jnp.exp(jnp.where(clipped, 0.0, log_ratio))
    obj = jnp.where(clipped, jax.lax.stop_gradient(bound * adv), r * adv)
    return obj, clipped


def _ppo_terms(log_ratio: Array, adv: Array, mask: Array, clip_eps):
    """Per-entry clipped surrogate and shared metrics. log_ratio/mask [B, N], adv [B, 1]."""
    log_lo, log_hi = log_clip_bounds(clip_eps)
    # Invalid entries may hold garbage (even +-inf): zero them before exp so 0 * inf never
    # appears in values or gradients.
    log_ratio = jnp.where(mask > 0, log_ratio, 0.0)
    obj, clipped = clipped_surrogate(log_ratio, adv, clip_eps)

    valid = mask > 0
    any_valid = jnp.any(valid)
    sg_log_ratio = jax.lax.stop_gradient(log_ratio)
    sg_ratio = jnp.exp(sg_log_ratio)
    metrics = {
        "ratio_mean": _masked_mean(sg_ratio, mask),
        "ratio_min": jnp.where(any_valid, jnp.min(jnp.where(valid, sg_ratio, jnp.inf)), 1.0),
        "ratio_max": jnp.where(any_valid, jnp.max(jnp.where(valid, sg_ratio, -jnp.inf)), 1.0),
        "clip_frac": _masked_mean(clipped.astype(jnp.float32), mask),
        "ratio_out_frac": _masked_mean(
            ((sg_log_ratio < log_lo) | (sg_log_ratio > log_hi)).astype(jnp.float32), mask),
    }
    return obj, metrics


def _k3(d: Array) -> Array:
    """k3 KL estimator exp(d) - d - 1 for d = log(p / q) on samples of q."""
    return jnp.exp(d) - d - 1.0


def text_grpo_loss(logp, old_logp, advantages, mask, clip_eps, *, aggregation: str = "seq_mean",
                   ref_logp=None, kl_coef: float = 0.0):
    """GRPO loss on the reasoning tokens (docs/method.md §4).

    Args:
      logp, old_logp: [B, T] log-probs of the sampled tokens under theta / the rollout policy.
      advantages: [B] (one per trajectory).
      mask: [B, T] 1 for reasoning tokens that are actions, 0 for prompt/padding.
      clip_eps: float e or (lo, hi): ratio clipped to [1 - lo, 1 + hi].
      aggregation: "seq_mean" (paper: mean over a sequence's valid tokens, then mean over all B
        sequences; a sequence with no valid token contributes 0) or "token_mean" (DAPO: sum
        over all valid tokens / their count).
      ref_logp: [B, T] frozen-reference log-probs; adds ``kl_coef * k3`` with per-token
        ``k3 = exp(ref - logp) - (ref - logp) - 1``, aggregated like the objective.
    Returns: (loss, metrics); metrics documented in the module docstring, plus
      ``policy_loss`` and (with ref_logp) ``kl_ref``.
    """
    if aggregation not in ("seq_mean", "token_mean"):
        raise ValueError(f"aggregation must be 'seq_mean' or 'token_mean', got {aggregation!r}")
    logp, old_logp, mask = _f32(logp), _f32(old_logp), _f32(mask)
    adv = _f32(advantages)[:, None]
    d_old = logp - old_logp
    obj, metrics = _ppo_terms(d_old, adv, mask, clip_eps)

    def aggregate(x):
        x = jnp.where(mask > 0, x, 0.0) * mask
        if aggregation == "token_mean":
            return jnp.sum(x) / jnp.maximum(jnp.sum(mask), 1.0)
        per_seq = jnp.sum(x, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        return jnp.mean(per_seq)

    policy_loss = -aggregate(obj)
    loss = policy_loss
    metrics["policy_loss"] = policy_loss
    metrics["approx_kl"] = _masked_mean(
        _k3(jax.lax.stop_gradient(jnp.where(mask > 0, d_old, 0.0))), mask)
    if ref_logp is not None:
        d_ref = jnp.where(mask > 0, _f32(ref_logp) - logp, 0.0)
        kl = aggregate(_k3(d_ref))
        loss = loss + kl_coef * kl
        metrics["kl_ref"] = kl
    metrics = {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
    return loss, metrics


def flow_grpo_loss(logp, old_logp, advantages, clip_eps, *, step_std=None, mean_sq_diff=None,
                   ratio_norm: bool = False, dt=None, reweight_by_dt: bool = False, mask=None):
    """Flow-GRPO clipped surrogate over the K stochastic window steps (docs/method.md §5).

    Args:
      logp, old_logp: [B, K] per-step log-probs (per-element means, see ``step_logprob``).
      advantages: [B].
      clip_eps: float e or (lo, hi); tiny in practice (1e-4 .. 1e-6).
      step_std: [B, K] transition std ``s_k = std_t sqrt(-dt)``; needed for ratio_norm.
      mean_sq_diff: [B, K] ``mean_elements((mean_old - mean_theta)^2)``; needed for ratio_norm.
        Pass it WITHOUT stop_gradient: it depends on theta and is part of the normalised ratio.
      ratio_norm: GRPO-Guard RatioNorm,
        ``log r = s_k (logp - old_logp + mean_sq_diff / (2 s_k^2))`` (= mean(eps * dmu) form,
        centred at 0 whatever the step's noise scale).
      dt: [B, K] ``t_next - t`` (< 0); needed for reweight_by_dt.
      reweight_by_dt: GRPO-Guard gradient reweighting: each step's objective is divided by
        ``-dt`` (larger weight on short steps); off by default (docs/method.md: [ours]).
      mask: [B, K] optional, 0 for padded / unused window slots.
    Returns: (loss, metrics); loss = -(mean over valid (b, k) of the per-step objective).
    """
    logp, old_logp = _f32(logp), _f32(old_logp)
    mask = jnp.ones_like(logp) if mask is None else _f32(mask)
    adv = _f32(advantages)[:, None]
    d_old = logp - old_logp
    log_ratio = d_old
    if ratio_norm:
        if step_std is None or mean_sq_diff is None:
            raise ValueError("ratio_norm=True needs step_std and mean_sq_diff")
        s = _f32(step_std)
        safe_s = jnp.where(s > 0, s, 1.0)  # s == 0 only on masked / deterministic slots
        log_ratio = s * (d_old + _f32(mean_sq_diff) / (2.0 * safe_s * safe_s))
    obj, metrics = _ppo_terms(log_ratio, adv, mask, clip_eps)
    if reweight_by_dt:
        if dt is None:
            raise ValueError("reweight_by_dt=True needs dt")
        neg_dt = -_f32(dt)
        obj = obj / jnp.where(neg_dt > 0, neg_dt, 1.0)
    loss = -_masked_mean(obj, mask)
    metrics["policy_loss"] = loss
    metrics["approx_kl"] = _masked_mean(
        _k3(jax.lax.stop_gradient(jnp.where(mask > 0, d_old, 0.0))), mask)
    metrics = {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
    return loss, metrics


def _broadcast_mask(mask, like: Array) -> Array:
    """Right-pads a leading-axes mask ([B] or [B, K]) to ``like``'s rank and broadcasts it."""
    mask = _f32(mask)
    mask = mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))
    return jnp.broadcast_to(mask, like.shape)


def velocity_mse(v, v_ref, mask=None):
    """Velocity-MSE regulariser: mean over all elements of (v - v_ref)^2 (docs/method.md §6).

    Args:
      v: [B, ...] velocity of the trained model; v_ref: same shape, frozen reference (gradient
        stopped here).
      mask: optional leading-axes mask ([B] or [B, K]); the mean is over valid elements.
    Returns: (loss, {"velocity_mse": loss}).
    """
    v = _f32(v)
    sq = jnp.square(v - jax.lax.stop_gradient(_f32(v_ref)))
    loss = jnp.mean(sq) if mask is None else _masked_mean(sq, _broadcast_mask(mask, sq))
    return loss, {"velocity_mse": jax.lax.stop_gradient(loss)}


def latent_kl(mean_theta, mean_ref, std, mask=None):
    """Flow-GRPO latent KL: per (row, step) ``mean_elements((mu_theta - mu_ref)^2) / (2 std^2)``.

    Args:
      mean_theta, mean_ref: [B, K, ...] step means (mean_ref gradient stopped).
      std: [B, K] (> 0) Flow-GRPO's KL scale ``flow.kl_std``: the SDE's ``std_t =
        a sqrt(t / (1 - t'))``, not the transition std ``std_t sqrt(-dt)`` (CPS: ``s``).
      mask: optional [B, K].
    Returns: (loss, {"latent_kl": loss}) with loss the mean over valid (row, step).
    """
    mean_theta = _f32(mean_theta)
    diff = jnp.square(mean_theta - jax.lax.stop_gradient(_f32(mean_ref)))
    per = jnp.mean(diff.reshape(diff.shape[:2] + (-1,)), axis=-1)  # [B, K]
    std = _f32(std)
    kl = per / (2.0 * jnp.square(jnp.where(std > 0, std, 1.0)))
    loss = jnp.mean(kl) if mask is None else _masked_mean(kl, _f32(mask))
    return loss, {"latent_kl": jax.lax.stop_gradient(loss)}


REGULARIZERS = ("velocity_mse", "latent_kl", "none")


def regularizer_loss(kind: str, *, v=None, v_ref=None, mean_theta=None, mean_ref=None, std=None,
                     mask=None):
    """Selects the flow regulariser by name: "velocity_mse" (v, v_ref), "latent_kl"
    (mean_theta, mean_ref, std = ``flow.kl_std``, see ``latent_kl``) or "none" (returns 0).
    Returns (loss, metrics)."""
    if kind == "none":
        return jnp.float32(0.0), {}
    if kind == "velocity_mse":
        if v is None or v_ref is None:
            raise ValueError("velocity_mse regulariser needs v and v_ref")
        return velocity_mse(v, v_ref, mask)
    if kind == "latent_kl":
        if mean_theta is None or mean_ref is None or std is None:
            raise ValueError("latent_kl regulariser needs mean_theta, mean_ref and std")
        return latent_kl(mean_theta, mean_ref, std, mask)
    raise ValueError(f"unknown regularizer kind {kind!r}; choose from {REGULARIZERS}")
