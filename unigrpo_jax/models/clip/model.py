"""CLIP (vision ViT + text transformer + projections) in Flax NNX, numerically like HF `CLIPModel`.

Parameter names and layouts are HF's own (``vision_model.encoder.layers.0.self_attn.q_proj.weight``
with Linear weights stored [out, in], the patch conv [D, C, p, p]), so that the loader in
``models/clip/weights.py`` maps a safetensors key to the NNX path by splitting on dots and checks
shapes without any renaming table; the matmuls contract the ``in`` axis directly.

Architecture (HF ``modeling_clip``):
  vision: patch conv (no bias) -> [class token; patches] + learned positions -> pre_layrnorm ->
          N pre-LN encoder layers -> post_layernorm of the class token -> visual_projection.
  text:   token + position embeddings -> N pre-LN encoder layers with a causal (and padding)
          mask -> final_layer_norm -> pooled at the EOS token -> text_projection.
  encoder layer: x += attn(layer_norm1(x)); x += fc2(act(fc1(layer_norm2(x)))).
The EOS pooling follows HF exactly: with ``eos_token_id == 2`` (configs written before
transformers PR #24773, e.g. openai/clip-vit-large-patch14) the pooled token is the argmax of the
ids (CLIP's EOS is the largest id); otherwise the FIRST position whose id equals eos_token_id.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

# HF ACT2FN names -> functions. "gelu" is the exact (erf) GELU, the *_tanh ones the approximation.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTowerConfig:
  """One tower (text or vision). Vision-only fields are ignored by the text tower and back."""
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # text
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  eos_token_id: int = 49407
  # vision
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: CLIPTowerConfig
  vision: CLIPTowerConfig
  projection_dim: int = 512


def _zeros(*shape) -> nnx.Param:
  # Built under nnx.eval_shape by the loader: no memory is allocated for these.
  return nnx.Param(jnp.zeros(shape, jnp.float32))


class Linear(nnx.Module):
  """y = x @ weight.T (+ bias); weight [out, in] as in torch."""

  def __init__(self, d_in: int, d_out: int, bias: bool = True):
    self.weight = _zeros(d_out, d_in)
    self.bias = _zeros(d_out) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum("...i,oi->...o", x, self.weight[...], precision="highest")
    return y + self.bias[...] if self.bias is not None else y


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.eps = eps
    self.weight, self.bias = _zeros(dim), _zeros(dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]


class Embedding(nnx.Module):
  def __init__(self, num: int, dim: int):
    self.weight = _zeros(num, dim)


class Attention(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig):
    d = cfg.hidden_size
    self.num_heads = cfg.num_attention_heads
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(d, d) for _ in range(4))

  def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    """x [B, L, D]; mask bool [B, 1, L, L] (True = may attend) or None."""
    b, l, d = x.shape
    h = self.num_heads
    split = lambda t: t.reshape(b, l, h, d // h)
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / math.sqrt(d // h)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision="highest").reshape(b, l, d)
    return self.out_proj(out)


class MLP(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig):
    self.act = cfg.hidden_act
    self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
    self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class EncoderLayer(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig):
    self.self_attn = Attention(cfg)
    self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
    self.mlp = MLP(cfg)
    self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

  def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig):
    self.layers = nnx.List([EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])

  def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    for layer in self.layers:
      x = layer(x, mask)
    return x


class PatchConv(nnx.Module):
  """torch Conv2d(C, D, kernel=stride=p, bias=False): weight [D, C, p, p]."""

  def __init__(self, channels: int, dim: int, patch: int):
    self.weight = _zeros(dim, channels, patch, patch)


class VisionEmbeddings(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig):
    d, p = cfg.hidden_size, cfg.patch_size
    self.patch_size = p
    self.class_embedding = _zeros(d)
    self.patch_embedding = PatchConv(cfg.num_channels, d, p)
    self.position_embedding = Embedding(cfg.num_patches + 1, d)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels [B, S, S, C] (normalised) -> [B, 1 + (S/p)^2, D]."""
    patches = jax.lax.conv_general_dilated(
        pixels, self.patch_embedding.weight[...], (self.patch_size,) * 2, "VALID",
        dimension_numbers=("NHWC", "OIHW", "NHWC"), precision="highest")
    b, gh, gw, d = patches.shape
    cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, d))
    x = jnp.concatenate([cls, patches.reshape(b, gh * gw, d)], axis=1)
    return x + self.position_embedding.weight[...][None]


class VisionTransformer(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig):
    self.image_size = cfg.image_size
    self.embeddings = VisionEmbeddings(cfg)
    self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)  # sic: HF's name
    self.encoder = Encoder(cfg)
    self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels [B, S, S, C] -> pooled [B, D] (post-LN class token)."""
    if pixels.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"CLIP vision expects {self.image_size}x{self.image_size} pixels, got "
                       f"{pixels.shape[1]}x{pixels.shape[2]}")
    x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), None)
    return self.post_layernorm(x[:, 0])


class TextEmbeddings(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig):
    self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
    self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size)


def eos_positions(ids: jax.Array, eos_token_id: int) -> jax.Array:
  """ids int [B, L] -> int [B]: the position HF pools at (see the module docstring)."""
  if eos_token_id == 2:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax(ids == eos_token_id, axis=-1)  # first match


class TextTransformer(nnx.Module):
  def __init__(self, cfg: CLIPTowerConfig):
    self.eos_token_id = cfg.eos_token_id
    self.max_len = cfg.max_position_embeddings
    self.embeddings = TextEmbeddings(cfg)
    self.encoder = Encoder(cfg)
    self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

  def __call__(self, ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """ids int [B, L] (L <= max_position_embeddings), attention_mask [B, L] (1 = token)
    -> pooled [B, D] at the EOS position."""
    b, l = ids.shape
    if l > self.max_len:
      raise ValueError(f"CLIP text takes at most {self.max_len} tokens, got {l}")
    x = (jnp.take(self.embeddings.token_embedding.weight[...], ids, axis=0)
         + self.embeddings.position_embedding.weight[...][:l][None])
    mask = jnp.tril(jnp.ones((l, l), bool))[None, None]  # [1, 1, L, L]
    if attention_mask is not None:
      mask = mask & (attention_mask[:, None, None, :] > 0)
    x = self.final_layer_norm(self.encoder(x, mask))
    return x[jnp.arange(b), eos_positions(ids, self.eos_token_id)]


class CLIPModel(nnx.Module):
  """HF-named CLIP; build it with ``weights.load_clip`` (this constructor makes zeros)."""

  def __init__(self, cfg: CLIPConfig):
    self.config = cfg
    self.vision_model = VisionTransformer(cfg.vision)
    self.text_model = TextTransformer(cfg.text)
    self.visual_projection = Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
    self.text_projection = Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
    self.logit_scale = nnx.Param(jnp.zeros((), jnp.float32))  # log of the temperature

  def image_features(self, pixels: jax.Array) -> jax.Array:
    """pixels [B, S, S, 3] normalised -> [B, P] (unnormalised, as HF get_image_features)."""
    return self.visual_projection(self.vision_model(pixels))

  def text_features(self, ids: jax.Array, attention_mask: Optional[jax.Array] = None
                    ) -> jax.Array:
    """ids [B, L] -> [B, P] (unnormalised, as HF get_text_features)."""
    return self.text_projection(self.text_model(ids, attention_mask))


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / ||x||_2 over the last axis (HF divides by the norm without an epsilon)."""
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def logits_per_image(model: CLIPModel, image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
  """[Bi, P], [Bt, P] unnormalised -> [Bi, Bt] = exp(logit_scale) * cos, as HF's CLIPModel."""
  cos = jnp.einsum("ip,tp->it", l2_normalize(image_emb), l2_normalize(text_emb),
                   precision="highest")
  return jnp.exp(model.logit_scale[...]) * cos
