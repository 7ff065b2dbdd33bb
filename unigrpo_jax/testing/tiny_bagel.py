"""Random BAGEL-format directories for tests, smoke runs and load benchmarks.

``write_tiny_bagel_dir(path)`` writes what ``load_bagel`` and ``QwenTokenizer`` read from a real
``BAGEL-7B-MoT`` download, at any size: ``ema.safetensors`` (BAGEL's key names and layouts, the
two experts drawn independently, a few ViT / connector tensors that the loader skips),
``llm_config.json`` and a small Qwen2-style ``tokenizer.json`` whose vocabulary is smaller than
the embedding table (as 151665 vs 152064 in the real model), and a random FLUX-format
``ae.safetensors`` (written by ``flux_vae.write_random_flux_ae``) with FLUX's image geometry
(16 latent channels, 8x down, so 2x2 patches give 64-wide tokens) but narrow layers: every width
is 32, so FLUX's GroupNorm(32) holds and ``load_flux_vae`` loads it with its defaults.

    python -m unigrpo_jax.testing.tiny_bagel /tmp/bagel_tiny            # seconds, ~1 MB
    python -m unigrpo_jax.testing.tiny_bagel /tmp/bagel_1b --size 1b    # ~1.0e9 params, 2 GB bf16
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from flax import nnx

from unigrpo_jax.data.qwen_tokenizer import (GEN_THINK_SYSTEM_PROMPT, SPECIAL_TOKENS, build_qwen2_style_tokenizer)
from unigrpo_jax.models.unified.config import ModelConfig
from unigrpo_jax.testing.flux_vae_fixture import write_random_flux_ae
from unigrpo_jax.models.unified.latent_io import bagel_sincos_table
from unigrpo_jax.models.unified.weights import bagel_key_map, bagel_llm_config, their_shape
from unigrpo_jax.models.safetensors_io import numpy_dtype, write_file
from unigrpo_jax.models.unified.model import abstract_model

# Text shapes of the generated directories (the image side is BAGEL's: 16-ch FLUX latents, 2x2).
SIZES = {
    "tiny": dict(hidden=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=160, vocab=384),
    "1b": dict(hidden=2048, num_layers=10, num_heads=16, num_kv_heads=4, mlp_dim=5504,
               vocab=32768),
}
# The tiny FLUX VAE: 4 levels (8x down) of width 32 (= FLUX's GroupNorm groups), one res block
# per level, 16 latent channels. ~0.4M params: decoding a 64 px image is milliseconds on CPU.
TINY_AE = dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16)
_CORPUS = [GEN_THINK_SYSTEM_PROMPT,
           "a photo of a red apple on a wooden table", "two blue cats sitting under a green tree",
           "a yellow bus parked next to a white house", "the planning process: draw the sky first",
           "three black dogs and one orange ball, 4k, photorealistic!"]


def tiny_bagel_config(size: str = "tiny", *, image_size: int = 64, max_latent_size: int = 8,
                      tokenizer_vocab: int = 0) -> ModelConfig:
  """The ModelConfig ``write_tiny_bagel_dir`` writes (markers: the tokenizer's last two ids)."""
  s = SIZES[size]
  vs = tokenizer_vocab - 2 if tokenizer_vocab else s["vocab"] - 2
  return ModelConfig(vocab_size=s["vocab"], hidden=s["hidden"], num_layers=s["num_layers"],
                     num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"],
                     mlp_dim=s["mlp_dim"], rope_theta=1e6, rms_eps=1e-6, qk_norm=True,
                     tie_embeddings=False, mot=True, image_size=image_size, image_channels=16,
                     vae_downsample=8, patch_size=2, timestep_scale=1.0,
                     max_latent_size=max_latent_size, vision_start_id=vs, vision_end_id=vs + 1)


def _random_tensor(rng, key: str, shape: tuple, kind: str, cfg: ModelConfig) -> np.ndarray:
  if key.endswith("latent_pos_embed.pos_embed"):
    return bagel_sincos_table(cfg.max_latent_size, cfg.hidden)  # what BAGEL stores
  if "norm" in key:
    return 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
  if key.endswith(".bias"):
    return 0.02 * rng.standard_normal(shape, np.float32)
  fan_in = shape[0] if kind == "copy" else shape[-1]  # embeddings: rows; Linear [out, in]: in
  return rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)


def write_tiny_bagel_dir(path: str, *, size: str = "tiny", image_size: int = 64,
                         max_latent_size: int = 8, seed: int = 0, dtype: str = "bfloat16",
                         with_vit: bool = True, with_ae: bool = True) -> ModelConfig:
  """Writes a random BAGEL-format directory; returns the ModelConfig it loads as.

  Args:
    size: a key of ``SIZES`` ("tiny": 0.3M params; "1b": 1.0e9).
    image_size / max_latent_size: pixels of the training images and the position table side
      (BAGEL: 1024 / 64); image_size <= 16 * max_latent_size.
    dtype: of the stored tensors (BAGEL's are bfloat16).
    with_vit: also write a few ViT / connector tensors (which the loader must skip).
    with_ae: also write ``ae.safetensors`` (a random FLUX VAE of shape ``TINY_AE``; float32).
  """
  os.makedirs(path, exist_ok=True)
  tok = build_qwen2_style_tokenizer(_CORPUS, vocab_size=300)
  tok.save(os.path.join(path, "tokenizer.json"))
  n_tok = tok.get_vocab_size(with_added_tokens=True)
  cfg = tiny_bagel_config(size, image_size=image_size, max_latent_size=max_latent_size,
                          tokenizer_vocab=n_tok)
  assert tok.token_to_id(SPECIAL_TOKENS["vision_start"]) == cfg.vision_start_id
  if n_tok > cfg.vocab_size:
    raise ValueError(f"tokenizer has {n_tok} ids, more than the {cfg.vocab_size} embedding rows")
  abstract = nnx.state(abstract_model(cfg))
  shapes = {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(abstract)}
  rng = np.random.default_rng(seed)
  target = numpy_dtype(dtype)
  tensors = {}
  for our, key, kind in bagel_key_map(cfg):
    shape = their_shape(kind, shapes[our])
    tensors[key] = _random_tensor(rng, key, shape, kind, cfg).astype(target)
  if with_vit:
    vit = {"vit_model.vision_model.embeddings.patch_embedding.weight": (32, 588),
           "vit_model.vision_model.post_layernorm.weight": (32,),
           "connector.fc1.weight": (cfg.hidden, 32), "connector.fc1.bias": (cfg.hidden,),
           "vit_pos_embed.pos_embed": (16, cfg.hidden)}
    for key, shape in vit.items():
      tensors[key] = (0.02 * rng.standard_normal(shape, np.float32)).astype(target)
  write_file(os.path.join(path, "ema.safetensors"), tensors, metadata={"format": "pt"})
  if with_ae:
    write_random_flux_ae(os.path.join(path, "ae.safetensors"), seed=seed + 1, **TINY_AE)
  conf = bagel_llm_config(cfg)
  with open(os.path.join(path, "llm_config.json"), "w") as f:
    json.dump(conf, f, indent=2)
  return cfg


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("path")
  parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--max_latent_size", type=int, default=8)
  parser.add_argument("--dtype", default="bfloat16")
  args = parser.parse_args(argv)
  cfg = write_tiny_bagel_dir(args.path, size=args.size, image_size=args.image_size,
                             max_latent_size=args.max_latent_size, dtype=args.dtype)
  from unigrpo_jax.models.unified.model import count_params
  n = count_params(abstract_model(cfg))
  print(f"wrote {args.path}: {n / 1e6:.1f}M params, "
        f"{os.path.getsize(os.path.join(args.path, 'ema.safetensors')) / 1e9:.3f} GB ema",
        file=sys.stderr)


if __name__ == "__main__":
  main()
