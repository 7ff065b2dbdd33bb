"""Model configuration: one frozen dataclass, validated at construction, and named presets.

Shapes that cannot work (heads not dividing the width, kv heads not dividing heads, an image size
the autoencoder and patch cannot tile) raise ``ValueError`` naming the field, before any array is
allocated.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from unigrpo_jax.models.unified.attention import ATTENTION_IMPLS

REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "offload_dots")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_EXPERTS = ("und", "gen")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes of the unified (BAGEL-style) model.

  The text side is a Qwen2-style decoder; the image side reads autoencoder latents that are
  patchified into tokens of ``latent_dim = image_channels * patch_size**2`` values, laid on a
  ``latent_grid x latent_grid`` grid (``image_size / (vae_downsample * patch_size)`` per side).
  """

  vocab_size: int
  hidden: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  head_dim: Optional[int] = None  # None: hidden // num_heads
  rope_theta: float = 1e6
  rms_eps: float = 1e-6
  qkv_bias: bool = True  # Qwen2 has biases on q/k/v, none on o.
  qk_norm: bool = True  # BAGEL adds per-head RMSNorm on q and k.
  tie_embeddings: bool = False
  mot: bool = True  # Mixture-of-Transformers: separate understanding / generation experts.
  # Image side. Pixels: image_channels=3, vae_downsample=1. FLUX VAE: 16 channels, 8x down.
  image_size: int = 32
  image_channels: int = 3
  vae_downsample: int = 1
  patch_size: int = 4
  timestep_freq_dim: int = 256
  timestep_scale: float = 1000.0  # t in [0, 1] is scaled before the sinusoid [ours]; BAGEL: 1.
  # Latent positions. 0: a fixed sin-cos table of the latent_grid x latent_grid raster, computed
  # at trace time [ours]. > 0 (BAGEL): a stored ``latent_pos_embed`` table of max_latent_size**2
  # rows, token (row, col) reading row ``row * max_latent_size + col``.
  max_latent_size: int = 0
  # Image-block markers. None (toy): <vision_start> is an ordinary causal context token and the
  # block holds only latents. Both set (BAGEL): the block is <|vision_start|> + latents +
  # <|vision_end|>, all at one RoPE position; the markers run through the understanding expert.
  vision_start_id: Optional[int] = None
  vision_end_id: Optional[int] = None
  dtype: str = "float32"  # compute dtype of matmuls; norms, softmax and RoPE stay float32.
  param_dtype: str = "float32"
  remat: bool = False  # rematerialise each layer in the backward pass.
  # What the backward pass keeps of a rematerialised layer: see ``unified.remat_policy``.
  remat_policy: str = "nothing_saveable"
  # Run the layer stack as one lax.scan (compile time flat in depth) over params stacked
  # [num_layers, ...] instead of a Python loop over per-layer params. Same values and results
  # (models/unified/layout.py converts); the decode loop (``cache_slot``) always runs unrolled.
  scan_layers: bool = False
  # Image-block attention (attention.block_attention): "auto" (resolved for the mesh's platform
  # by attention.resolve_impl: splash on TPU, cudnn on GPU in bf16/fp16, else chunked), or
  # "xla" (dense), "chunked", "splash", "cudnn". attention_chunk: queries per chunk (chunked).
  attention_impl: str = "auto"
  attention_chunk: int = 512
  # LoRA adapters (models/unified/lora.py). lora_rank 0: none (full fine-tuning). r > 0: each
  # projection in lora_targets of each expert in lora_experts gets float32 A [in, r] and B
  # [r, out] (B zero: step 0 is the base model exactly), adding (lora_alpha / r) * x A B;
  # only the adapters are trained and the frozen base is the reference.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple = ("q", "k", "v", "o", "gate", "up", "down")
  lora_experts: tuple = ("und", "gen")

  def __post_init__(self):
    for name in ("vocab_size", "hidden", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                 "image_size", "image_channels", "vae_downsample", "patch_size",
                 "timestep_freq_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    if self.head_dim is None and self.hidden % self.num_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} does not divide "
                       f"ModelConfig.hidden={self.hidden} (or set head_dim explicitly)")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_kv_heads={self.num_kv_heads} does not divide "
                       f"ModelConfig.num_heads={self.num_heads}")
    if self.resolved_head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.resolved_head_dim} must be even for RoPE")
    tile = self.vae_downsample * self.patch_size
    if self.image_size % tile:
      raise ValueError(f"ModelConfig.image_size={self.image_size} is not a multiple of "
                       f"vae_downsample*patch_size={tile}")
    if self.hidden % 4:
      raise ValueError(f"ModelConfig.hidden={self.hidden} must be a multiple of 4 for the 2-D "
                       "sin-cos position embedding")
    if self.timestep_freq_dim % 2:
      raise ValueError(f"ModelConfig.timestep_freq_dim={self.timestep_freq_dim} must be even")
    if self.max_latent_size < 0 or 0 < self.max_latent_size < self.latent_grid:
      raise ValueError(f"ModelConfig.max_latent_size={self.max_latent_size} must be 0 or >= the "
                       f"latent grid side {self.latent_grid} (image_size={self.image_size})")
    if (self.vision_start_id is None) != (self.vision_end_id is None):
      raise ValueError("ModelConfig.vision_start_id and vision_end_id must be both set (BAGEL "
                       "image block) or both None")
    for name in ("vision_start_id", "vision_end_id"):
      v = getattr(self, name)
      if v is not None and not 0 <= v < self.vocab_size:
        raise ValueError(f"ModelConfig.{name}={v} is not a token id of the "
                         f"vocab_size={self.vocab_size} embedding table")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat_policy={self.remat_policy!r} is not one of "
                       f"{list(REMAT_POLICIES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r} is not one of "
                       f"{', '.join(ATTENTION_IMPLS)}")
    if self.attention_chunk <= 0:
      raise ValueError(f"ModelConfig.attention_chunk must be positive, got {self.attention_chunk}")
    # JSON (checkpoint metadata) gives lists: keep tuples (the config is hashed as a jit static).
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    object.__setattr__(self, "lora_experts", tuple(self.lora_experts))
    if self.lora_rank < 0:
      raise ValueError(f"ModelConfig.lora_rank must be >= 0, got {self.lora_rank}")
    if self.lora_rank:
      bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
      if bad or not self.lora_targets:
        raise ValueError(f"ModelConfig.lora_targets={list(self.lora_targets)}: each must be one "
                         f"of {list(LORA_TARGETS)}, at least one")
      bad = [e for e in self.lora_experts if e not in LORA_EXPERTS]
      if bad or not self.lora_experts:
        raise ValueError(f"ModelConfig.lora_experts={list(self.lora_experts)}: each must be one "
                         f"of {list(LORA_EXPERTS)}, at least one")
      if self.lora_alpha <= 0:
        raise ValueError(f"ModelConfig.lora_alpha must be positive, got {self.lora_alpha}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is not one of "
                         f"{sorted(_DTYPES)}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden // self.num_heads

  @property
  def latent_grid(self) -> int:
    """Side of the square grid of image tokens."""
    return self.image_size // (self.vae_downsample * self.patch_size)

  @property
  def block_markers(self) -> bool:
    """True: BAGEL's image block ``<|vision_start|> latents <|vision_end|>`` at one position."""
    return self.vision_start_id is not None

  @property
  def num_image_tokens(self) -> int:
    return self.latent_grid ** 2

  @property
  def latent_dim(self) -> int:
    """Values per image token (a patchified latent)."""
    return self.image_channels * self.patch_size ** 2

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def lora_scale(self) -> float:
    """alpha / r: the adapters' product is scaled by this (PEFT's ``scaling``)."""
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

  def lora_on(self, expert: str) -> bool:
    """Whether ``expert`` ("und" | "gen") carries adapters."""
    return self.lora_rank > 0 and expert in self.lora_experts

  def replace(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)


PRESETS = {
    # Unit tests: compiles and runs in seconds on a CPU.
    "tiny": ModelConfig(vocab_size=192, hidden=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        mlp_dim=128, image_size=16, patch_size=4),
    # The CPU default of the ShapeWorld toy world: 32x32 RGB images as 8x8 tokens of 4x4 pixels.
    "shapes": ModelConfig(vocab_size=192, hidden=128, num_layers=4, num_heads=4, num_kv_heads=2,
                          mlp_dim=384, image_size=32, patch_size=4),
    # A larger preset that still fits a 2-core CPU for benchmarks.
    "shapes_large": ModelConfig(vocab_size=192, hidden=384, num_layers=6, num_heads=6,
                                num_kv_heads=2, mlp_dim=1152, image_size=32, patch_size=4),
    # Qwen2.5-0.5B shapes (tied embeddings, no QK-norm) with MoT and FLUX-VAE latents at 512px.
    "qwen2_5_0_5b_mot": ModelConfig(vocab_size=151936, hidden=896, num_layers=24, num_heads=14,
                                    num_kv_heads=2, mlp_dim=4864, rope_theta=1e6,
                                    qk_norm=False, tie_embeddings=True, image_size=512,
                                    image_channels=16, vae_downsample=8, patch_size=2,
                                    dtype="bfloat16"),
    # BAGEL-7B-MoT: Qwen2.5-7B backbone, both experts, QK-norm, untied head, 1024px FLUX latents,
    # and BAGEL's conventions: unscaled t, a 64x64 latent_pos_embed table, and the image block
    # <|vision_start|> (151652) + latents + <|vision_end|> (151653) at one RoPE position.
    "bagel_7b_mot": ModelConfig(vocab_size=152064, hidden=3584, num_layers=28, num_heads=28,
                                num_kv_heads=4, mlp_dim=18944, rope_theta=1e6, qk_norm=True,
                                tie_embeddings=False, image_size=1024, image_channels=16,
                                vae_downsample=8, patch_size=2, timestep_scale=1.0,
                                max_latent_size=64, vision_start_id=151652,
                                vision_end_id=151653, dtype="bfloat16"),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """Returns preset ``name`` with field overrides; unknown names list the known ones."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
