"""CLIP-family rewards in JAX: ``pickscore`` and ``clip_score``, on the policy's devices.

Both score each image against its own prompt with a CLIP model loaded from an HF ``CLIPModel``
directory (models/clip/weights.py), its tokenizer.json and preprocessor_config.json
(models/clip/processor.py). With cos = cos_sim(image_embedding, text_embedding):

  pickscore  = exp(logit_scale) * cos / 26   as flow_grpo's PickScoreScorer (its "norm to 0-1":
               PickScore_v1's exp(logit_scale) is about 100, so raw scores ~ 18-23 map to ~0.7-0.9);
               details: pickscore/raw = exp(logit_scale) * cos (PickScore's own scale).
  clip_score = 2.5 * max(cos, 0)             CLIPScore of Hessel et al. 2021 (w = 2.5);
               torchmetrics' CLIPScore is 100 * max(cos, 0) = 40 * this.
Every reward also returns ``cosine``.

Placement: on a ("data", "fsdp", "tensor") mesh of the same shape as the policy's (built from
config.mesh), each call's images and prompts are split over the batch axes ("data", "fsdp");
the weights are FSDP'd like the policy's: every matrix whose last axis divides by the fsdp size
is split along it over "fsdp" (XLA all-gathers it per layer), the rest replicated (with fsdp=1,
all of them); preprocessing (resize, crop, normalise) runs inside the same
jitted function, so only uint8 images travel to the device. Images are scored in fixed chunks of
``reward_models.batch_size`` rows (rounded up to a multiple of the batch parallelism, the last
chunk padded), so one compile serves every batch of a given image size; prompts are deduplicated
(a GRPO group shares its prompt) and embedded in chunks of the same size.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from unigrpo_jax import parallel, paths
from unigrpo_jax.models.clip.model import l2_normalize
from unigrpo_jax.models.clip.weights import CLIPLoadError, load_clip_state
from unigrpo_jax.models.clip.processor import CLIPTokenizer, ImageProcessorConfig, preprocess_images

PICKSCORE_DIVISOR = 26.0  # flow_grpo/pickscore_scorer.py: "scores = scores/26  # norm to 0-1"
CLIPSCORE_W = 2.5  # Hessel et al. 2021, CLIPScore


def param_shardings(state, mesh):
  """FSDP for CLIP: split the last axis of every >= 2-D weight over "fsdp" when it divides."""
  fsdp = mesh.shape["fsdp"]

  def one(x):
    if x.ndim >= 2 and fsdp > 1 and x.shape[-1] % fsdp == 0:
      return NamedSharding(mesh, PartitionSpec(*(None,) * (x.ndim - 1), "fsdp"))
    return parallel.replicated(mesh)

  return jax.tree.map(one, state)


class CLIPScorer:
  """Cosine similarity of (image, prompt) pairs under one CLIP model.

  Args:
    model_dir: HF CLIPModel directory (config.json + model.safetensors or a sharded index).
    processor_dir: directory with tokenizer.json (+ special_tokens_map.json /
      tokenizer_config.json) and preprocessor_config.json; default model_dir.
    mesh: a ("data", "fsdp", "tensor") mesh; None = the default device.
    batch_size: rows per jitted call (rounded up to a multiple of the batch parallelism).
  Everything is validated (files, tensors, shapes, processor config) in the constructor,
  before anything compiles.
  """

  def __init__(self, model_dir: str, processor_dir: str = "", mesh=None, batch_size: int = 32):
    if batch_size <= 0:
      raise ValueError(f"CLIPScorer batch_size must be positive, got {batch_size}")
    cfg, graphdef, state = load_clip_state(model_dir)
    processor_dir = processor_dir or model_dir
    self.config = cfg
    self.tokenizer = CLIPTokenizer(processor_dir,
                                   context_length=min(77, cfg.text.max_position_embeddings),
                                   eos_token_id=cfg.text.eos_token_id)
    if self.tokenizer.vocab_size > cfg.text.vocab_size:
      raise CLIPLoadError(f"{self.tokenizer.path}: tokenizer vocab {self.tokenizer.vocab_size} "
                          f"> the model's text vocab_size {cfg.text.vocab_size}")
    self.image_cfg = ImageProcessorConfig.from_directory(processor_dir, cfg.vision.image_size)
    self.mesh = mesh
    if mesh is not None:
      par = parallel.batch_parallelism(mesh)
      self._batch_sharding = parallel.batch_sharding(mesh)
      params_sharding = param_shardings(state, mesh)
    else:
      par, self._batch_sharding, params_sharding = 1, None, None
    self.batch_size = -(-batch_size // par) * par
    self._state = jax.device_put(state, params_sharding)
    self.logit_scale = float(np.exp(np.asarray(state["logit_scale"][...])))
    self._graphdef = graphdef
    image_cfg = self.image_cfg

    @jax.jit
    def embed_images(state, images_u8):
      model = nnx.merge(graphdef, state)
      return l2_normalize(model.image_features(preprocess_images(images_u8, image_cfg)))

    @jax.jit
    def embed_texts(state, ids, mask):
      model = nnx.merge(graphdef, state)
      return l2_normalize(model.text_features(ids, mask))

    self._embed_images, self._embed_texts = embed_images, embed_texts

  def _chunks(self, arrays: Sequence[np.ndarray], fn) -> np.ndarray:
    """Runs fn(state, *chunk) over fixed-size, zero-padded chunks of the leading axis."""
    n, bs = len(arrays[0]), self.batch_size
    outs = []
    for start in range(0, n, bs):
      chunk = [a[start:start + bs] for a in arrays]
      pad = bs - len(chunk[0])
      if pad:
        chunk = [np.concatenate([c, np.zeros((pad,) + c.shape[1:], c.dtype)]) for c in chunk]
      chunk = [jax.device_put(c, self._batch_sharding) for c in chunk]
      outs.append(np.asarray(jax.device_get(fn(self._state, *chunk)))[:bs - pad])
    return np.concatenate(outs) if outs else np.zeros((0, self.config.projection_dim),
                                                      np.float32)

  def image_embeddings(self, images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> L2-normalised float32 [B, P]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"CLIP rewards take uint8 images [B, H, W, 3], got {images.dtype} "
                       f"{images.shape}")
    return self._chunks([images], self._embed_images)

  def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
    """B prompts -> L2-normalised float32 [B, P] (each distinct prompt embedded once)."""
    unique = list(dict.fromkeys(prompts))
    ids, mask = self.tokenizer(unique)
    emb = self._chunks([ids, mask], self._embed_texts)
    row = {p: i for i, p in enumerate(unique)}
    return emb[[row[p] for p in prompts]]

  def cosine(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """float32 [B]: cos_sim(image_b, prompt_b)."""
    if len(prompts) != len(images):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return np.sum(self.image_embeddings(images) * self.text_embeddings(prompts), -1)


def pickscore(cos: np.ndarray, logit_scale: float) -> np.ndarray:
  """flow_grpo's PickScore reward from cos and exp(logit_scale); see the module docstring."""
  return (logit_scale * cos / PICKSCORE_DIVISOR).astype(np.float32)


def clip_score(cos: np.ndarray) -> np.ndarray:
  """CLIPScore 2.5 * max(cos, 0)."""
  return (CLIPSCORE_W * np.maximum(cos, 0.0)).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _cached_scorer(model_dir: str, processor_dir: str, mesh_shape: tuple[int, int, int],
                   batch_size: int) -> CLIPScorer:
  # One model per (directory, mesh) per process: a re-built reward (evaluation, tests) reuses it.
  mesh = parallel.make_mesh(*mesh_shape)
  return CLIPScorer(model_dir, processor_dir, mesh, batch_size)


# reward name -> the config.reward_models key prefix of its directories
_DIR_KEY = {"pickscore": "pickscore", "clip_score": "clip"}


def scorer_from_config(kind: str, config: ml_collections.ConfigDict) -> CLIPScorer:
  """The CLIPScorer of reward `kind` from config.reward_models and config.mesh."""
  rm = config.get("reward_models")
  key = _DIR_KEY[kind]
  model_dir = rm.get(f"{key}_dir", "") if rm is not None else ""
  if not model_dir:
    raise ValueError(f"config.reward_models.{key}_dir: reward {kind!r} needs an HF CLIPModel "
                     "directory (config.json, model.safetensors, tokenizer.json)")
  processor_dir = rm.get(f"{key}_processor_dir", "") or model_dir
  for d in {model_dir, processor_dir}:
    if not paths.isdir(d):
      raise CLIPLoadError(f"config.reward_models: {kind} directory {d!r} not found")
  m = config.mesh
  return _cached_scorer(paths.resolve_path(model_dir), paths.resolve_path(processor_dir),
                        (m.data, m.fsdp, m.tensor), int(rm.get("batch_size", 32)))


def make_reward(kind: str, config: ml_collections.ConfigDict):
  """The registry's reward fn for `kind` ("pickscore" | "clip_score")."""
  scorer = scorer_from_config(kind, config)

  def reward(images, specs, reasoning_texts=None, prompts: Optional[Sequence[str]] = None
             ) -> dict:
    del reasoning_texts
    if prompts is None:
      raise ValueError(f"reward {kind!r} needs the prompts (call with prompts=...)")
    if len(prompts) != len(specs):
      raise ValueError(f"{len(prompts)} prompts but {len(specs)} specs")
    cos = scorer.cosine(images, prompts).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(cos))
    if bad.size:  # e.g. a zero embedding: never let a NaN reach the advantages
      raise ValueError(f"{kind}: non-finite similarity for prompt {prompts[bad[0]]!r} "
                       f"(row {bad[0]}; {bad.size} rows in all)")
    if kind == "pickscore":
      raw = (scorer.logit_scale * cos).astype(np.float32)
      return {"reward": pickscore(cos, scorer.logit_scale), "raw": raw, "cosine": cos}
    return {"reward": clip_score(cos), "cosine": cos}

  reward.__name__ = kind
  return reward
