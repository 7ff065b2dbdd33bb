"""Tests for unigrpo_jax.rl.losses against float64 NumPy transcriptions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unigrpo_jax.rl import losses

RNG = np.random.default_rng(0)

# Jitted entry points (config args static): one XLA compile per configuration is much quicker
# on CPU than compiling every eager op; the math under test is the same code.
text_loss = jax.jit(losses.text_grpo_loss, static_argnames=("clip_eps", "aggregation", "kl_coef"))
flow_loss = jax.jit(losses.flow_grpo_loss,
                    static_argnames=("clip_eps", "ratio_norm", "reweight_by_dt"))


def _pair(c):
    return (c, c) if np.isscalar(c) else c


def np_surrogate(log_ratio, adv, mask, clip_eps):
    lo, hi = _pair(clip_eps)
    log_ratio = np.where(mask > 0, log_ratio, 0.0)
    r = np.exp(log_ratio)
    un, cl = r * adv[:, None], np.clip(r, 1 - lo, 1 + hi) * adv[:, None]
    obj = np.minimum(un, cl)
    valid = mask > 0
    m = {
        "ratio_mean": r[valid].mean(), "ratio_min": r[valid].min(), "ratio_max": r[valid].max(),
        "clip_frac": (cl < un)[valid].mean(),
        "ratio_out_frac": ((r < 1 - lo) | (r > 1 + hi))[valid].mean(),
    }
    return obj, m


def np_k3(d):
    return np.exp(d) - d - 1


def np_text_loss(logp, old, adv, mask, clip_eps, agg="seq_mean", ref=None, kl_coef=0.0):
    logp, old, adv, mask = (np.asarray(z, np.float64) for z in (logp, old, adv, mask))
    obj, m = np_surrogate(logp - old, adv, mask, clip_eps)

    def aggregate(x):
        x = np.where(mask > 0, x, 0.0)
        if agg == "token_mean":
            return x.sum() / mask.sum()
        n = mask.sum(1)
        return np.where(n > 0, x.sum(1) / np.maximum(n, 1), 0.0).mean()

    loss = -aggregate(obj)
    m["approx_kl"] = np_k3(np.where(mask > 0, logp - old, 0))[mask > 0].mean()
    if ref is not None:
        kl = aggregate(np_k3(np.asarray(ref, np.float64) - logp))
        m["kl_ref"] = kl
        loss += kl_coef * kl
    return loss, m


def np_flow_loss(logp, old, adv, clip_eps, std=None, msd=None, ratio_norm=False, dt=None,
                 reweight=False, mask=None):
    logp, old, adv = (np.asarray(z, np.float64) for z in (logp, old, adv))
    mask = np.ones_like(logp) if mask is None else np.asarray(mask, np.float64)
    lr = logp - old
    if ratio_norm:
        lr = std * (lr + msd / (2 * std**2))
    obj, m = np_surrogate(lr, adv, mask, clip_eps)
    if reweight:
        obj = obj / (-dt)
    m["approx_kl"] = np_k3(np.where(mask > 0, logp - old, 0))[mask > 0].mean()
    return -(obj * mask).sum() / mask.sum(), m


def _text_inputs(B=6, T=7, spread=0.3):
    logp = np.log(RNG.uniform(0.05, 1, (B, T))).astype(np.float32)
    old = (logp + RNG.normal(0, spread, (B, T))).astype(np.float32)
    ref = (logp + RNG.normal(0, spread, (B, T))).astype(np.float32)
    adv = RNG.normal(0, 1, B).astype(np.float32)
    mask = (RNG.uniform(size=(B, T)) < 0.7).astype(np.float32)
    mask[2] = 0  # a row with no valid token
    mask[0, 0] = 1
    # Garbage under the mask must not leak (padding log-probs can be -inf).
    logp = np.where(mask > 0, logp, -np.inf).astype(np.float32)
    return logp, old, ref, adv, mask


def _check(out, ref_loss, ref_metrics, rtol=1e-5, atol=1e-6):
    loss, metrics = out
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref_loss, rtol=rtol, atol=atol)
    for k, v in ref_metrics.items():
        assert metrics[k].shape == (), k
        np.testing.assert_allclose(metrics[k], v, rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.parametrize("clip_eps", [0.2, (0.1, 0.3), (0.2, 0.28)])
@pytest.mark.parametrize("agg", ["seq_mean", "token_mean"])
def test_text_grpo_loss_matches_numpy(clip_eps, agg):
    logp, old, ref, adv, mask = _text_inputs()
    out = text_loss(logp, old, adv, mask, clip_eps, aggregation=agg)
    ref_loss, ref_m = np_text_loss(np.where(mask > 0, logp, 0), old, adv, mask, clip_eps, agg)
    assert 0 < ref_m["clip_frac"] < ref_m["ratio_out_frac"] < 1  # the inputs exercise clipping
    _check(out, ref_loss, ref_m)
    assert np.isfinite(float(out[0]))


@pytest.mark.parametrize("agg", ["seq_mean", "token_mean"])
def test_text_grpo_loss_with_reference_kl(agg):
    logp, old, ref, adv, mask = _text_inputs()
    out = text_loss(logp, old, adv, mask, (0.2, 0.28), aggregation=agg, ref_logp=ref,
                    kl_coef=0.05)
    _check(out, *np_text_loss(np.where(mask > 0, logp, 0), old, adv, mask, (0.2, 0.28), agg,
                              ref=ref, kl_coef=0.05))
    # The gradient is finite despite -inf log-probs under the mask, and zero there.
    g = jax.jit(jax.grad(lambda lp: losses.text_grpo_loss(
        lp, old, adv, mask, 0.2, aggregation=agg, ref_logp=ref, kl_coef=0.05)[0]))(logp)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[mask == 0] == 0)


def test_seq_mean_differs_from_token_mean():
    logp, old, _, adv, mask = _text_inputs()
    a = text_loss(logp, old, adv, mask, 0.2, aggregation="seq_mean")[0]
    b = text_loss(logp, old, adv, mask, 0.2, aggregation="token_mean")[0]
    assert abs(float(a) - float(b)) > 1e-4
    with pytest.raises(ValueError):
        losses.text_grpo_loss(logp, old, adv, mask, 0.2, aggregation="sum")


def test_text_on_policy_ratio_and_gradient():
    logp, _, _, adv, mask = _text_inputs()
    logp = np.where(mask > 0, logp, 0).astype(np.float32)
    for agg in ("seq_mean", "token_mean"):
        loss_fn = lambda lp: losses.text_grpo_loss(lp, logp, adv, mask, 0.2, aggregation=agg)
        (loss, m), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(jnp.asarray(logp))
        assert float(m["ratio_mean"]) == 1.0 and float(m["ratio_min"]) == 1.0
        assert float(m["ratio_max"]) == 1.0 and float(m["clip_frac"]) == 0.0
        assert float(m["approx_kl"]) == 0.0
        n = mask.sum(1, keepdims=True)
        B = mask.shape[0]
        if agg == "seq_mean":  # d loss / d logp_ik = -A_i / (|y_i| B)
            expect = np.where(n > 0, -adv[:, None] / np.maximum(n, 1) / B, 0.0) * mask
        else:  # -A_i / (total valid tokens)
            expect = -adv[:, None] / mask.sum() * mask
        np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-7)
    # Per sequence (B = 1) the gradient is exactly -A / |y| on each valid token.
    g = jax.grad(lambda lp: losses.text_grpo_loss(lp, logp[:1], adv[:1], mask[:1], 0.2)[0])(
        jnp.asarray(logp[:1]))
    np.testing.assert_allclose(g, -adv[0] / mask[0].sum() * mask[:1], rtol=1e-6)


def test_text_all_masked_is_finite():
    B, T = 3, 4
    z = np.zeros((B, T), np.float32)
    loss, m = losses.text_grpo_loss(z, z + 1, np.ones(B), z, 0.2, ref_logp=z, kl_coef=0.1)
    assert float(loss) == 0.0
    assert all(np.isfinite(float(v)) for v in m.values())


def _flow_inputs(B=8, K=3):
    std = RNG.uniform(0.05, 0.5, (B, K)).astype(np.float32)
    logp = RNG.normal(0, 1, (B, K)).astype(np.float32)
    old = (logp + RNG.normal(0, 2e-4, (B, K))).astype(np.float32)
    msd = RNG.uniform(0, 1e-5, (B, K)).astype(np.float32)
    dt = -RNG.uniform(0.02, 0.1, (B, K)).astype(np.float32)
    adv = RNG.normal(0, 1, B).astype(np.float32)
    mask = np.ones((B, K), np.float32)
    mask[1, 2] = mask[5, 1:] = 0
    return logp, old, std, msd, dt, adv, mask


@pytest.mark.parametrize("clip_eps", [1e-4, (5e-5, 2e-4)])
@pytest.mark.parametrize("ratio_norm,reweight,use_mask", [
    (False, False, False), (True, False, False), (False, True, False), (True, True, True),
    (False, False, True)])
def test_flow_grpo_loss_matches_numpy(clip_eps, ratio_norm, reweight, use_mask):
    logp, old, std, msd, dt, adv, mask = _flow_inputs()
    mask_arg = mask if use_mask else None
    out = flow_loss(logp, old, adv, clip_eps, step_std=std, mean_sq_diff=msd,
                    ratio_norm=ratio_norm, dt=dt, reweight_by_dt=reweight, mask=mask_arg)
    ref_loss, ref_m = np_flow_loss(logp, old, adv, clip_eps, std, msd, ratio_norm, dt, reweight,
                                   mask_arg)
    if not ratio_norm:
        assert 0 < ref_m["clip_frac"] < 1
    _check(out, ref_loss, ref_m, rtol=1e-4, atol=1e-7)


def test_ratio_norm_changes_ratio_and_needs_inputs():
    logp, old, std, msd, dt, adv, _ = _flow_inputs()
    _, plain = losses.flow_grpo_loss(logp, old, adv, 1e-4)
    _, normed = losses.flow_grpo_loss(logp, old, adv, 1e-4, step_std=std, mean_sq_diff=msd,
                                      ratio_norm=True)
    assert float(normed["ratio_max"]) != float(plain["ratio_max"])
    with pytest.raises(ValueError):
        losses.flow_grpo_loss(logp, old, adv, 1e-4, ratio_norm=True)
    with pytest.raises(ValueError):
        losses.flow_grpo_loss(logp, old, adv, 1e-4, reweight_by_dt=True)


def test_ratio_norm_equals_noise_projection():
    """For x_next = mu_old + s eps, RatioNorm's log-ratio is mean(eps * (mu_theta - mu_old))."""
    from unigrpo_jax.rollout.flow import step_logprob

    B, D = 4, 64
    s = RNG.uniform(0.05, 0.5, B).astype(np.float32)
    mu_old = RNG.normal(size=(B, D)).astype(np.float32)
    mu_th = (mu_old + RNG.normal(0, 1e-3, (B, D))).astype(np.float32)
    eps = RNG.normal(size=(B, D)).astype(np.float32)
    x = mu_old + s[:, None] * eps
    lp, lp_old = step_logprob(x, mu_th, s), step_logprob(x, mu_old, s)
    msd = np.mean((mu_old - mu_th) ** 2, -1)
    _, m = losses.flow_grpo_loss(lp[:, None], lp_old[:, None], np.ones(B), 10.0,
                                 step_std=s[:, None], mean_sq_diff=msd[:, None], ratio_norm=True)
    expect = np.exp(np.mean(eps.astype(np.float64) * (mu_th - mu_old), -1))
    np.testing.assert_allclose(m["ratio_mean"], expect.mean(), rtol=1e-6)


def test_flow_on_policy():
    logp, _, std, msd, dt, adv, mask = _flow_inputs()
    fn = lambda lp: losses.flow_grpo_loss(lp, logp, adv, 1e-6, mask=mask)
    (loss, m), g = jax.jit(jax.value_and_grad(fn, has_aux=True))(jnp.asarray(logp))
    assert float(m["ratio_mean"]) == 1.0 and float(m["clip_frac"]) == 0.0
    assert float(m["ratio_min"]) == 1.0 and float(m["ratio_max"]) == 1.0
    np.testing.assert_allclose(g, -adv[:, None] * mask / mask.sum(), rtol=1e-6)


def test_velocity_mse_and_latent_kl():
    v = RNG.normal(size=(4, 3, 5, 2)).astype(np.float32)
    v_ref = RNG.normal(size=(4, 3, 5, 2)).astype(np.float32)
    std = RNG.uniform(0.1, 1, (4, 3)).astype(np.float32)
    mask = np.ones((4, 3), np.float32)
    mask[0, 1] = 0
    d2 = (v.astype(np.float64) - v_ref) ** 2
    loss, m = losses.velocity_mse(v, v_ref)
    np.testing.assert_allclose(loss, d2.mean(), rtol=1e-6)
    assert set(m) == {"velocity_mse"}
    loss, _ = losses.velocity_mse(jnp.asarray(v, jnp.bfloat16), v_ref)
    assert loss.dtype == jnp.float32
    loss, _ = losses.velocity_mse(v, v_ref, mask)
    np.testing.assert_allclose(loss, d2[mask > 0].mean(), rtol=1e-6)
    # The reference is frozen: no gradient flows into v_ref.
    g = jax.grad(lambda r: losses.velocity_mse(v, r)[0])(jnp.asarray(v_ref))
    assert np.all(np.asarray(g) == 0)

    per = d2.reshape(4, 3, -1).mean(-1) / (2 * std.astype(np.float64) ** 2)
    loss, m = losses.latent_kl(v, v_ref, std)
    np.testing.assert_allclose(loss, per.mean(), rtol=1e-5)
    assert set(m) == {"latent_kl"}
    loss, _ = losses.latent_kl(v, v_ref, std, mask)
    np.testing.assert_allclose(loss, per[mask > 0].mean(), rtol=1e-5)


def test_regularizer_loss():
    v = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    w = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    std = np.full((2, 3), 0.5, np.float32)
    np.testing.assert_allclose(losses.regularizer_loss("velocity_mse", v=v, v_ref=w)[0],
                               losses.velocity_mse(v, w)[0])
    np.testing.assert_allclose(
        losses.regularizer_loss("latent_kl", mean_theta=v, mean_ref=w, std=std)[0],
        losses.latent_kl(v, w, std)[0])
    loss, m = losses.regularizer_loss("none")
    assert float(loss) == 0.0 and m == {}
    with pytest.raises(ValueError, match="kl_div"):
        losses.regularizer_loss("kl_div", v=v, v_ref=w)
    with pytest.raises(ValueError):
        losses.regularizer_loss("velocity_mse", v=v)


@pytest.mark.parametrize("num_steps", [10, 25])
def test_latent_kl_matches_flow_grpo_float64(num_steps):
    """The train step's latent KL (losses.latent_kl with flow.kl_std of the RECORDED transition
    std) equals Flow-GRPO's mean((mu_theta - mu_ref)^2) / (2 std_t^2), std_t = a sqrt(t / (1 - t'))
    with no dt factor; dividing by the transition std^2 would be 1 / (-dt) = 10-70x larger."""
    from unigrpo_jax.rollout import flow
    a, shift = 0.8, 3.0
    s = np.linspace(1.0, 0.0, num_steps + 1)
    grid = shift * s / (1 + (shift - 1) * s)  # float64
    idx = np.array([[0, 1, 2], [2, 3, 4]])  # [B, K] window steps, incl. the first grid step
    t32 = np.asarray(grid[idx], np.float32)
    tn32 = np.asarray(grid[idx + 1], np.float32)
    x = RNG.normal(size=(2 * 3, 5, 2)).astype(np.float32)
    # The transition std the rollout records ([B, K]).
    _, _, step_std = jax.jit(flow.sde_step)(x, x, t32.reshape(-1), tn32.reshape(-1),
                                            np.zeros_like(x), a,
                                            first_step=idx.reshape(-1) == 0)
    step_std = np.asarray(step_std).reshape(2, 3)
    m_theta = RNG.normal(size=(2, 3, 5, 2)).astype(np.float32)
    m_ref = RNG.normal(size=(2, 3, 5, 2)).astype(np.float32)
    mask = np.array([[1, 1, 1], [1, 0, 1]], np.float32)

    kl_std = flow.kl_std(step_std, t32, tn32, "sde")
    loss, m = jax.jit(losses.latent_kl)(m_theta, m_ref, kl_std, mask)

    t, tn = t32.astype(np.float64), tn32.astype(np.float64)
    t_prime = np.where(idx == 0, tn, t)
    std_t = a * np.sqrt(t / (1 - t_prime))
    per = ((m_theta.astype(np.float64) - m_ref) ** 2).reshape(2, 3, -1).mean(-1)
    want = (per / (2 * std_t**2))[mask > 0].mean()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["latent_kl"], want, rtol=1e-5)
    # The transition-std version is off by 1 / (-dt) (the old bug): the test can tell them apart.
    wrong = (per / (2 * step_std.astype(np.float64) ** 2))[mask > 0].mean()
    assert wrong / want > 5
    # CPS: the KL divides by the CPS transition std itself.
    np.testing.assert_array_equal(flow.kl_std(step_std, t32, tn32, "cps"), step_std)


# ---- The clip decision at the bound (log space) ---------------------------------------------

def _bound_points(eps):
    """[7] float32 log-ratios around the clip band's two bounds: one ulp inside, exactly on and
    one ulp outside each, plus 0. With eps=1e-6 all six map to the SAME float32 ratio as
    ``1 +- eps`` (the band holds ~8 float32 ratios), which is what broke ratio-space clipping."""
    hi, lo = np.float32(np.log1p(eps)), np.float32(np.log1p(-eps))
    up, down = np.float32(np.inf), np.float32(-np.inf)
    pts = [np.nextafter(hi, down), hi, np.nextafter(hi, up),
           np.nextafter(lo, up), lo, np.nextafter(lo, down), np.float32(0.0)]
    return np.array(pts, np.float32)


# (position of each point) -> clipped for A > 0 / clipped for A < 0
_OUT_HI = np.array([0, 0, 1, 0, 0, 0, 0], bool)
_OUT_LO = np.array([0, 0, 0, 0, 0, 1, 0], bool)


@pytest.mark.parametrize("eps", [1e-6, 0.2, (1e-6, 2e-6), (0.2, 0.28)])
@pytest.mark.parametrize("which", ["text", "flow"])
def test_clip_gradient_at_the_bound(eps, which):
    """d loss / d log r is the unclipped PPO gradient -r A (per element of the mean) inside and
    exactly on the bound, and 0 just outside it in the clipped direction (PyTorch's clamp + min
    semantics). Ratio-space jnp.clip + jnp.minimum gave 0.75 of it at eps=1e-6 (tie splits)."""
    lo, hi = _pair(eps)
    x_hi, x_lo = _bound_points(hi), _bound_points(lo)
    row = np.concatenate([x_hi[:3], x_lo[3:]])  # hi-side points of eps_high, lo-side of eps_low
    log_r = np.stack([row, row]).astype(np.float32)  # row 0: A = +1, row 1: A = -1
    adv = np.array([1.0, -1.0], np.float32)
    old, mask = np.zeros_like(log_r), np.ones_like(log_r)
    if which == "text":
        fn = lambda lr: losses.text_grpo_loss(lr, old, adv, mask, eps)
    else:
        fn = lambda lr: losses.flow_grpo_loss(lr, old, adv, eps)
    (_, m), g = jax.jit(jax.value_and_grad(fn, has_aux=True))(jnp.asarray(log_r))
    g = np.asarray(g, np.float64) * log_r.size  # undo the mean over B * N entries
    r = np.exp(log_r.astype(np.float64))
    clipped = np.stack([_OUT_HI, _OUT_LO])
    want = np.where(clipped, 0.0, -r * adv[:, None])
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=0)
    if max(lo, hi) < 1e-5:  # Flow-GRPO scale: inside / on the band, A = +1 gives -1, not -0.75
        np.testing.assert_allclose(g[0, [0, 1, 3, 4, 6]], -1.0, atol=3e-6)
    # Metrics decided the same way: 2 of 14 entries clipped, 4 of 14 outside the band.
    np.testing.assert_allclose(m["clip_frac"], 2 / 14, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_out_frac"], 4 / 14, rtol=1e-6)


def test_log_clip_bounds():
    lo, hi = losses.log_clip_bounds((1e-6, 2e-6))
    assert lo.dtype == np.float32 and hi.dtype == np.float32
    assert lo == np.float32(np.log1p(-1e-6)) and hi == np.float32(np.log1p(2e-6))
    lo, hi = losses.log_clip_bounds(10.0)  # a lower range >= 1 never binds
    assert lo == -np.inf and hi == np.float32(np.log(11.0))


def test_clipped_entries_have_finite_zero_gradient_even_if_ratio_overflows():
    """A clipped entry whose exp(log r) overflows float32 still gets gradient exactly 0 (a bare
    jnp.where / jnp.minimum gives 0 * inf = NaN in the backward pass)."""
    log_r = jnp.asarray([[200.0, -200.0]], jnp.float32)
    old = jnp.zeros_like(log_r)
    g = jax.grad(lambda lr: losses.flow_grpo_loss(lr, old, jnp.ones(1), 1e-6)[0])(log_r)
    assert np.all(np.isfinite(g)) and float(g[0, 0]) == 0.0
    g = jax.grad(lambda lr: losses.flow_grpo_loss(lr, old, -jnp.ones(1), 1e-6)[0])(log_r)
    assert float(g[0, 1]) == 0.0
