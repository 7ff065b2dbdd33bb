"""Tests for unigrpo_jax.rl.advantages against a float64 NumPy transcription."""
import numpy as np
import pytest

from unigrpo_jax.rl import advantages as adv


def np_group_adv(r, g, eps=1e-4, clip=None, std_mode="group", mean_only=False):
    r = np.asarray(r, np.float64).reshape(-1, g)
    centred = r - r.mean(1, keepdims=True)
    flat = (r.max(1) == r.min(1))[:, None]
    if mean_only:
        a = centred
    else:
        std = r.std(1, keepdims=True) if std_mode == "group" else r.std()
        with np.errstate(invalid="ignore", divide="ignore"):
            a = centred / (std + eps)
    a = np.where(flat, 0.0, a)
    if clip is not None:
        a = np.clip(a, -clip, clip)
    return a.reshape(-1)


G = 6  # not a power of two, so a float32 group mean of equal values can be inexact


def _rewards(seed=0, groups=6, g=G):
    r = np.random.default_rng(seed).uniform(0, 1, (groups, g)).astype(np.float32)
    # Flat groups. Values picked so that (on XLA CPU) the float32 group mean is NOT exactly the
    # value: only an explicit where, not r - mean, then gives exact zeros.
    r[1] = 0.91275555
    r[4] = 0.040973525
    r[3] = np.round(r[3])  # binary rewards
    return r.reshape(-1)


@pytest.mark.parametrize("kw", [{}, {"eps": 0.0}, {"eps": 1e-2}, {"clip": 1.0},
                                {"std_mode": "batch"}, {"mean_only": True},
                                {"std_mode": "batch", "clip": 0.5}])
def test_group_advantages_matches_numpy(kw):
    r = _rewards()
    out = adv.group_advantages(r, G, **kw)
    assert out.shape == r.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, np_group_adv(r, G, **kw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"eps": 0.0}, {"mean_only": True}, {"std_mode": "batch"}])
def test_flat_group_is_exactly_zero(kw):
    r = _rewards()
    out = np.asarray(adv.group_advantages(r, G, **kw)).reshape(6, G)
    assert np.all(out[[1, 4]] == 0.0)
    assert np.all(np.isfinite(out))
    # An all-flat batch (batch std == 0) is all zeros, not NaN.
    out = np.asarray(adv.group_advantages(np.full(16, 0.1, np.float32), 4, **kw))
    assert np.all(out == 0.0)


def test_properties():
    r = _rewards(seed=1)
    out = np.asarray(adv.group_advantages(r, G, eps=0.0)).reshape(6, G)
    np.testing.assert_allclose(out.mean(1), 0.0, atol=1e-6)  # zero mean per group
    live = [0, 2, 3, 5]
    np.testing.assert_allclose(out[live].std(1), 1.0, rtol=1e-5)  # unit std without eps
    clipped = np.asarray(adv.group_advantages(r, G, clip=0.3))
    assert clipped.max() == pytest.approx(0.3) and clipped.min() == pytest.approx(-0.3)


def test_group_of_one_and_bad_shapes():
    np.testing.assert_array_equal(adv.group_advantages(np.arange(5.0), 1), np.zeros(5))
    with pytest.raises(ValueError):
        adv.group_advantages(np.zeros(10), 4)
    with pytest.raises(ValueError):
        adv.group_advantages(np.zeros((2, 4)), 4)
    with pytest.raises(ValueError):
        adv.group_advantages(np.zeros(8), 4, std_mode="global")
    with pytest.raises(ValueError):
        adv.zero_variance_fraction(np.zeros(10), 3)


def test_zero_variance_fraction():
    r = _rewards()
    assert float(adv.zero_variance_fraction(r, G)) == pytest.approx(2 / 6)
    assert float(adv.zero_variance_fraction(np.ones(8), 2)) == 1.0
    assert float(adv.zero_variance_fraction(np.arange(8.0), 2)) == 0.0


def test_registry():
    r = _rewards()
    assert set(adv.ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "batch_std"}
    np.testing.assert_allclose(adv.get_advantage_fn("grpo")(r, G), np_group_adv(r, G),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv.get_advantage_fn("dr_grpo")(r, G),
                               np_group_adv(r, G, mean_only=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv.get_advantage_fn("batch_std")(r, G, clip=5.0),
                               np_group_adv(r, G, std_mode="batch", clip=5.0),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="dr_grpo"):
        adv.get_advantage_fn("ppo")
