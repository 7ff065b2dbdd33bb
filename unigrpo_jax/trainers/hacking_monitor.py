"""A reward-hacking monitor: image statistics every step, and one warning when the held-out
strict accuracy falls while the training reward rises.

Reward hacking shows in the images before it shows in the reward: a policy that games a
compressibility or a partial-credit reward drifts to blank, washed-out or oversaturated images,
or to a colour palette the warm start never drew. Every step the loop logs, over the rollout's
images (uint8 [B, H, W, 3]):

  hack/saturation        mean HSV saturation in [0, 1]
  hack/blank_frac        fraction of images whose pixels are nearly constant (std < 4 / 255)
  hack/hist_distance     total-variation distance of the batch's coarse colour histogram from
                         the first step's (the warm start's), in [0, 1]
  hack/strict_partial_gap  mean partial reward - mean strict accuracy (only where both exist):
                         a widening gap means partial credit is being farmed

``HackingMonitor.observe_eval`` returns a warning (once per run) when the held-out strict
accuracy falls between two evaluations while the mean training reward over the same steps rose.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

BLANK_STD = 4.0  # uint8 levels: an image this flat carries no scene
BINS = 4  # per RGB channel: a 64-bin colour histogram


def saturation(images: np.ndarray) -> np.ndarray:
  """uint8 [B, H, W, 3] -> [B] mean HSV saturation in [0, 1] (0 where a pixel is black)."""
  x = np.asarray(images, np.float32) / 255.0
  hi, lo = x.max(-1), x.min(-1)
  sat = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)
  return sat.reshape(len(x), -1).mean(1)


def blank(images: np.ndarray) -> np.ndarray:
  """uint8 [B, H, W, 3] -> bool [B]: the image is (nearly) one flat colour."""
  x = np.asarray(images, np.float32)
  return x.reshape(len(x), -1, x.shape[-1]).std(1).max(-1) < BLANK_STD


def colour_histogram(images: np.ndarray) -> np.ndarray:
  """uint8 [B, H, W, 3] -> [BINS**3] normalised histogram of the batch's pixel colours."""
  q = (np.asarray(images, np.int64) * BINS) // 256  # [B, H, W, 3] in 0..BINS-1
  codes = (q[..., 0] * BINS + q[..., 1]) * BINS + q[..., 2]
  hist = np.bincount(codes.ravel(), minlength=BINS ** 3).astype(np.float64)
  return hist / max(hist.sum(), 1.0)


class HackingMonitor:
  """Per-step image statistics against the first batch seen, and the eval-trend warning."""

  def __init__(self, reference: Optional[list] = None):
    """``reference``: a saved ``reference_list()`` (a resumed run), else the first batch's."""
    self.reference: Optional[np.ndarray] = None if reference is None else np.asarray(
        reference, np.float64)
    self.last_eval: Optional[tuple[int, float]] = None  # (step, held-out strict accuracy)
    self.rewards: dict[int, float] = {}
    self.warned = False

  def step_metrics(self, step: int, images: np.ndarray, reward: np.ndarray,
                   strict: Optional[np.ndarray] = None) -> dict[str, float]:
    """Statistics of one rollout's images [B, H, W, 3] and its rewards [B] (strict [B] or None)
    -> ``hack/*`` metrics. The first call fixes the reference colour histogram."""
    hist = colour_histogram(images)
    if self.reference is None:
      self.reference = hist
    reward = np.asarray(reward, np.float64)
    self.rewards[step] = float(reward.mean())
    out = {"hack/saturation": float(saturation(images).mean()),
           "hack/blank_frac": float(blank(images).mean()),
           "hack/hist_distance": float(0.5 * np.abs(hist - self.reference).sum())}
    if strict is not None:
      out["hack/strict_partial_gap"] = float(reward.mean() - np.mean(strict))
    return out

  def reference_list(self) -> Optional[list]:
    """The reference histogram as a JSON-able list (checkpointed with the host state)."""
    return None if self.reference is None else self.reference.tolist()

  def observe_eval(self, step: int, strict_accuracy: float) -> Optional[str]:
    """Records a held-out evaluation; -> a one-time warning when strict accuracy fell since the
    previous evaluation while the mean train reward of the steps after it rose."""
    previous, self.last_eval = self.last_eval, (step, float(strict_accuracy))
    if previous is None or self.warned:
      return None
    prev_step, prev_strict = previous
    before = [r for s, r in self.rewards.items() if s <= prev_step]
    after = [r for s, r in self.rewards.items() if prev_step < s <= step]
    if not before or not after or strict_accuracy >= prev_strict:
      return None
    # Compare the train reward just before the previous eval with the steps since.
    recent = before[-len(after):]
    if np.mean(after) <= np.mean(recent):
      return None
    self.warned = True
    return (f"possible reward hacking: held-out strict accuracy fell {prev_strict:.3f} -> "
            f"{strict_accuracy:.3f} (steps {prev_step} -> {step}) while the train reward rose "
            f"{np.mean(recent):.3f} -> {np.mean(after):.3f}; look at hack/* and the sample grids")
