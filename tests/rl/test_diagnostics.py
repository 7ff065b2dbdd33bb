"""Tests for unigrpo_jax.rl.diagnostics on inputs whose answers are known by hand."""
import math

import numpy as np
import pytest

from unigrpo_jax.rl import diagnostics as diag

KEYS = {"total_var", "text_var", "image_var", "image_share", "zero_var_group_frac",
    "shared_trace_group_frac", "measurable_group_frac", "distinct_trace_frac"}


def _check_metric_ready(out):
  assert set(out) == KEYS
  for k, v in out.items():
    assert type(v) is float and math.isfinite(v), k
  np.testing.assert_allclose(out["text_var"] + out["image_var"], out["total_var"], atol=1e-12)


def test_trace_ids_from_tokens():
  pad = 99  # what padding holds must not matter
  tokens = np.array([[5, 6, 7, pad],
                       [5, 6, 7, 0],      # = row 0 (different padding)
                       [5, 6, pad, pad],  # a prefix of row 0: a different trace
                       [5, 6, 0, 0],      # = row 2
                       [8, 6, 7, pad],
                       [5, 6, 7, 1]])     # longer than row 0
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0],
                     [1, 1, 1, 1]], bool)
  ids = diag.trace_ids_from_tokens(tokens, mask)
  assert ids.dtype == np.int64 and ids.tolist() == [0, 0, 1, 1, 2, 3]
  # Empty traces are all one trace; jax-style int32 / float masks work too.
  ids = diag.trace_ids_from_tokens(np.zeros((3, 2), np.int32), np.zeros((3, 2), np.float32))
  assert ids.tolist() == [0, 0, 0]
  with pytest.raises(ValueError):
    diag.trace_ids_from_tokens(tokens, mask[:, :3])


def test_all_rows_one_trace_is_all_image():
  # Two groups of 4, each group one trace: every bit of spread is image-side.
  r = np.array([0.0, 1.0, 0.0, 1.0, 0.2, 0.4, 0.6, 0.8])
  out = diag.spread_sources(r, np.array([0, 0, 0, 0, 1, 1, 1, 1]), 4)
  _check_metric_ready(out)
  tot = (0.25 + np.var([0.2, 0.4, 0.6, 0.8])) / 2  # 0.25 and 0.05
  np.testing.assert_allclose(out["total_var"], tot, rtol=1e-12)
  np.testing.assert_allclose(out["image_var"], tot, rtol=1e-12)
  assert out["text_var"] == pytest.approx(0.0, abs=1e-15)
  assert out["image_share"] == pytest.approx(1.0, rel=1e-12)
  assert out["shared_trace_group_frac"] == 1.0 and out["measurable_group_frac"] == 1.0
  assert out["zero_var_group_frac"] == 0.0
  assert out["distinct_trace_frac"] == 0.25


def test_rewards_equal_within_each_trace_is_all_text():
  # Group 0: traces a a b b with rewards 1 1 0 0; group 1: every row its own trace.
  r = np.array([1.0, 1.0, 0.0, 0.0, 0.1, 0.5, 0.3, 0.9])
  ids = np.array([7, 7, 3, 3, 0, 1, 2, 4])
  out = diag.spread_sources(r, ids, 4)
  _check_metric_ready(out)
  np.testing.assert_allclose(out["total_var"], (0.25 + np.var([0.1, 0.5, 0.3, 0.9])) / 2)
  assert out["image_var"] == 0.0 and out["image_share"] == 0.0
  np.testing.assert_allclose(out["text_var"], out["total_var"], rtol=1e-12)
  # Only group 0 shares a trace, so the image share is measured there alone.
  assert out["shared_trace_group_frac"] == 0.5 and out["measurable_group_frac"] == 0.5
  assert out["distinct_trace_frac"] == (2 / 4 + 4 / 4) / 2


def test_mixed_by_hand():
  # One group of 4: traces a a b c, rewards 0, 1 (trace a) and 1, 1 (traces b, c).
  # Mean 0.75; total = (0.5625 + 3 * 0.0625) / 4 = 0.1875.
  # Within: trace a has mean 0.5 -> (0.25 + 0.25) / 4 = 0.125; between = 0.0625.
  out = diag.spread_sources([0.0, 1.0, 1.0, 1.0], ["a", "a", "b", "c"], 4)
  _check_metric_ready(out)
  np.testing.assert_allclose(
    [out["total_var"], out["image_var"], out["text_var"], out["image_share"]],
    [0.1875, 0.125, 0.0625, 2 / 3], rtol=1e-12)
  assert out["distinct_trace_frac"] == 0.75


def test_image_share_pools_only_groups_with_shared_traces():
  # Group 0: one trace, rewards 0 / 1 (image 0.25 of total 0.25).
  # Group 1: traces x x y y, rewards 0, 0.5, 1, 1: total = var([0, .5, 1, 1]) = 0.171875,
  #   within = (0.0625 * 2) / 4 = 0.03125.
  # Group 2: all distinct traces, spread 0.25: counted in total_var, not in image_share.
  # Group 3: flat (shared trace, no spread).
  r = np.array([0, 1, 0, 1, 0, .5, 1, 1, 0, 1, 0, 1, .3, .3, .3, .3])
  ids = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 7, 8, 9])
  out = diag.spread_sources(r, ids, 4)
  _check_metric_ready(out)
  np.testing.assert_allclose(out["total_var"], (0.25 + 0.171875 + 0.25 + 0) / 4, rtol=1e-12)
  np.testing.assert_allclose(out["image_var"], (0.25 + 0.03125) / 4, rtol=1e-12)
  np.testing.assert_allclose(out["image_share"], (0.25 + 0.03125) / (0.25 + 0.171875),
                               rtol=1e-12)
  assert out["zero_var_group_frac"] == 0.25
  assert out["shared_trace_group_frac"] == 0.75
  assert out["measurable_group_frac"] == 0.5


def test_zero_over_zero_is_handled():
  # All groups flat, and no group shares a trace: no NaN anywhere.
  out = diag.spread_sources(np.full(6, 0.7), np.arange(6), 3)
  _check_metric_ready(out)
  assert out["total_var"] == 0.0 and out["image_share"] == 0.0
  assert out["zero_var_group_frac"] == 1.0 and out["shared_trace_group_frac"] == 0.0
  # Flat groups that share traces (a float mean of 0.1s is not exactly 0.1: still 0).
  out = diag.spread_sources(np.full(6, 0.1, np.float32), np.zeros(6, int), 6)
  _check_metric_ready(out)
  assert out["total_var"] == 0.0 and out["image_var"] == 0.0 and out["image_share"] == 0.0
  assert out["shared_trace_group_frac"] == 1.0 and out["measurable_group_frac"] == 0.0
  # Spread but no shared trace anywhere: image share undefined -> 0, all text.
  out = diag.spread_sources([0.0, 1.0, 0.5, 0.25], [0, 1, 2, 3], 2)
  _check_metric_ready(out)
  assert out["image_share"] == 0.0 and out["text_var"] == out["total_var"] > 0


def test_matches_random_decomposition():
  """text + image = total on random inputs; agrees with a direct per-trace computation."""
  rng = np.random.default_rng(0)
  g, groups = 6, 5
  r = rng.uniform(size=g * groups).astype(np.float32)
  ids = rng.integers(0, 3, g * groups)
  out = diag.spread_sources(r, ids, g)
  _check_metric_ready(out)
  r64 = r.astype(np.float64).reshape(groups, g)
  ids2 = ids.reshape(groups, g)
  between = []
  for k in range(groups):
    m = r64[k].mean()
    between.append(sum((ids2[k] == j).sum() / g * (r64[k][ids2[k] == j].mean() - m) ** 2
                           for j in np.unique(ids2[k])))
  np.testing.assert_allclose(out["text_var"], np.mean(between), rtol=1e-10)
  np.testing.assert_allclose(out["total_var"], r64.var(axis=1).mean(), rtol=1e-10)
  assert 0.0 <= out["image_share"] <= 1.0


def test_bad_inputs():
  with pytest.raises(ValueError):
    diag.spread_sources(np.zeros(5), np.zeros(5), 2)
  with pytest.raises(ValueError):
    diag.spread_sources(np.zeros(4), np.zeros(3), 2)
  with pytest.raises(ValueError):
    diag.spread_sources(np.zeros((2, 2)), np.zeros((2, 2)), 2)
  with pytest.raises(ValueError):
    diag.spread_sources(np.zeros(4), np.zeros(4), 0)
