"""GenEval-style verifiable reward for ShapeWorld images (NumPy/SciPy, no learned detector).

Detection: every pixel is assigned to its nearest palette color if within COLOR_TOL (L2 in
RGB), else background. Per color, 8-connected components are objects after filtering:
area >= 2% of the image, bbox side in [15%, 50%] of the image, bbox aspect <= 1.5 (rejects
noise specks and whole-image floods). Shape from the fill ratio area / bbox area:
square ~1.0 (>= 0.9), circle ~pi/4 (0.69..0.9), triangle ~0.5-0.63 (0.4..0.69).

Per object group of the spec (shapes within a spec are distinct, see shapeworld.Spec):
  found    = detected objects with the group's shape, any color
  matching = found objects that also have the group's color (= found if color is None)
Clauses (docs/method.md §8):
  count    1 - |found - need| / need, clipped to [0, 1]
  color    1 - |need - matching| / need, clipped, and 0 unless found == need
           (only for groups with a color)
  position 1 if every matching subject centroid is beyond every matching object centroid
           by > 5% of the image side in the relation's direction, else 0 (only with a relation)
score = mean of the applicable clauses; strict = 1 iff every clause is 1. Objects of shapes
the spec does not mention are ignored, as in GenEval.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
from scipy import ndimage

from unigrpo_jax.data.shapeworld.world import COLORS, Spec

COLOR_TOL = 60.0
_PALETTE = np.array(list(COLORS.values()), np.float32)  # [K, 3]
_COLOR_NAMES = tuple(COLORS)
_EIGHT = np.ones((3, 3), bool)
SQUARE_MIN_FILL, CIRCLE_MIN_FILL, TRIANGLE_MIN_FILL = 0.9, 0.69, 0.4


def _classify(fill: float) -> str | None:
  if fill >= SQUARE_MIN_FILL:
    return "square"
  if fill >= CIRCLE_MIN_FILL:
    return "circle"
  if fill >= TRIANGLE_MIN_FILL:
    return "triangle"
  return None


def detect(image: np.ndarray) -> list[dict]:
  """Objects in one uint8 [H, W, 3] image: dicts with shape, color, area, cy, cx."""
  h, w = image.shape[:2]
  px = image.reshape(-1, 3).astype(np.float32)
  d2 = ((px[:, None, :] - _PALETTE[None]) ** 2).sum(-1)  # [H*W, K]
  nearest = d2.argmin(-1)
  labels_img = np.where(d2.min(-1) <= COLOR_TOL ** 2, nearest, -1).reshape(h, w)
  side = min(h, w)
  min_area, min_side, max_side = 0.02 * h * w, 0.15 * side, 0.5 * side
  out = []
  for k, name in enumerate(_COLOR_NAMES):
    mask = labels_img == k
    if mask.sum() < min_area:
      continue
    lab, n = ndimage.label(mask, structure=_EIGHT)
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
      comp = lab[sl] == i
      area = int(comp.sum())
      bh, bw = comp.shape
      if area < min_area or min(bh, bw) < min_side or max(bh, bw) > max_side:
        continue
      if max(bh, bw) > 1.5 * min(bh, bw):
        continue
      shape = _classify(area / (bh * bw))
      if shape is None:
        continue
      ys, xs = np.nonzero(comp)
      out.append({"shape": shape, "color": name, "area": area,
                  "cy": sl[0].start + ys.mean(), "cx": sl[1].start + xs.mean()})
  return out


def _position_ok(relation: str, subj: list[dict], obj: list[dict], margin: float) -> bool:
  if not subj or not obj:
    return False
  key, sign = {"left of": ("cx", 1), "right of": ("cx", -1),
               "above": ("cy", 1), "below": ("cy", -1)}[relation]
  # sign * (object coord - subject coord) must exceed margin for every pair.
  gaps = [sign * (o[key] - s[key]) for s in subj for o in obj]
  return min(gaps) > margin


def score_one(image: np.ndarray, spec: Spec) -> dict:
  """Clause scores for one image; see the module docstring."""
  dets = detect(image)
  counts, colors, matched = [], [], []
  for o in spec.objects:
    found = [d for d in dets if d["shape"] == o.shape]
    match = [d for d in found if o.color is None or d["color"] == o.color]
    counts.append(float(np.clip(1 - abs(len(found) - o.count) / o.count, 0, 1)))
    if o.color is not None:
      c = 1 - abs(o.count - len(match)) / o.count if len(found) == o.count else 0.0
      colors.append(float(np.clip(c, 0, 1)))
    matched.append(match)
  clauses = counts + colors
  position = 1.0
  if spec.relation is not None:
    position = float(_position_ok(spec.relation, matched[0], matched[1],
                                  0.05 * min(image.shape[:2])))
    clauses.append(position)
  return {
      "score": float(np.mean(clauses)),
      "strict": float(all(c >= 1.0 for c in clauses)),
      "count": float(np.mean(counts)),
      "color": float(np.mean(colors)) if colors else 1.0,
      "position": position,
      "has_color": float(bool(colors)),
      "has_position": float(spec.relation is not None),
      "num_detected": float(len(dets)),
  }


def score(images: Union[np.ndarray, Sequence[np.ndarray]], specs: Sequence[Spec]) -> dict:
  """GenEval-style partial reward.

  images: uint8 [B, H, W, 3] or a list of uint8 [H, W, 3]; specs: B Specs.
  Returns float32 [B] arrays: score (in [0, 1]), strict (0/1), count, color, position
  (clause means; color/position are 1.0 where has_color/has_position is 0), has_color,
  has_position, num_detected.
  """
  if isinstance(images, np.ndarray) and images.ndim != 4:
    raise ValueError(f"expected images [B, H, W, 3], got shape {images.shape}")
  images = list(images)
  if len(images) != len(specs):
    raise ValueError(f"{len(images)} images but {len(specs)} specs")
  rows = []
  for img, spec in zip(images, specs):
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
      raise ValueError(f"expected uint8 [H, W, 3] images, got {img.dtype} {img.shape}")
    if not isinstance(spec, Spec):
      raise TypeError(f"expected a Spec, got {type(spec).__name__}")
    rows.append(score_one(img, spec))
  keys = ("score", "strict", "count", "color", "position", "has_color", "has_position",
          "num_detected")
  return {k: np.array([r[k] for r in rows], np.float32) for k in keys}
