"""Tests for unigrpo_jax.rollout.flow: step formulas vs float64 NumPy, marginals, records."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unigrpo_jax.rollout import flow

# Toy data x0 ~ N(M, S^2) per element: the exact rectified-flow velocity is known in closed form.
M, S = 0.7, 0.4


def make_velocity(m, s):
    """E[eps - x0 | x_t = x] for x0 ~ N(m, s^2), eps ~ N(0, 1) (works for NumPy and JAX)."""

    def velocity(x, t):
        t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
        return (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2) * (x - (1 - t) * m) - m

    return velocity


exact_velocity = make_velocity(M, S)


# ---------------------------------------------------------------- NumPy float64 references


def np_grid(n, shift):
    s = np.linspace(1.0, 0.0, n + 1)
    return shift * s / (1 + (shift - 1) * s)


def np_col(a, x):
    a = np.broadcast_to(np.asarray(a, np.float64), (x.shape[0],))
    return a.reshape((-1,) + (1,) * (x.ndim - 1))


def np_sde_step(x, v, t, tn, eps, a, first):
    """first: the step is step 0 of its grid (then t' = t_next)."""
    x, v, eps = (np.asarray(z, np.float64) for z in (x, v, eps))
    t, tn, first = np_col(t, x), np_col(tn, x), np_col(first, x) > 0
    dt = tn - t
    tp = np.where(first, tn, t)
    std_t = a * np.sqrt(t / (1 - tp))
    mean = x + (v + std_t**2 / (2 * t) * (x + (1 - t) * v)) * dt
    std = std_t * np.sqrt(-dt)
    return mean + std * eps, mean, std


def np_cps_step(x, v, t, tn, eps, a):
    x, v, eps = (np.asarray(z, np.float64) for z in (x, v, eps))
    t, tn = np_col(t, x), np_col(tn, x)
    s = tn * np.sin(a * np.pi / 2)
    x0 = x - t * v
    x1 = x + (1 - t) * v
    mean = (1 - tn) * x0 + np.sqrt(tn**2 - s**2) * x1
    return mean + s * eps, mean, s


def np_logprob(xn, mean, std):
    xn, mean = np.asarray(xn, np.float64), np.asarray(mean, np.float64)
    std = np.asarray(std, np.float64)
    std = std.reshape(std.shape + (1,) * (xn.ndim - std.ndim))
    lp = -((xn - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi)
    return np.broadcast_to(lp, xn.shape).reshape(xn.shape[0], -1).mean(-1)


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- timesteps


@pytest.mark.parametrize("n,shift", [(25, 3.0), (10, 1.0), (7, 0.5)])
def test_timesteps(n, shift):
    g = flow.timesteps(n, shift)
    assert g.shape == (n + 1,) and g.dtype == jnp.float32
    assert float(g[0]) == 1.0 and float(g[-1]) == 0.0
    assert np.all(np.diff(np.asarray(g)) < 0)
    np.testing.assert_allclose(g, np_grid(n, shift), rtol=1e-6, atol=1e-7)


def test_timesteps_shift_moves_time_up():
    # shift > 1 spends more steps at high noise: every interior point lies above the linear grid.
    g3, g1 = np.asarray(flow.timesteps(10, 3.0)), np.asarray(flow.timesteps(10, 1.0))
    assert np.all(g3[1:-1] > g1[1:-1])


def test_timesteps_bad_args():
    with pytest.raises(ValueError):
        flow.timesteps(0, 3.0)
    with pytest.raises(ValueError):
        flow.timesteps(10, 0.0)


# ---------------------------------------------------------------- single steps


def _step_cases():
    g = np_grid(10, 3.0)
    B = 5
    return [
        ("first", 1.0, g[1], True),  # the first step uses t' = t_next
        ("middle_scalar", g[4], g[5], False),
        ("last", g[-2], 0.0, False),  # step to t == 0
        # [B] times incl. the first step (t = 1) and t_next = 0
        ("per_row", g[[0, 2, 4, 6, 9]], g[[1, 3, 5, 7, 10]], [True, False, False, False, False]),
    ], B


_jit_sde = jax.jit(lambda *a, first: flow.sde_step(*a, first_step=first))
_jit_cps = jax.jit(flow.cps_step)


@pytest.mark.parametrize("a", [0.7, 1.0, 0.3])
def test_sde_step_matches_numpy(a):
    cases, B = _step_cases()
    x, v, eps = rand((B, 3, 4), 0), rand((B, 3, 4), 1), rand((B, 3, 4), 2)
    for name, t, tn, first in cases:
        xn, mean, std = _jit_sde(x, v, jnp.asarray(t, jnp.float32),
                                 jnp.asarray(tn, jnp.float32), eps, jnp.float32(a),
                                 first=jnp.asarray(first))
        t32 = np.asarray(t, np.float32).astype(np.float64)  # compare on the float32 grid
        tn32 = np.asarray(tn, np.float32).astype(np.float64)
        rxn, rmean, rstd = np_sde_step(x, v, t32, tn32, eps, a, first)
        assert xn.dtype == jnp.float32 and std.shape == (B, 1, 1), name
        np.testing.assert_allclose(mean, rmean, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(xn, rxn, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(std, rstd, rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(
            flow.step_logprob(xn, mean, std), np_logprob(rxn, rmean, rstd), rtol=1e-5, atol=1e-5)


def test_sde_step_first_step_uses_t_next():
    # At t == 1 the naive t/(1-t) is infinite; the step must be finite and use t' = t_next.
    x, v, eps = rand((2, 8), 0), rand((2, 8), 1), rand((2, 8), 2)
    _, _, std = flow.sde_step(x, v, 1.0, 0.9, eps, 0.5, first_step=True)
    np.testing.assert_allclose(std[:, 0], 0.5 * math.sqrt(1 / 0.1) * math.sqrt(0.1), rtol=1e-6)


def test_sde_step_accepts_low_precision_inputs():
    x, v, eps = rand((2, 8), 0), rand((2, 8), 1), rand((2, 8), 2)
    xn, mean, _ = flow.sde_step(x.astype(jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), 0.5, 0.4,
                                eps, 0.7, first_step=False)
    assert xn.dtype == jnp.float32 and mean.dtype == jnp.float32


@pytest.mark.parametrize("step", [flow.sde_step, flow.cps_step])
def test_noise_level_zero_is_exact_euler(step):
    x, v, eps = rand((4, 6), 0), rand((4, 6), 1), rand((4, 6), 2)
    t = np.asarray([1.0, 0.8, 0.3, 0.05], np.float32)
    tn = np.asarray([0.9, 0.6, 0.1, 0.0], np.float32)
    euler = x + v * (tn - t)[:, None]  # float32 NumPy, no fused multiply-add
    first = np.arange(4) == 0
    xn, mean, std = step(x, v, t, tn, eps, 0.0, first_step=first)
    np.testing.assert_array_equal(np.asarray(xn), euler)
    np.testing.assert_array_equal(np.asarray(mean), euler)
    assert np.all(np.asarray(std) == 0)
    if step is flow.sde_step:
        # A traced a == 0 (no Python branch possible) must still be exactly Euler. Under jit
        # XLA may contract x + v * dt into an FMA, so compare with the jitted Euler step.
        euler_j = jax.jit(lambda x, v, t, tn: x + v * (tn - t)[:, None])(x, v, t, tn)
        xn_j, mean_j, _ = jax.jit(functools.partial(step, first_step=first))(
            x, v, t, tn, eps, jnp.float32(0.0))
        np.testing.assert_array_equal(np.asarray(xn_j), np.asarray(euler_j))
        np.testing.assert_array_equal(np.asarray(mean_j), np.asarray(euler_j))


def test_sde_step_finite_values_and_grads_at_edges():
    x, v, eps = rand((3, 5), 0), rand((3, 5), 1), rand((3, 5), 2)

    def f(x, v, t, tn):
        xn, mean, std = flow.sde_step(x, v, t, tn, eps, 0.7, first_step=t == 1.0)
        return jnp.sum(xn) + jnp.sum(mean) + jnp.sum(std)

    f_and_grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
    # t == 1 first step, t_next == 0 last step, and a degenerate step starting at t == 0.
    for t, tn in [(1.0, 0.9), (0.05, 0.0), (0.0, 0.0), (1.0, 1.0)]:
        val, grads = f_and_grads(x, v, jnp.float32(t), jnp.float32(tn))
        assert np.isfinite(float(val)), (t, tn)
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g))), (t, tn)


@pytest.mark.parametrize("a", [0.7, 0.2])
def test_cps_step_matches_numpy(a):
    cases, B = _step_cases()
    x, v, eps = rand((B, 3, 4), 3), rand((B, 3, 4), 4), rand((B, 3, 4), 5)
    for name, t, tn, _ in cases:
        xn, mean, std = _jit_cps(x, v, jnp.asarray(t, jnp.float32),
                                 jnp.asarray(tn, jnp.float32), eps, jnp.float32(a))
        t32 = np.asarray(t, np.float32).astype(np.float64)
        tn32 = np.asarray(tn, np.float32).astype(np.float64)
        rxn, rmean, rstd = np_cps_step(x, v, t32, tn32, eps, a)
        assert std.shape == (B, 1, 1)
        np.testing.assert_allclose(mean, rmean, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(xn, rxn, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(std, rstd, rtol=1e-5, atol=1e-7, err_msg=name)


def test_step_logprob_std_shapes():
    xn, mean = rand((4, 2, 3), 0), rand((4, 2, 3), 1)
    std = np.asarray([0.1, 0.5, 1.0, 2.0], np.float32)
    ref = np_logprob(xn, mean, std)
    for s in (std, std[:, None, None]):
        lp = flow.step_logprob(xn, mean, s)
        assert lp.shape == (4,) and lp.dtype == jnp.float32
        np.testing.assert_allclose(lp, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(flow.step_logprob(xn, mean, 0.3), np_logprob(xn, mean, 0.3),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- marginal preservation

N_ROWS, N_EL = 4096, 8


def fast_key(seed):
    # The default threefry key costs ~1.5 s of XLA CPU compile per program that draws noise;
    # rbg keys compile in a fraction of that. sample_flow accepts any key type.
    return jax.random.key(seed, impl="unsafe_rbg")


_SAMPLERS = {}


def _sampler(size, sde_type="sde", velocity=exact_velocity):
    """One jitted sampler per window size / type: grid, noise level and starts are traced, so
    the parametrised marginal tests share a single compilation."""
    ck = (size, sde_type, velocity)
    if ck not in _SAMPLERS:
        def run(grid, a, starts, key):
            x1 = jax.random.normal(jax.random.fold_in(key, 10**6), (N_ROWS, N_EL), jnp.float32)
            return flow.sample_flow(velocity, x1, grid, key, noise_level=a,
                                    sde_window=(starts, size), sde_type=sde_type).x0

        _SAMPLERS[ck] = jax.jit(run)
    return _SAMPLERS[ck]


def _sample(grid, a, starts=0, size=None, sde_type="sde", velocity=exact_velocity, seed=0):
    size = grid.shape[0] - 1 if size is None else size
    starts = jnp.broadcast_to(jnp.asarray(starts, jnp.int32), (N_ROWS,))
    fn = _sampler(size, sde_type, velocity)
    return np.asarray(fn(grid, jnp.float32(a), starts, fast_key(seed)), np.float64)


# Standard errors with 32768 samples: mean 0.0022, std 0.0016. The tolerances leave room for
# the O(1/n) discretisation error but not for a wrong correction term (see the next test).
MEAN_TOL, STD_TOL = 0.01, 0.015


@pytest.mark.parametrize("shift,a", [(1.0, 0.0), (1.0, 0.7), (3.0, 0.7), (1.0, 1.0)])
def test_sde_preserves_marginals(shift, a):
    # a == 0 is the Euler ODE (traced here: the same compiled scan as the SDE cases).
    x0 = _sample(flow.timesteps(100, shift), a)
    assert abs(x0.mean() - M) < MEAN_TOL
    assert abs(x0.std() - S) < STD_TOL


def test_marginal_tolerances_catch_wrong_correction():
    """Float64 NumPy run of the same SDE with the correction term mis-scaled (sign flipped,
    dropped, or 1.3x): each must miss the tolerance used above, so those tests have teeth."""
    rng = np.random.default_rng(0)
    g = np_grid(100, 1.0)
    for factor in (-1.0, 0.0, 1.3):
        x = rng.standard_normal(N_ROWS * N_EL)
        for i in range(100):
            t, tn = g[i], g[i + 1]
            tp = tn if i == 0 else t
            std_t = 0.7 * np.sqrt(t / (1 - tp))
            v = exact_velocity(x, np.float64(t))
            x = x + (v + factor * std_t**2 / (2 * t) * (x + (1 - t) * v)) * (tn - t)
            x = x + std_t * np.sqrt(t - tn) * rng.standard_normal(x.shape)
        assert abs(x.std() - S) > 2 * STD_TOL, factor


def test_window_sampling_preserves_marginals():
    starts = flow.random_window_start(fast_key(7), N_ROWS, (0, 10), 3)
    assert len(np.unique(np.asarray(starts))) == 8
    x0 = _sample(flow.timesteps(100, 1.0), 0.8, starts=starts, size=3)
    assert abs(x0.mean() - M) < MEAN_TOL
    assert abs(x0.std() - S) < STD_TOL


_POINT_MASS_VELOCITY = make_velocity(M, 0.0)


def test_cps_preserves_marginal_for_point_mass_data():
    # CPS keeps x_t = (1 - t) x0_hat + t * (unit noise) exactly when x0_hat is exact, i.e. for
    # point-mass data (S -> 0). Stop at t = 0.5: x should be N((1 - t) M, t^2).
    grid = flow.timesteps(20, 1.0)[:11]
    assert float(grid[-1]) == pytest.approx(0.5)
    x = _sample(grid, 0.7, sde_type="cps", velocity=_POINT_MASS_VELOCITY)
    assert abs(x.mean() - 0.5 * M) < MEAN_TOL
    assert abs(x.std() - 0.5) < 0.01


# ---------------------------------------------------------------- sample_flow records


def toy_velocity(x, t):
    # Nonlinear in x and t, returned in bfloat16 like a mixed-precision model.
    w = jnp.linspace(-1.0, 1.0, x.shape[-1], dtype=jnp.float32)
    return (jnp.tanh(x * w) * t[:, None, None] - 0.3 * x).astype(jnp.bfloat16)


def reference_loop(velocity_fn, noise, grid, key, a, starts, size, step_fn):
    """Step-by-step reference for sample_flow (same noise keys), bookkeeping in NumPy."""
    x = np.asarray(noise, np.float32)
    B = x.shape[0]
    recs = {k: np.zeros((B, size) + (x.shape[1:] if k in ("x_t", "x_next", "mean") else ()),
                        np.int32 if k == "step_index" else np.float32)
            for k in ("x_t", "x_next", "mean", "std", "t", "t_next", "logp", "step_index")}
    g = np.asarray(grid)

    @jax.jit  # one compiled step, called per grid point (eager op-by-op is slow)
    def one_step(x, t, tn, i):
        v = velocity_fn(x, jnp.full((B,), t)).astype(jnp.float32)
        eps = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        sde_next, mean, std = step_fn(x, v, t, tn, eps, a, first_step=i == 0)
        return sde_next, mean, std, flow.step_logprob(sde_next, mean, std), x + v * (tn - t)

    for i in range(g.shape[0] - 1):
        t, tn = g[i], g[i + 1]
        sde_next, mean, std, lp, ode = (np.asarray(z) for z in one_step(x, t, tn, i))
        new_x = ode.copy()
        for b in range(B):
            j = i - int(starts[b])
            if 0 <= j < size:
                new_x[b] = sde_next[b]
                for k, val in (("x_t", x[b]), ("x_next", sde_next[b]), ("mean", mean[b]),
                               ("std", std[b].reshape(())), ("t", t), ("t_next", tn),
                               ("logp", lp[b]), ("step_index", i)):
                    recs[k][b, j] = val
        x = new_x
    return x, recs


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_sample_flow_records_match_reference_loop(sde_type):
    B, n, size, a = 6, 8, 3, 0.7
    grid = flow.timesteps(n, 3.0)
    noise = jnp.asarray(rand((B, 4, 5), 11))
    key = fast_key(3)
    starts = jnp.asarray([0, 1, 2, 5, 3, 0], jnp.int32)
    fn = jax.jit(lambda nz, k, st: flow.sample_flow(toy_velocity, nz, grid, k, noise_level=a,
                                                    sde_window=(st, size), sde_type=sde_type))
    out = fn(noise, key, starts)
    step_fn = flow.sde_step if sde_type == "sde" else flow.cps_step
    ref_x0, ref = reference_loop(toy_velocity, noise, grid, key, a, np.asarray(starts), size,
                                 step_fn)
    assert out.x0.dtype == jnp.float32 and out.x0.shape == (B, 4, 5)
    np.testing.assert_allclose(out.x0, ref_x0, rtol=1e-5, atol=1e-6)
    for k in ("x_t", "x_next", "mean"):
        assert getattr(out, k).shape == (B, size, 4, 5), k
    for k in ("std", "t", "t_next", "logp", "step_index"):
        assert getattr(out, k).shape == (B, size), k
    assert out.step_index.dtype == jnp.int32
    np.testing.assert_array_equal(out.step_index, np.asarray(starts)[:, None] + np.arange(size))
    for k in ("x_t", "x_next", "mean", "std", "t", "t_next", "logp"):
        np.testing.assert_allclose(getattr(out, k), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # The trainer recomputes logp from the records: it must agree with the stored one.
    flat = lambda z: z.reshape((B * size,) + z.shape[2:])
    np.testing.assert_allclose(
        flow.step_logprob(flat(out.x_next), flat(out.mean), flat(out.std)).reshape(B, size),
        out.logp, rtol=1e-6, atol=1e-6)
    # On-policy: re-scoring the records with the rollout's own velocity gives ratio 1.
    v = toy_velocity(flat(out.x_t), flat(out.t)).astype(jnp.float32)
    lp, mean, _ = flow.recompute_logprob(flat(out.x_t), v, flat(out.t), flat(out.t_next),
                                         flat(out.x_next), a, sde_type,
                                         first_step=flat(out.step_index) == 0)
    np.testing.assert_allclose(mean, flat(out.mean), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lp.reshape(B, size), out.logp, rtol=1e-6, atol=1e-6)
    # Records chain: the window's x_next of slot j is the x_t of slot j + 1.
    np.testing.assert_array_equal(out.x_next[:, :-1], out.x_t[:, 1:])


def test_sample_flow_compiles_once():
    traces = []

    def vel(x, t):
        traces.append(1)
        return -x * t[:, None]

    grid = flow.timesteps(6, 3.0)

    @jax.jit
    def fn(noise, key, starts):
        return flow.sample_flow(vel, noise, grid, key, noise_level=0.8, sde_window=(starts, 2))

    noise = jnp.asarray(rand((4, 3), 0))
    outs = [fn(noise, fast_key(s), jnp.asarray([s % 5, 0, 4, 1], jnp.int32))
            for s in range(3)]
    assert len(traces) == 1
    assert not np.allclose(outs[0].x0, outs[1].x0)


def test_sample_flow_full_window_and_static_start():
    grid = flow.timesteps(5, 1.0)
    noise = jnp.asarray(rand((3, 4), 0))
    key = fast_key(0)
    vel = lambda x, t: x * 0.5 - t[:, None]
    # Traced noise level: the all-SDE run and the a == 0 run share one compilation.
    run_full = jax.jit(lambda a: flow.sample_flow(vel, noise, grid, key, noise_level=a,
                                                  sde_window=(0, 5)))
    full = run_full(jnp.float32(0.5))
    np.testing.assert_array_equal(full.step_index, np.tile(np.arange(5), (3, 1)))
    np.testing.assert_allclose(full.t, np.tile(np.asarray(grid[:-1]), (3, 1)))
    np.testing.assert_allclose(full.t_next, np.tile(np.asarray(grid[1:]), (3, 1)))
    np.testing.assert_allclose(full.x_next[:, -1], full.x0)
    # noise_level 0 everywhere == the plain Euler ODE.
    ode = run_full(jnp.float32(0.0))
    x = np.asarray(noise)
    g = np.asarray(grid)
    for i in range(5):
        x = x + (x * 0.5 - g[i]) * (g[i + 1] - g[i])
    np.testing.assert_allclose(ode.x0, x, rtol=1e-6, atol=1e-6)
    # Python-int start == the same start as a per-row array.
    a = flow.sample_flow(vel, noise, grid, key, noise_level=0.5, sde_window=(1, 2))
    b = flow.sample_flow(vel, noise, grid, key, noise_level=0.5,
                         sde_window=(jnp.full((3,), 1, jnp.int32), 2))
    np.testing.assert_allclose(a.x0, b.x0, rtol=1e-6)
    np.testing.assert_allclose(a.logp, b.logp, rtol=1e-6)
    # Step 0 was an ODE step: the first recorded state is the Euler step from the noise.
    x1 = np.asarray(noise)
    np.testing.assert_allclose(a.x_t[:, 0], x1 + (x1 * 0.5 - 1.0) * (g[1] - 1.0), rtol=1e-6)


def test_sample_flow_window_overflow_and_bad_args():
    grid = flow.timesteps(5, 1.0)
    noise = jnp.asarray(rand((2, 4), 0))
    key = fast_key(0)
    vel = lambda x, t: -x
    # A traced start whose window runs past the end: unreached slots are marked -1.
    out = flow.sample_flow(vel, noise, grid, key, noise_level=0.5,
                           sde_window=(jnp.asarray([4, 0], jnp.int32), 3))
    np.testing.assert_array_equal(out.step_index, [[4, -1, -1], [0, 1, 2]])
    with pytest.raises(ValueError):
        flow.sample_flow(vel, noise, grid, key, noise_level=0.5, sde_window=(3, 3))
    with pytest.raises(ValueError):
        flow.sample_flow(vel, noise, grid, key, noise_level=0.5, sde_window=(0, 2),
                         sde_type="ddim")


# ---------------------------------------------------------------- random_window_start


def test_random_window_start():
    s = np.asarray(flow.random_window_start(fast_key(0), 3000, (0, 5), 3))
    assert s.dtype == np.int32 and s.shape == (3000,)
    assert set(np.unique(s)) == {0, 1, 2}
    assert np.all(np.bincount(s) > 900)  # roughly uniform
    s = np.asarray(flow.random_window_start(fast_key(1), 3000, (2, 6), 4))
    assert np.all(s == 2)
    g = np.asarray(flow.random_window_start(fast_key(2), 96, (0, 5), 3, group_size=24))
    assert np.all(g.reshape(4, 24) == g.reshape(4, 24)[:, :1])


@pytest.mark.parametrize("args", [(4, (0, 2), 3), (4, (-1, 5), 3), (0, (0, 5), 3),
                                  (4, (0, 5), 0), (4, (0, 5.0), 3)])
def test_random_window_start_bad_args(args):
    with pytest.raises(ValueError):
        flow.random_window_start(fast_key(0), *args)


@pytest.mark.parametrize("shift", [0.1, 7.0])
def test_first_step_rule_is_selected_by_step_index(shift):
    """t' = t_next on grid step 0 whatever float32 makes of t there: at shift 0.1 the grid starts
    at 0.99999976, where a ``t == 1`` test kept t' = t and the first std was ~10^3."""
    n, a, B = 10, 0.8, 3
    grid = flow.timesteps(n, shift)
    fn = jax.jit(lambda nz: flow.sample_flow(toy_velocity, nz, grid, fast_key(5), noise_level=a,
                                             sde_window=(0, 2)))
    out = fn(jnp.asarray(rand((B, 4, 5), 31)))
    g = np.asarray(grid).astype(np.float64)
    first = a * np.sqrt(g[0] / (1 - g[1])) * np.sqrt(g[0] - g[1])
    second = a * np.sqrt(g[1] / (1 - g[1])) * np.sqrt(g[1] - g[2])
    np.testing.assert_allclose(out.std[:, 0], first, rtol=1e-5)
    np.testing.assert_allclose(out.std[:, 1], second, rtol=1e-5)
    assert 0.5 < first < 1.0  # ~ a sqrt(t): of order 1
    assert np.all(np.isfinite(np.asarray(out.x0))) and np.abs(np.asarray(out.x0)).max() < 50
    # The trainer re-scores the first step with the same rule (by recorded index): ratio 1.
    flat = lambda z: z.reshape((B * 2,) + z.shape[2:])
    v = toy_velocity(flat(out.x_t), flat(out.t)).astype(jnp.float32)
    lp, _, std = flow.recompute_logprob(flat(out.x_t), v, flat(out.t), flat(out.t_next),
                                        flat(out.x_next), a, first_step=flat(out.step_index) == 0)
    np.testing.assert_allclose(lp.reshape(B, 2), out.logp, rtol=1e-6, atol=1e-6)
