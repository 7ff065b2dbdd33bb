"""CLIP inputs: the tokenizer (``tokenizer.json`` via the `tokenizers` library) and image
preprocessing in JAX, as HF's ``CLIPProcessor`` does them.

Text: the directory's tokenizer.json already holds CLIP's pipeline (normaliser, byte-level BPE,
``<|startoftext|> ... <|endoftext|>`` post-processor); ids are truncated to the context length
(77) keeping the EOS last, and padded to it with the pad token of special_tokens_map.json /
tokenizer_config.json (default ``<|endoftext|>``, as HF's CLIPTokenizer). Padding to 77 instead
of to the longest prompt (flow_grpo's padding=True) gives the same embedding: attention is causal
and the pooled EOS comes before any padding.

Images: uint8 [B, H, W, 3] -> resize so the shortest side is ``size`` (the long side
``int(size * long / short)``, as HF) with an antialiased bicubic (``jax.image.resize``, Keys
a = -0.5 like PIL's), done like PIL as two 1-D passes in Pillow's order, each rounded and
clipped to uint8 levels -> center crop (top = (h - crop) // 2) -> x / 255 -> (x - mean) / std.
PIL computes in fixed point, so a few pixels still differ by one grey level (under 0.4% of the
pixels of the fixtures; tests/models/clip/test_clip.py bounds it).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unigrpo_jax import paths
from unigrpo_jax.models.clip.weights import CLIPLoadError

CONTEXT_LENGTH = 77
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL resample codes in preprocessor_config.json -> jax.image.resize methods.
_RESAMPLE = {3: "bicubic", 2: "linear"}


def _json_or_empty(path: str) -> dict:
  if not paths.isfile(path):
    return {}
  try:
    raw = json.loads(paths.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CLIPLoadError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(raw, dict):
    raise CLIPLoadError(f"{path}: expected a JSON object")
  return raw


def _token_name(value) -> Optional[str]:
  """special-token entries are a string or {"content": str, ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value


class CLIPTokenizer:
  """prompts -> (ids int32 [B, L], attention_mask int32 [B, L]) with L = context length."""

  def __init__(self, directory: str, context_length: int = CONTEXT_LENGTH,
               eos_token_id: Optional[int] = None):
    from tokenizers import Tokenizer
    path = paths.join(directory, "tokenizer.json")
    if not paths.isfile(path):
      raise CLIPLoadError(f"{path}: file not found (the CLIP tokenizer is read from it)")
    try:
      self._tok = Tokenizer.from_str(paths.read_text(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
      raise CLIPLoadError(f"{path}: cannot load tokenizer ({e})") from None
    special = {**_json_or_empty(paths.join(directory, "tokenizer_config.json")),
               **_json_or_empty(paths.join(directory, "special_tokens_map.json"))}
    pad_token = _token_name(special.get("pad_token")) or "<|endoftext|>"
    pad_id = self._tok.token_to_id(pad_token)
    if pad_id is None:
      raise CLIPLoadError(f"{path}: pad token {pad_token!r} is not in the vocabulary")
    self.path, self.context_length, self.pad_id = path, context_length, pad_id
    self.eos_token_id = eos_token_id
    self.vocab_size = self._tok.get_vocab_size()
    # truncation leaves room for the post-processor's BOS/EOS, as HF's truncation=True.
    self._tok.enable_truncation(max_length=context_length)
    self._tok.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token)

  def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(prompts, str):
      raise TypeError("CLIPTokenizer takes a sequence of prompts, not one string")
    encs = self._tok.encode_batch(list(prompts))
    ids = np.asarray([e.ids for e in encs], np.int32).reshape(len(encs), self.context_length)
    mask = np.asarray([e.attention_mask for e in encs], np.int32).reshape(ids.shape)
    if self.eos_token_id is not None and self.eos_token_id != 2:
      # Pooling takes the first EOS; a row without one would silently pool token 0.
      missing = np.flatnonzero(~(ids == self.eos_token_id).any(-1))
      if missing.size:
        raise ValueError(f"{self.path}: prompt {prompts[missing[0]]!r} encodes without the EOS "
                         f"id {self.eos_token_id} (does tokenizer.json add <|endoftext|>?)")
    if ids.size and ids.max() >= self.vocab_size:
      raise ValueError(f"{self.path}: token id {ids.max()} >= vocab size {self.vocab_size}")
    return ids, mask


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """The fields of HF's preprocessor_config.json that CLIP's processor uses."""
  shortest_edge: int = 224  # with square=True: resize to shortest_edge^2 regardless of aspect
  crop_size: int = 224
  mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  std: tuple[float, float, float] = OPENAI_CLIP_STD
  method: str = "bicubic"
  rescale_factor: float = 1 / 255
  square: bool = False  # size {"height": s, "width": s}: HF resizes to exactly s x s

  @classmethod
  def from_directory(cls, directory: str, image_size: int) -> "ImageProcessorConfig":
    """preprocessor_config.json if present, else CLIP's defaults at the model's image_size."""
    path = paths.join(directory, "preprocessor_config.json")
    raw = _json_or_empty(path)
    if not raw:
      return cls(shortest_edge=image_size, crop_size=image_size)

    def side(key: str, sub: Sequence[str], default: int) -> int:
      v = raw.get(key, default)
      if isinstance(v, dict):
        vals = {v[s] for s in sub if s in v}
        if len(vals) != 1:
          raise CLIPLoadError(f"{path}: {key} {v!r} is not square/shortest-edge (unsupported)")
        v = vals.pop()
      # An int size is a shortest edge, as HF's get_size_dict(default_to_square=False) reads it.
      if not isinstance(v, int) or v <= 0:
        raise CLIPLoadError(f"{path}: {key} must be a positive integer, got {v!r}")
      return v

    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
      if raw.get(flag, True) is not True:
        raise CLIPLoadError(f"{path}: {flag}=false is not supported (CLIP preprocessing)")
    resample = raw.get("resample", 3)
    if resample not in _RESAMPLE:
      raise CLIPLoadError(f"{path}: resample={resample!r} unsupported; use 3 (bicubic) or "
                          "2 (bilinear)")
    size = raw.get("size")
    square = isinstance(size, dict) and "shortest_edge" not in size
    out = cls(shortest_edge=side("size", ("shortest_edge",) if not square else ("height", "width"),
                                 image_size),
              square=square,
              crop_size=side("crop_size", ("height", "width"), image_size),
              mean=tuple(raw.get("image_mean", OPENAI_CLIP_MEAN)),
              std=tuple(raw.get("image_std", OPENAI_CLIP_STD)),
              method=_RESAMPLE[resample],
              rescale_factor=float(raw.get("rescale_factor", 1 / 255)))
    if len(out.mean) != 3 or len(out.std) != 3 or min(out.std) <= 0:
      raise CLIPLoadError(f"{path}: image_mean/image_std must be 3 values (std > 0)")
    if out.crop_size != image_size:
      raise CLIPLoadError(f"{path}: crop_size {out.crop_size} != the model's vision "
                          f"image_size {image_size}")
    if out.crop_size > out.shortest_edge:
      raise CLIPLoadError(f"{path}: crop_size {out.crop_size} > size {out.shortest_edge}")
    return out


def resized_shape(h: int, w: int, shortest_edge: int) -> tuple[int, int]:
  """HF get_resize_output_image_size(default_to_square=False): short -> S, long -> int(S*l/s)."""
  if h <= w:
    return shortest_edge, int(shortest_edge * w / h)
  return int(shortest_edge * h / w), shortest_edge


def preprocess_images(images: jax.Array, cfg: ImageProcessorConfig) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 [B, crop, crop, 3] normalised pixels (jit-able; shapes static)."""
  b, h, w, c = images.shape
  nh, nw = ((cfg.shortest_edge,) * 2 if cfg.square
            else resized_shape(h, w, cfg.shortest_edge))
  x = images.astype(jnp.float32)
  # PIL resizes in two 1-D passes, each rounded half-up and clipped to uint8. One 2-D float
  # resize instead differs from PIL by up to 7 grey levels on noise (bicubic overshoot that PIL
  # clips after its first pass survives into the second), so the passes are done the same way,
  # in PIL's order: Pillow >= 13 runs the vertical pass first when the height shrinks by more
  # than twice as many pixels as the width (Resample.c, "horizontal_first"), else horizontal.
  def one_pass(x, shape):
    x = jax.image.resize(x, shape, method=cfg.method, antialias=True)
    return jnp.clip(jnp.floor(x + 0.5), 0, 255)

  vertical_first = (h - nh) > 0 and (h - nh) > 2 * (w - nw)
  if vertical_first:
    if nh != h:
      x = one_pass(x, (b, nh, w, c))
    if nw != w:
      x = one_pass(x, (b, nh, nw, c))
  else:
    if nw != w:
      x = one_pass(x, (b, h, nw, c))
    if nh != h:
      x = one_pass(x, (b, nh, nw, c))
  top, left = (nh - cfg.crop_size) // 2, (nw - cfg.crop_size) // 2
  x = x[:, top:top + cfg.crop_size, left:left + cfg.crop_size]
  mean, std = jnp.asarray(cfg.mean, jnp.float32), jnp.asarray(cfg.std, jnp.float32)
  return (x * cfg.rescale_factor - mean) / std
