"""DDPO's classic JPEG rewards: how many kB an image takes as a quality-95 JPEG (via Pillow).

Black et al. (DDPO) use the JPEG file size as a cheap proxy for image complexity: rewarding the
negative size (compressibility) drives toward flat, simple images; the positive size
(incompressibility) toward detailed, textured ones. 1 kB = 1000 bytes, as in DDPO.
"""
from __future__ import annotations

import io
from typing import Sequence, Union

import numpy as np
from PIL import Image

JPEG_QUALITY = 95


def jpeg_kilobytes(images: Union[np.ndarray, Sequence[np.ndarray]],
                   quality: int = JPEG_QUALITY) -> np.ndarray:
  """uint8 images [B, H, W, 3] (or a list of [H, W, 3]) -> float32 [B] JPEG sizes in kB."""
  sizes = []
  for i, img in enumerate(images):
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
      raise ValueError(f"jpeg reward: image {i} must be uint8 [H, W, 3], got "
                       f"{img.dtype} {tuple(img.shape)}")
    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="JPEG", quality=quality)
    sizes.append(buf.tell() / 1000.0)
  return np.asarray(sizes, np.float32)
