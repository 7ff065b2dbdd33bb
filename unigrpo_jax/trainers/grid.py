"""Sample grids: each cell is an image with its prompt and reasoning written under it."""
from __future__ import annotations

import io
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unigrpo_jax import paths

CELL_SCALE = 4  # 32 px images become 128 px cells: shapes stay crisp (nearest neighbour)
TEXT_LINES = 7
LINE_HEIGHT = 11


def sample_grid(images: np.ndarray, prompts: Sequence[str], reasoning: Sequence[str],
                scores: Sequence[float], columns: int = 8) -> np.ndarray:
  """images uint8 [B, H, W, 3] -> one uint8 [rows * cell_h, columns * cell_w, 3] picture."""
  b, h, w, _ = images.shape
  cell_w = max(w * CELL_SCALE, 128)
  cell_h = h * CELL_SCALE + TEXT_LINES * LINE_HEIGHT + 6
  columns = min(columns, b)
  rows = -(-b // columns)
  canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  chars = max(8, cell_w // 6)
  for i in range(b):
    x, y = (i % columns) * cell_w, (i // columns) * cell_h
    img = Image.fromarray(np.asarray(images[i])).resize((w * CELL_SCALE, h * CELL_SCALE),
                                                          Image.NEAREST)
    canvas.paste(img, (x, y))
    lines = [f"score {scores[i]:.2f}"] + textwrap.wrap(prompts[i], chars)
    lines += textwrap.wrap("> " + reasoning[i], chars)
    for j, line in enumerate(lines[:TEXT_LINES]):
      draw.text((x + 2, y + h * CELL_SCALE + 2 + j * LINE_HEIGHT), line, fill=(0, 0, 0),
                font=font)
  return np.asarray(canvas)


def save_png(path: str, picture: np.ndarray) -> None:
  """Writes ``picture`` as a PNG to a local or gs:// path."""
  buf = io.BytesIO()
  Image.fromarray(picture).save(buf, format="PNG")
  paths.write_bytes(path, buf.getvalue())
