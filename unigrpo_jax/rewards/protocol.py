"""The reward-server wire format: JSON in, JSON out, nothing executable either way.

Request (POST, ``Content-Type: application/json``)::

  {"protocol": 1,
   "images":    [base64 PNG, ...]            # N RGB images, uint8 [H, W, 3] each
   "prompts":   [str, ...]                   # N prompts
   "metadata":  [object, ...]                # N JSON objects (GenEval metadata, ShapeWorld spec)
   "reasoning": [str, ...] | null}           # N sampled reasoning traces, optional

Response (200)::

  {"scores": [float, ...],                   # exactly N finite numbers
   "details": {name: [float, ...], ...}}     # optional, each exactly N finite numbers

Anything else (not JSON, NaN/Infinity, wrong counts, non-numbers) is a ``ProtocolError``
naming what was wrong. Both sides use only ``json``; no pickle, no eval. What a request may cost
the server (nesting depth, image count and sizes) is bounded by ``rewards.request_budget``,
checked before anything here decodes it.
"""
from __future__ import annotations

import base64
import io
import json
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
  """A request or response that does not follow the protocol."""


def encode_png(image: np.ndarray) -> str:
  """uint8 [H, W, 3] -> base64 PNG string (lossless: the server sees the exact pixels)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ProtocolError(f"images must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  buf = io.BytesIO()
  # compress_level=1: PNG is lossless at every level; level 1 is ~5x faster to encode than
  # the default and only ~10% larger, and encoding dominates the client's CPU time.
  Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=1)
  return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str, max_pixels: Optional[int] = None) -> np.ndarray:
  """base64 PNG -> uint8 [H, W, 3]. ``max_pixels``: refuse an image whose header claims more
  pixels, before its data is decompressed (a server passes its budget; PIL's own
  ``Image.MAX_IMAGE_PIXELS`` guard applies either way)."""
  try:
    raw = base64.b64decode(data, validate=True)
    with Image.open(io.BytesIO(raw)) as im:
      if im.format != "PNG":
        raise ProtocolError(f"image is {im.format}, not PNG")
      width, height = im.size  # from the header: nothing is decompressed yet
      if max_pixels is not None and width * height > max_pixels:
        raise ProtocolError(f"image is {width}x{height} px, over the {max_pixels:,} px limit")
      return np.asarray(im.convert("RGB"), np.uint8)
  except ProtocolError:
    raise
  except Exception as e:  # binascii.Error, PIL.UnidentifiedImageError, DecompressionBombError...
    raise ProtocolError(f"image is not a base64 PNG ({type(e).__name__}: {e})") from None


def make_request(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict],
                 reasoning: Optional[Sequence[str]] = None) -> dict:
  """images uint8 [N, H, W, 3] + N prompts / metadata (/ reasoning) -> request dict."""
  n = len(images)
  for name, seq in (("prompts", prompts), ("metadata", metadata), ("reasoning", reasoning)):
    if seq is not None and len(seq) != n:
      raise ProtocolError(f"{n} images but {len(seq)} {name}")
  return {"protocol": PROTOCOL_VERSION, "images": [encode_png(im) for im in images],
          "prompts": [str(p) for p in prompts], "metadata": [dict(m) for m in metadata],
          "reasoning": None if reasoning is None else [str(r) for r in reasoning]}


def _reject_constant(name: str):
  raise ProtocolError(f"non-finite number {name} in JSON")


def loads_strict(body: bytes | str):
  """json.loads that rejects NaN / Infinity (Python's json accepts them by default)."""
  try:
    return json.loads(body, parse_constant=_reject_constant)
  except ProtocolError:
    raise
  except RecursionError:  # a last guard; servers check the depth first (rewards.request_budget)
    raise ProtocolError("JSON nested too deeply to parse") from None
  except (ValueError, UnicodeDecodeError) as e:
    text = body[:200] if isinstance(body, str) else body[:200].decode("utf-8", "replace")
    raise ProtocolError(f"not JSON ({e}); body starts {text!r}") from None


def _finite_vector(value, n: int, what: str) -> np.ndarray:
  if not isinstance(value, list):
    raise ProtocolError(f"{what} must be a list of {n} numbers, got {type(value).__name__}")
  if len(value) != n:
    raise ProtocolError(f"{what} has {len(value)} entries for {n} images")
  bad = [i for i, v in enumerate(value)
         if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
  if bad:
    raise ProtocolError(f"{what}[{bad[0]}] = {value[bad[0]]!r} is not a finite number "
                        f"({len(bad)} bad entries)")
  return np.asarray(value, np.float32)


def parse_response(body: bytes | str, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Response body for n images -> (scores float32 [n], details {name: float32 [n]})."""
  obj = loads_strict(body)
  if not isinstance(obj, dict) or "scores" not in obj:
    raise ProtocolError("response must be a JSON object with a 'scores' list")
  scores = _finite_vector(obj["scores"], n, "scores")
  details = obj.get("details") or {}
  if not isinstance(details, dict):
    raise ProtocolError("'details' must be an object of name -> list of numbers")
  return scores, {str(k): _finite_vector(v, n, f"details[{k!r}]") for k, v in details.items()}


def parse_fields(obj) -> tuple[list[str], list[str], list[dict], Optional[list[str]]]:
  """Server side, before any decoding: request dict -> (images as base64 strings, prompts,
  metadata, reasoning or None), every field's type and count checked. Raises ProtocolError
  naming the bad field or item."""
  if not isinstance(obj, dict):
    raise ProtocolError("request must be a JSON object")
  if obj.get("protocol") != PROTOCOL_VERSION:
    raise ProtocolError(f"protocol must be {PROTOCOL_VERSION}, got {obj.get('protocol')!r}")
  images = obj.get("images")
  if not isinstance(images, list) or not images:
    raise ProtocolError("'images' must be a non-empty list of base64 PNGs")
  n = len(images)
  bad = next((i for i, data in enumerate(images) if not isinstance(data, str)), None)
  if bad is not None:
    raise ProtocolError(f"images[{bad}] is not a string")
  prompts, metadata, reasoning = obj.get("prompts"), obj.get("metadata"), obj.get("reasoning")
  if not isinstance(prompts, list) or len(prompts) != n or not all(
      isinstance(p, str) for p in prompts):
    raise ProtocolError(f"'prompts' must be a list of {n} strings")
  if not isinstance(metadata, list) or len(metadata) != n or not all(
      isinstance(m, dict) for m in metadata):
    raise ProtocolError(f"'metadata' must be a list of {n} objects")
  if reasoning is not None and (not isinstance(reasoning, list) or len(reasoning) != n or not all(
      isinstance(r, str) for r in reasoning)):
    raise ProtocolError(f"'reasoning' must be null or a list of {n} strings")
  return images, prompts, metadata, reasoning


def parse_request(obj, max_pixels: Optional[int] = None
                  ) -> tuple[list[np.ndarray], list[str], list[dict], Optional[list[str]]]:
  """Server side: request dict -> (images list of uint8 [H, W, 3], prompts, metadata,
  reasoning or None). Raises ProtocolError naming the bad field or item. It decodes every
  image: a server facing untrusted clients checks ``rewards.request_budget`` first, as
  ``rewards.serve`` does."""
  images, prompts, metadata, reasoning = parse_fields(obj)
  decoded = []
  for i, data in enumerate(images):
    try:
      decoded.append(decode_png(data, max_pixels))
    except ProtocolError as e:
      raise ProtocolError(f"images[{i}]: {e}") from None
  return decoded, prompts, metadata, reasoning
