"""Where a group's reward spread comes from: the reasoning trace (text) or the image sampling.

Pure NumPy, host side, no JAX: called on the rollout's rewards and sampled reasoning tokens after
scoring, once per step. Rows of one group share a prompt (groups contiguous, as in
``rl/advantages.py``). Inside a group, rows whose sampled reasoning trace is identical differ
only in the image sampling (SDE noise), so the group's reward variance splits exactly (law of
total variance, population variances as in ``group_advantages``) into

 total_g = text_g + image_g
 text_g  = sum_j (n_j / G) (m_j - m_g)^2          between traces   (the trace explains it)
 image_g = (1 / G) sum_i (r_i - m_{trace(i)})^2   within traces    (same prompt, same trace)

with ``j`` the distinct traces of group ``g``, ``n_j`` their row counts and ``m_j`` their mean
rewards. A trace sampled once (``n_j = 1``) adds nothing to ``image_g`` although its image was
sampled too, so ``image_g`` only sees image noise where traces repeat: it is a lower bound of the
image-side variance, tight when every trace in the group repeats, 0 when none does.

The keys ``spread_sources`` returns are metric names (the loop logs them under a prefix such as
``train/spread/``); every value is a finite Python float for finite rewards.
"""
from __future__ import annotations

import numpy as np


def trace_ids_from_tokens(tokens, mask) -> np.ndarray:
  """Ids of identical reasoning traces.

  Args:
   tokens: [B, T] int sampled reasoning token ids (``Trajectory.reasoning_tokens``).
   mask: [B, T] bool / {0, 1} validity (``Trajectory.reasoning_mask``, a valid prefix per row).
  Returns:
   int64 [B]: two rows get the same id iff their valid tokens (``tokens[b][mask[b] > 0]``, in
   order) are equal; what padding holds is ignored. Ids are 0, 1, ... in order of first
   appearance over the whole batch (rows of different groups may share an id; only
   comparisons inside a group are meaningful).
  """
  tokens = np.asarray(tokens)
  mask = np.asarray(mask)
  if tokens.ndim != 2 or mask.shape != tokens.shape:
    raise ValueError(f"tokens and mask must both be [B, T], got {tokens.shape} and "
                         f"{mask.shape}")
  tokens = tokens.astype(np.int64)
  valid = mask > 0
  seen: dict[bytes, int] = {}
  ids = np.empty(tokens.shape[0], np.int64)
  for b in range(tokens.shape[0]):
    ids[b] = seen.setdefault(tokens[b][valid[b]].tobytes(), len(seen))
  return ids


def spread_sources(rewards, trace_ids, group_size: int) -> dict[str, float]:
  """Splits the within-group reward variance into a text (trace) and an image part.

  Args:
   rewards: [B] float, B = num_groups * group_size, the rows of a group contiguous.
   trace_ids: [B] int; rows with equal ids (inside a group) sampled the same reasoning trace
    (``trace_ids_from_tokens``).
   group_size: G (B % G must be 0).
  Returns: dict str -> float (see the module docstring for text_g / image_g / total_g):
   ``total_var``: mean over groups of the within-group reward variance (ddof = 0).
   ``text_var``: mean over groups of the between-trace variance; ``image_var``: mean over
    groups of the within-trace variance (text_var + image_var = total_var).
   ``zero_var_group_frac``: fraction of groups whose rewards are all equal (as
    ``advantages.zero_variance_fraction``).
   ``shared_trace_group_frac``: fraction of groups where >= 2 rows share a trace (the image
    part is measurable there).
   ``measurable_group_frac``: fraction of groups that have a shared trace AND a reward spread
    (the groups ``image_share`` is measured over).
   ``image_share``: sum of image_g / sum of total_g over the groups with a shared trace, in
    [0, 1]; 0.0 when that sum of total_g is 0 (no measurable group: read it together with
    ``measurable_group_frac``).
   ``distinct_trace_frac``: mean over groups of (number of distinct traces) / G (1: every
    row wrote its own trace; 1 / G: the text policy collapsed to one trace per prompt).
  """
  r = np.asarray(rewards, np.float64)
  ids = np.asarray(trace_ids)
  if r.ndim != 1:
    raise ValueError(f"rewards must be 1-D [B], got shape {r.shape}")
  if ids.shape != r.shape:
    raise ValueError(f"trace_ids must have the rewards' shape {r.shape}, got {ids.shape}")
  if not isinstance(group_size, (int, np.integer)) or group_size < 1:
    raise ValueError(f"group_size must be a positive int, got {group_size!r}")
  if r.shape[0] == 0 or r.shape[0] % group_size:
    raise ValueError(f"batch size {r.shape[0]} is not a positive multiple of group_size "
                         f"{group_size}")
  g = int(group_size)
  r, ids = r.reshape(-1, g), ids.reshape(-1, g)
  n_groups = r.shape[0]
  total = np.zeros(n_groups)
  image = np.zeros(n_groups)
  shared = np.zeros(n_groups, bool)
  distinct = np.zeros(n_groups)
  for k in range(n_groups):
    _, inv, counts = np.unique(ids[k], return_inverse=True, return_counts=True)
    trace_mean = np.bincount(inv, weights=r[k]) / counts  # m_j
    total[k] = np.mean(np.square(r[k] - r[k].mean()))
    image[k] = np.mean(np.square(r[k] - trace_mean[inv]))
    shared[k] = np.any(counts >= 2)
    distinct[k] = len(counts) / g
  flat = r.max(axis=1) == r.min(axis=1)
  # A flat group's float mean need not equal its members: its variance is exactly 0. The
  # within-trace part cannot exceed the total (the between part is >= 0): clamp the rounding.
  total = np.where(flat, 0.0, total)
  image = np.minimum(np.where(flat, 0.0, image), total)
  text = total - image
  denom = float(np.sum(total[shared]))
  image_share = float(np.sum(image[shared])) / denom if denom > 0 else 0.0
  return {
    "total_var": float(np.mean(total)),
    "text_var": float(np.mean(text)),
    "image_var": float(np.mean(image)),
    "image_share": image_share,
    "zero_var_group_frac": float(np.mean(flat)),
    "shared_trace_group_frac": float(np.mean(shared)),
    "measurable_group_frac": float(np.mean(shared & ~flat)),
    "distinct_trace_frac": float(np.mean(distinct)),
  }
