"""Draws a ShapeWorld scene: objects in distinct cells of a 3 x 3 grid on a black background."""
from __future__ import annotations

import numpy as np

from unigrpo_jax.data.shapeworld.world import BACKGROUND, COLORS, Spec, pick


GRID = 3  # objects sit in distinct cells of a GRID x GRID layout


def object_size_range(size: int) -> tuple[int, int]:
  """Side (px) of a rendered object: 7-8 px at 32, 14-16 px at 64."""
  return max(5, round(0.22 * size)), max(5, round(0.25 * size))


def _shape_mask(shape: str, s: int) -> np.ndarray:
  """bool [s, s]: pixel centers inside the shape inscribed in an s x s box."""
  c = (np.arange(s) + 0.5)
  v, u = np.meshgrid(c, c, indexing="ij")  # v: row, u: column
  if shape == "square":
    return np.ones((s, s), bool)
  if shape == "circle":
    return (u - s / 2) ** 2 + (v - s / 2) ** 2 <= (s / 2) ** 2
  if shape == "triangle":  # apex up, base on the bottom row
    return np.abs(u - s / 2) <= v / 2 + 0.25
  raise ValueError(shape)


def _cells_for(spec: Spec, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
  """Per group, distinct (row, col) cells; a relation splits the grid along one axis so
  every subject cell is strictly left/right/above/below every object cell."""
  all_cells = [(r, c) for r in range(GRID) for c in range(GRID)]
  counts = [o.count for o in spec.objects]
  if spec.relation is None:
    order = rng.permutation(len(all_cells))
    out, k = [], 0
    for n in counts:
      out.append([all_cells[j] for j in order[k:k + n]])
      k += n
    return out
  axis = 1 if spec.relation in ("left of", "right of") else 0
  subject_low = spec.relation in ("left of", "above")
  splits = [k for k in range(1, GRID)
            if counts[0] <= GRID * (k if subject_low else GRID - k)
            and counts[1] <= GRID * (GRID - k if subject_low else k)]
  k = pick(rng, splits)
  low = [c for c in all_cells if c[axis] < k]
  high = [c for c in all_cells if c[axis] >= k]
  regions = (low, high) if subject_low else (high, low)
  return [[region[j] for j in rng.permutation(len(region))[:n]]
          for region, n in zip(regions, counts)]


def render(spec: Spec, seed: int = 0, size: int = 32) -> np.ndarray:
  """uint8 [size, size, 3]: one image satisfying `spec` (layout drawn from seed).

  Objects sit in distinct grid cells with >= 1 px gap, so same-colored objects never
  touch; color None draws one random palette color per group."""
  if size < 24:
    raise ValueError(f"size must be >= 24, got {size}")
  rng = np.random.default_rng(seed)
  img = np.empty((size, size, 3), np.uint8)
  img[:] = BACKGROUND
  cell = size // GRID
  off = (size - GRID * cell) // 2
  lo, hi = object_size_range(size)
  for o, cells in zip(spec.objects, _cells_for(spec, rng)):
    color = np.array(COLORS[o.color or pick(rng, tuple(COLORS))], np.uint8)
    for (r, c) in cells:
      s = int(rng.integers(lo, hi + 1))
      jy, jx = rng.integers(0, cell - s, size=2)  # keeps a 1 px gap to the next cell
      y0, x0 = off + r * cell + jy, off + c * cell + jx
      patch = img[y0:y0 + s, x0:x0 + s]
      patch[_shape_mask(o.shape, s)] = color
  return img
