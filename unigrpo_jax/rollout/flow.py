"""Rectified-flow samplers for the image policy (docs/method.md §1 and §5).

Convention: ``x_t = (1 - t) x0 + t eps``, the model predicts ``v = eps - x0`` and sampling
runs t from 1 (noise) down to 0 (data). ``dt = t_next - t`` is therefore negative.

* ``timesteps``: the shifted time grid.
* ``sde_step`` / ``cps_step``: one stochastic step (Flow-GRPO Euler-Maruyama / CPS) that
  returns the Gaussian transition ``N(mean, std^2 I)`` it sampled from.
* ``step_logprob``: per-row log-density of a transition, averaged over latent elements.
* ``sample_flow``: a whole trajectory in one ``lax.scan``; ODE steps outside a window of
  ``size`` stochastic steps (Flow-GRPO-Fast), with per-row window starts. It records the
  window transitions the trainer needs to recompute log-probs.

All float math is float32, whatever dtype the velocity model returns.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def timesteps(num_steps: int, shift: float) -> Array:
    """Shifted descending grid ``t' = shift s / (1 + (shift - 1) s)``, ``s = linspace(1, 0)``.

    Returns float32 [num_steps + 1], descending from 1.0 to exactly 0.0. The first entry is 1
    only up to float32 rounding (0.99999976 at shift 0.1), so nothing may test ``t == 1``: the
    SDE's first-step rule is selected by step index (``sde_step(first_step=...)``).
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    s = jnp.linspace(1.0, 0.0, int(num_steps) + 1, dtype=jnp.float32)
    shift = jnp.float32(shift)
    return (shift * s / (1.0 + (shift - 1.0) * s)).astype(jnp.float32)


def _expand(a: Array, ndim: int) -> Array:
    """Right-pads ``a`` with singleton axes to rank ``ndim`` (scalar or [B] -> [B, 1, ...])."""
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def _batch_col(a: Array, x: Array) -> Array:
    """Scalar or [B] -> [B, 1, ...] with x's rank (always carries the batch axis)."""
    a = _expand(jnp.asarray(a, jnp.float32), x.ndim)
    return jnp.broadcast_to(a, (x.shape[0],) + (1,) * (x.ndim - 1))


def _euler(x: Array, v: Array, dt: Array) -> Array:
    # Single place that defines the ODE step, so the a == 0 path matches it bit for bit.
    return x + v * dt


def _is_static_zero(noise_level) -> bool:
    return isinstance(noise_level, (int, float)) and float(noise_level) == 0.0


def _safe_sqrt(a: Array) -> Array:
    """sqrt with value 0 and gradient 0 (not inf/NaN) where a <= 0."""
    pos = a > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, a, 1.0)), 0.0)


def sde_step(x, v, t, t_next, noise, noise_level, *, first_step):
    """One Flow-GRPO Euler-Maruyama step of the marginal-preserving reverse SDE.

    ``std_t = a sqrt(t / (1 - t'))`` with ``t' = t``, except on the first step of the grid
    (``first_step``), where ``t = 1`` makes ``t / (1 - t)`` infinite and ``t' = t_next``;
    ``mean = x + [v + std_t^2 / (2 t) (x + (1 - t) v)] dt``; ``x_next = mean + std_t sqrt(-dt) eps``.

    Args:
      x, v, noise: [B, ...] state, velocity and standard-normal noise (cast to float32).
      t, t_next: scalars or [B]; ``t_next < t``.
      first_step: bool scalar or [B]: the step is step 0 of its time grid. Selected by index,
        not by ``t == 1``: the float32 grid starts slightly below 1 for some shifts, and the
        float test then gave a first-step std of ~900 instead of ~a.
      noise_level: ``a``, a Python float or a traced scalar. ``a == 0`` gives exactly the Euler
        step ``x + v (t_next - t)`` (bit for bit as computed in the same program: under jit XLA
        may fuse ``x + v dt`` into an FMA, identically for both).
    Returns:
      ``(x_next [B, ...], mean [B, ...], std [B, 1, ..., 1])`` with ``std = std_t sqrt(-dt)``
      the transition std (rank of x, batch axis kept, so it broadcasts against x).
    """
    x = jnp.asarray(x, jnp.float32)
    v = jnp.asarray(v, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    t = _batch_col(t, x)
    t_next = _batch_col(t_next, x)
    dt = t_next - t
    euler = _euler(x, v, dt)
    if _is_static_zero(noise_level):
        return euler, euler, jnp.zeros_like(t)

    a = jnp.asarray(noise_level, jnp.float32)
    first = _batch_col(jnp.asarray(first_step, jnp.float32), x) > 0
    t_prime = jnp.where(first, t_next, t)
    one_minus = 1.0 - t_prime
    # Guard 1 - t' == 0 (only a degenerate t == t_next == 1 step could hit it).
    safe_one_minus = jnp.where(one_minus > 0, one_minus, 1.0)
    std_t = a * _safe_sqrt(t / safe_one_minus)
    # std_t^2 / (2 t) == a^2 / (2 (1 - t')) for t > 0: same quantity, but it never divides by
    # t, so a step starting at t == 0 (or its gradient) cannot produce inf/NaN.
    coef = jnp.where(one_minus > 0, a * a / (2.0 * safe_one_minus), 0.0)
    # Written as "Euler + correction" so that a traced a == 0 also reproduces Euler exactly.
    mean = euler + coef * (x + (1.0 - t) * v) * dt
    std = std_t * _safe_sqrt(-dt)
    x_next = mean + std * noise
    return x_next, mean, std


def cps_step(x, v, t, t_next, noise, noise_level, *, first_step=False):
    """One coefficient-preserving (CPS) step.

    ``s = t_next sin(a pi / 2)``, ``x0_hat = x - t v``, ``x1_hat = x + (1 - t) v``,
    ``mean = (1 - t_next) x0_hat + sqrt(t_next^2 - s^2) x1_hat``, ``x_next = mean + s eps``.

    Shapes as ``sde_step`` (``first_step`` is accepted for a common signature and unused);
    returns ``(x_next, mean, std [B, 1, ..., 1])`` with ``std = s``.
    Note ``std == 0`` at ``t_next == 0``: the final step is deterministic under CPS.
    ``a == 0`` (Python float) returns the Euler step exactly.
    """
    del first_step
    x = jnp.asarray(x, jnp.float32)
    v = jnp.asarray(v, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    t = _batch_col(t, x)
    t_next = _batch_col(t_next, x)
    if _is_static_zero(noise_level):
        euler = _euler(x, v, t_next - t)
        return euler, euler, jnp.zeros_like(t)
    a = jnp.asarray(noise_level, jnp.float32)
    s = t_next * jnp.sin(a * (jnp.pi / 2.0))
    x0_hat = x - t * v
    x1_hat = x + (1.0 - t) * v
    mean = (1.0 - t_next) * x0_hat + _safe_sqrt(t_next * t_next - s * s) * x1_hat
    x_next = mean + s * noise
    return x_next, mean, s


def step_logprob(x_next, mean, std) -> Array:
    """Log N(x_next; mean, std^2 I), AVERAGED over all non-batch elements (docs/method.md §5).

    Args:
      x_next, mean: [B, ...].
      std: scalar, [B] or [B, 1, ...] (right-padded to x's rank); must be > 0.
    Returns: float32 [B].
    """
    x_next = jnp.asarray(x_next, jnp.float32)
    mean = jnp.asarray(mean, jnp.float32)
    std = _expand(jnp.asarray(std, jnp.float32), x_next.ndim)
    lp = -jnp.square(x_next - mean) / (2.0 * jnp.square(std)) - jnp.log(std) - _LOG_SQRT_2PI
    lp = jnp.broadcast_to(lp, x_next.shape)
    return jnp.mean(lp.reshape(lp.shape[0], -1), axis=-1)


_STEP_FNS = {"sde": sde_step, "cps": cps_step}


def kl_std(step_std, t, t_next, sde_type: str = "sde") -> Array:
    """The std Flow-GRPO's latent KL divides by, from a step's transition std.

    Flow-GRPO's KL is ``mean((mu_theta - mu_ref)^2) / (2 sigma^2)`` with sigma the SDE's
    diffusion coefficient ``std_t = a sqrt(t / (1 - t'))`` (sde), NOT the transition std
    ``std_t sqrt(-dt)`` (using that made the KL ``1 / (-dt)`` = 15-73x stronger at 10-25 steps).
    For CPS it is the transition std ``s`` itself.
    Args: step_std, t, t_next: [...] (same shape; ``t_next < t`` where step_std > 0).
    Returns: float32 [...]; 1 where ``-dt <= 0`` (unused slots) so that nothing divides by 0.
    """
    if sde_type not in _STEP_FNS:
        raise ValueError(f"sde_type must be one of {sorted(_STEP_FNS)}, got {sde_type!r}")
    step_std = jnp.asarray(step_std, jnp.float32)
    if sde_type == "cps":
        return step_std
    neg_dt = jnp.asarray(t, jnp.float32) - jnp.asarray(t_next, jnp.float32)
    return jnp.where(neg_dt > 0, step_std / jnp.sqrt(jnp.where(neg_dt > 0, neg_dt, 1.0)), 1.0)


def recompute_logprob(x_t, v, t, t_next, x_next, noise_level, sde_type: str = "sde", *,
                      first_step):
    """Trainer side: log-prob of a recorded transition under a new velocity ``v``.

    Rebuilds the step's Gaussian with the same formula the sampler used (``sde_step`` or
    ``cps_step``; the mean does not depend on the noise), so with the rollout's own velocity
    the ratio is 1 up to float rounding.
    Args: x_t, v, x_next [B, ...]; t, t_next scalars or [B]; first_step: bool scalar or [B]
      (the recorded ``step_index == 0``).
    Returns: ``(logp [B], mean [B, ...], std [B, 1, ..., 1])``.
    """
    if sde_type not in _STEP_FNS:
        raise ValueError(f"sde_type must be one of {sorted(_STEP_FNS)}, got {sde_type!r}")
    x_t = jnp.asarray(x_t, jnp.float32)
    _, mean, std = _STEP_FNS[sde_type](x_t, v, t, t_next, jnp.zeros_like(x_t), noise_level,
                                       first_step=first_step)
    return step_logprob(x_next, mean, std), mean, std


@flax.struct.dataclass
class FlowSample:
    """Result of ``sample_flow``. W = window size; records are indexed [row, window slot].

    x0:         [B, ...]   final sample at t = 0 (float32).
    x_t:        [B, W, ...] state before each window step.
    x_next:     [B, W, ...] state after it (the sampled action).
    mean:       [B, W, ...] mean of the step's Gaussian transition.
    std:        [B, W]     scalar transition std of the step.
    t, t_next:  [B, W]     times of the step (t_next < t).
    logp:       [B, W]     step_logprob(x_next, mean, std).
    step_index: [B, W]     int32 grid index of the step (-1 for a slot the window never reached,
                           i.e. start + W > num_steps; such slots hold zeros).
    """

    x0: Array
    x_t: Array
    x_next: Array
    mean: Array
    std: Array
    t: Array
    t_next: Array
    logp: Array
    step_index: Array


def sample_flow(
    velocity_fn: Callable[[Array, Array], Array],
    noise: Array,
    timesteps: Array,
    key: Array,
    *,
    noise_level,
    sde_window: tuple,
    sde_type: str = "sde",
) -> FlowSample:
    """Samples x0 from ``noise`` (x at t = 1) with one ``lax.scan`` over the grid.

    Steps i with ``start <= i < start + size`` are stochastic (``sde_step``/``cps_step``), all
    others are Euler ODE steps. ``velocity_fn(x [B, ...] f32, t [B] f32) -> v`` is called once
    per step; both step kinds are then formed elementwise and chosen per row.

    Args:
      velocity_fn: the model; its output is cast to float32.
      noise: [B, ...] initial state at t = timesteps[0] (normally 1).
      timesteps: [num_steps + 1] descending grid (see ``timesteps``).
      key: PRNG key; step i draws its [B, ...] noise from ``fold_in(key, i)``.
      noise_level: ``a``, Python float or traced scalar.
      sde_window: ``(start, size)``; ``size`` a static int >= 0, ``start`` a Python int or an
        int32 array [B] (one window per row). ``(0, num_steps)`` makes every step stochastic.
      sde_type: "sde" (Flow-GRPO) or "cps".
    With ``noise_level == 0`` (or CPS at t_next == 0) a window step has std 0 and its ``logp``
    is not finite; windows are meant for a > 0 at high noise.
    Returns: ``FlowSample`` (fields and shapes in its docstring). Rows' records can be
      re-scored under new parameters with ``recompute_logprob``.
    """
    if sde_type not in _STEP_FNS:
        raise ValueError(f"sde_type must be one of {sorted(_STEP_FNS)}, got {sde_type!r}")
    step_fn = _STEP_FNS[sde_type]
    start, size = sde_window
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"sde_window size must be a static int >= 0, got {size!r}")
    grid = jnp.asarray(timesteps, jnp.float32)
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"timesteps must be 1-D with >= 2 entries, got shape {grid.shape}")
    num_steps = grid.shape[0] - 1
    x = jnp.asarray(noise, jnp.float32)
    batch = x.shape[0]
    if isinstance(start, int):
        if start < 0 or start + size > num_steps:
            raise ValueError(
                f"sde_window {(start, size)} does not fit in {num_steps} steps")
    start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (batch,))

    feat = x.shape[1:]
    buf = jnp.zeros((batch, size) + feat, jnp.float32)
    row_buf = jnp.zeros((batch, size), jnp.float32)
    init = dict(
        x=x, x_t=buf, x_next=buf, mean=buf, std=row_buf, t=row_buf, t_next=row_buf,
        logp=row_buf, step_index=jnp.full((batch, size), -1, jnp.int32))

    def body(carry, inp):
        i, t, t_next = inp
        x = carry["x"]
        v = velocity_fn(x, jnp.full((batch,), t, jnp.float32)).astype(jnp.float32)
        eps = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        ode = _euler(x, v, t_next - t)
        sde_next, mean, std = step_fn(x, v, t, t_next, eps, noise_level, first_step=i == 0)
        in_win = (i >= start) & (i < start + size)  # [B]
        x_new = jnp.where(_expand(in_win, x.ndim), sde_next, ode)
        logp = step_logprob(sde_next, mean, std)
        out = dict(x=x_new)
        if size == 0:
            return {**carry, **out}, None
        # Each row writes its own slot i - start with a gather + scatter (O(B * D) per step,
        # in place on the scan carry); rows outside their window write back what was there.
        rows = jnp.arange(batch)
        slot = jnp.clip(i - start, 0, size - 1)

        def put(b, val):  # b [B, W, ...], val [B, ...] or a scalar broadcast to [B]
            val = jnp.broadcast_to(jnp.asarray(val, b.dtype), (batch,) + b.shape[2:])
            keep = b[rows, slot]
            new = jnp.where(_expand(in_win, val.ndim), val, keep)
            return b.at[rows, slot].set(new, unique_indices=True)

        out.update(
            x_t=put(carry["x_t"], x),
            x_next=put(carry["x_next"], sde_next),
            mean=put(carry["mean"], mean),
            std=put(carry["std"], std.reshape(batch)),
            t=put(carry["t"], t),
            t_next=put(carry["t_next"], t_next),
            logp=put(carry["logp"], logp),
            step_index=put(carry["step_index"], i),
        )
        return out, None

    steps = jnp.arange(num_steps, dtype=jnp.int32)
    final, _ = jax.lax.scan(body, init, (steps, grid[:-1], grid[1:]))
    return FlowSample(
        x0=final["x"], x_t=final["x_t"], x_next=final["x_next"], mean=final["mean"],
        std=final["std"], t=final["t"], t_next=final["t_next"], logp=final["logp"],
        step_index=final["step_index"])


def random_window_start(key, batch: int, window_range: tuple, size: int, *,
                        group_size: int | None = None) -> Array:
    """Per-row window starts so that steps ``[start, start + size)`` lie in ``[lo, hi)``.

    start ~ Uniform{lo, ..., hi - size}; e.g. range (0, 5), size 3 -> start in {0, 1, 2}.
    With ``group_size`` the start is drawn once per group of contiguous rows and shared.
    Returns int32 [batch].
    """
    lo, hi = window_range
    for name, val in (("batch", batch), ("size", size), ("range low", lo), ("range high", hi)):
        if not isinstance(val, int):
            raise ValueError(f"{name} must be a Python int, got {val!r}")
    if batch < 1 or size < 1:
        raise ValueError(f"batch and size must be >= 1, got batch={batch}, size={size}")
    if lo < 0 or hi - lo < size:
        raise ValueError(f"window of size {size} does not fit in range [{lo}, {hi})")
    if group_size is None:
        return jax.random.randint(key, (batch,), lo, hi - size + 1, dtype=jnp.int32)
    if group_size < 1 or batch % group_size:
        raise ValueError(f"batch {batch} is not a multiple of group_size {group_size}")
    per_group = jax.random.randint(key, (batch // group_size,), lo, hi - size + 1, jnp.int32)
    return jnp.repeat(per_group, group_size)
