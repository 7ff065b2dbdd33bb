"""What a reward-server request may cost, checked before anything is decoded.

A request is cheap to send and expensive to serve: a 100,000-deep ``[[[...`` makes
``json.loads`` recurse, and a PNG of a few kB can claim 20000x20000 pixels (a 1.2 GB RGB
array once decoded). So the server checks, in this order and each in time linear in the body
with constant memory per step:

1. the body size (``max_body_bytes``; before it is read, from Content-Length);
2. the JSON nesting depth (``max_json_depth``; a vectorised scan, no recursion, before
   ``json.loads``);
3. the image count (``max_images``), then each image's width and height read from its PNG IHDR
   header (``max_image_side``; the first 33 bytes, parsed here, before PIL sees the image),
   then the request's total pixels (``max_request_pixels``).

Only then are the images decoded. A violation raises ``BudgetError`` carrying the HTTP status
(413 for "too large", 400 for malformed) and a message naming the limit, its flag and the
value seen.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import struct
import zlib
from typing import Sequence

import numpy as np

from unigrpo_jax.rewards.protocol import ProtocolError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Signature (8) + IHDR chunk: length (4), type (4), data (13), CRC (4).
PNG_HEADER_BYTES = 33
# base64 turns 3 bytes into 4 characters: the first 44 characters hold exactly those 33 bytes.
_HEADER_B64_CHARS = PNG_HEADER_BYTES // 3 * 4
# PNG's allowed (colour type -> bit depths).
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


@dataclasses.dataclass(frozen=True)
class Budget:
  """Per-request limits. The defaults fit the trainer's traffic with room to spare: the client
  sends 16 images a request (``remote_rewards.<name>.chunk_size``) of up to 1024 px, i.e. 16 Mpx;
  a request may carry 64 such images (64 Mpx, a 192 MiB uint8 batch once decoded)."""
  max_body_bytes: int = 256 << 20  # a base64 PNG of 1024 px noise is ~4 MiB: 64 of them fit
  max_json_depth: int = 32  # requests need 6 (request > metadata > item > spec > objects > obj)
  max_images: int = 1024
  max_image_side: int = 4096  # px, width and height each
  max_request_pixels: int = 64 << 20  # width * height summed over the request's images

  @property
  def max_image_pixels(self) -> int:
    """The most pixels one image can have (PIL's decompression-bomb guard is set to this)."""
    return self.max_image_side ** 2


class BudgetError(ProtocolError):
  """A request over a budget (or not shaped so that it can be checked); ``status`` is the HTTP
  status the server answers with."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def check_body_size(n_bytes: int, budget: Budget) -> None:
  if n_bytes > budget.max_body_bytes:
    raise BudgetError(413, f"request body is {n_bytes:,} bytes; the limit is "
                      f"{budget.max_body_bytes:,} (--max_body_mb="
                      f"{budget.max_body_bytes / (1 << 20):g})")


# --------------------------------------------------------------- JSON nesting depth
_CHUNK = 1 << 18  # bytes scanned per numpy step: bounds the scan's scratch memory (~15 MiB)
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN, _CLOSE = (ord("["), ord("{")), (ord("]"), ord("}"))


def _unescaped_quotes(c: np.ndarray, backslash_run: int) -> tuple[np.ndarray, int]:
  """Mask of the quotes in chunk ``c`` not escaped by a backslash, and the run of backslashes
  at its end. ``backslash_run``: the run at the end of the previous chunk."""
  quote = c == _QUOTE
  is_backslash = c == _BACKSLASH
  if not (backslash_run or is_backslash.any()):
    return quote, 0
  # A quote is escaped when an odd run of backslashes precedes it. Run ending at byte i:
  # i - (index of the last non-backslash <= i); the carried run sits just before index 0.
  idx = np.arange(c.size)
  last_plain = np.maximum.accumulate(np.where(is_backslash, -1 - backslash_run, idx))
  run = idx - last_plain
  before = np.concatenate(([backslash_run], run[:-1]))
  return quote & (before % 2 == 0), int(run[-1])


def json_depth(body: bytes, stop_above: int = 1 << 62) -> int:
  """The deepest ``[``/``{`` nesting of a JSON text, ignoring brackets inside strings, found by
  one left-to-right pass (no recursion, no parse tree); returns early, with the depth reached,
  once that exceeds ``stop_above``.

  Vectorised per chunk because a Python loop per byte would take minutes on a 256 MiB body.
  Exact for UTF-8 (whose multi-byte characters contain no ASCII bytes; the server accepts
  nothing else). Outside strings valid JSON has no backslashes or stray quotes; on invalid JSON
  the depth is exact up to the first error, which is as far as ``json.loads`` gets.
  """
  data = np.frombuffer(body, np.uint8)
  in_string, backslash_run, depth, deepest = 0, 0, 0, 0
  for start in range(0, data.size, _CHUNK):
    c = data[start:start + _CHUNK]
    quote, backslash_run = _unescaped_quotes(c, backslash_run)
    if not quote.any():
      if in_string:
        continue  # all inside one string: the bulk of a real body (base64 images)
      inside = np.zeros(c.size, bool)
    else:  # inside a string after an odd number of quotes
      inside = (np.cumsum(quote, dtype=np.int64) + in_string) % 2 == 1
      in_string = int(inside[-1])
    opens = (c == _OPEN[0]) | (c == _OPEN[1])
    closes = (c == _CLOSE[0]) | (c == _CLOSE[1])
    levels = np.cumsum((opens.astype(np.int8) - closes) * ~inside, dtype=np.int64) + depth
    deepest = max(deepest, int(levels.max()))
    if deepest > stop_above:
      return deepest
    depth = int(levels[-1])
  return deepest


def check_json_depth(body: bytes, budget: Budget) -> None:
  deepest = json_depth(body, stop_above=budget.max_json_depth)
  if deepest > budget.max_json_depth:
    raise BudgetError(400, f"JSON nesting depth reaches {deepest:,}; the limit is "
                      f"{budget.max_json_depth} (--max_json_depth)")


# --------------------------------------------------------------- PNG headers
def png_size(raw: bytes) -> tuple[int, int]:
  """(width, height) from a PNG's signature and IHDR chunk (its first 33 bytes), checked: the
  signature, IHDR first with length 13 and a valid CRC, sizes in 1..2**31-1, a valid colour
  type and bit depth. BudgetError(400) otherwise."""
  if not raw.startswith(PNG_SIGNATURE):
    raise BudgetError(400, f"not a PNG: starts with {raw[:8]!r}, not the PNG signature")
  header = raw[:PNG_HEADER_BYTES]
  if len(header) < PNG_HEADER_BYTES:
    raise BudgetError(400, f"PNG cut short: {len(header)} bytes, its header needs "
                      f"{PNG_HEADER_BYTES}")
  length, kind = struct.unpack(">I4s", header[8:16])
  if kind != b"IHDR" or length != 13:
    raise BudgetError(400, f"PNG's first chunk is {kind!r} of {length} bytes, not a 13-byte "
                      "IHDR")
  if zlib.crc32(header[12:29]) != struct.unpack(">I", header[29:33])[0]:
    raise BudgetError(400, "PNG IHDR header fails its CRC check")
  width, height, bit_depth, colour_type = struct.unpack(">IIBB", header[16:26])
  if not (0 < width < 1 << 31 and 0 < height < 1 << 31):
    raise BudgetError(400, f"PNG IHDR claims an invalid size {width}x{height}")
  if bit_depth not in _PNG_DEPTHS.get(colour_type, ()):
    raise BudgetError(400, f"PNG IHDR has an invalid colour type {colour_type} / bit depth "
                      f"{bit_depth}")
  return width, height


def _header_bytes(data: str) -> bytes:
  """The first 33 decoded bytes of a base64 string (without decoding the rest)."""
  try:
    return base64.b64decode(data[:_HEADER_B64_CHARS], validate=True)
  except (binascii.Error, ValueError) as e:
    raise BudgetError(400, f"not base64 ({e})") from None


def check_images(images: Sequence[str], budget: Budget) -> list[tuple[int, int]]:
  """The (width, height) of each base64 PNG in ``images`` from its header, after checking the
  count, each image's sides and the total pixels against ``budget``."""
  if len(images) > budget.max_images:
    raise BudgetError(413, f"{len(images):,} images in one request; the limit is "
                      f"{budget.max_images:,} (--max_images)")
  sizes = []
  for i, data in enumerate(images):
    try:
      width, height = png_size(_header_bytes(data))
    except BudgetError as e:
      raise BudgetError(e.status, f"images[{i}]: {e}") from None
    if max(width, height) > budget.max_image_side:
      raise BudgetError(413, f"images[{i}] is {width}x{height} px (from its PNG header); the "
                        f"limit is {budget.max_image_side} px a side (--max_image_side)")
    sizes.append((width, height))
  total = sum(w * h for w, h in sizes)
  if total > budget.max_request_pixels:
    raise BudgetError(413, f"the request's {len(sizes)} images have {total:,} px in all (from "
                      f"their PNG headers); the limit is {budget.max_request_pixels:,} "
                      "(--max_request_pixels)")
  return sizes
