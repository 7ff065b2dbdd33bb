"""Throughput of the in-process CLIP reward (rewards/clip.py) on this machine's default devices.

  python -m benchmarks.clip_reward --model=tiny --image_px=256 --batch=32
  python -m benchmarks.clip_reward --model=vit_b16 --image_px=1024 --batch=8 --out=/tmp/x.json

`tiny` is the test fixture (tests/fixtures/clip_tiny, 32 px crop); the other presets are random
weights of a real architecture written once to --cache_dir as an HF CLIPModel directory (numpy +
safetensors, no torch), with the fixture's tokenizer (only the text vocabulary differs, which
does not change the cost). Timed: CLIPScorer.cosine on `batch` uint8 images of image_px^2 and
`batch` distinct prompts (so preprocessing, both towers and the host transfer), after one
warm-up call that compiles. Prints and writes a JSON row.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, os.pardir, "tests", "fixtures", "clip_tiny")

# (vision hidden, layers, heads, mlp, patch, image), (text hidden, layers, heads, mlp), projection
PRESETS = {
    "vit_b16": ((768, 12, 12, 3072, 16, 224), (512, 12, 8, 2048), 512),
    "vit_l14": ((1024, 24, 16, 4096, 14, 224), (768, 12, 12, 3072), 768),
    "vit_h14": ((1280, 32, 16, 5120, 14, 224), (1024, 24, 16, 4096), 1024),  # PickScore_v1
}


def write_random_clip(name: str, directory: str, seed: int = 0) -> str:
  """An HF CLIPModel directory with random weights of preset `name` (skipped if present)."""
  from safetensors.numpy import save_file

  from unigrpo_jax.models.clip.weights import abstract_model, read_config
  if os.path.isfile(os.path.join(directory, "model.safetensors")):
    return directory
  (vd, vl, vh, vm, patch, image), (td, tl, th, tm), proj = PRESETS[name]
  os.makedirs(directory, exist_ok=True)
  for f in ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(FIXTURE, f), directory)
  eos = json.load(open(os.path.join(FIXTURE, "config.json")))["text_config"]["eos_token_id"]
  config = {"model_type": "clip", "projection_dim": proj,
            "text_config": dict(hidden_size=td, num_hidden_layers=tl, num_attention_heads=th,
                                intermediate_size=tm, eos_token_id=eos, hidden_act="gelu"),
            "vision_config": dict(hidden_size=vd, num_hidden_layers=vl, num_attention_heads=vh,
                                  intermediate_size=vm, patch_size=patch, image_size=image,
                                  hidden_act="gelu")}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  rng = np.random.default_rng(seed)
  tensors = {}
  for path, var in abstract_model(read_config(directory))[1]:
    key = ".".join(map(str, path))
    shape = tuple(var.shape)
    if key == "logit_scale":
      tensors[key] = np.asarray(np.log(100.0), np.float32)
    elif "norm" in key and key.endswith("weight"):
      tensors[key] = np.ones(shape, np.float32)
    else:
      tensors[key] = (0.02 * rng.standard_normal(shape, np.float32))
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  return directory


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="tiny", choices=["tiny", *PRESETS])
  ap.add_argument("--image_px", type=int, default=256)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--cache_dir", default="/tmp/clip_bench_models")
  ap.add_argument("--out", default="/tmp/clip_reward_bench.json")
  args = ap.parse_args()

  import jax

  from unigrpo_jax.rewards.clip import CLIPScorer
  directory = FIXTURE if args.model == "tiny" else write_random_clip(
      args.model, os.path.join(args.cache_dir, args.model))
  t0 = time.perf_counter()
  scorer = CLIPScorer(directory, batch_size=args.batch)
  load_s = time.perf_counter() - t0
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, args.image_px, args.image_px, 3), np.uint8)
  prompts = [f"a photo of {i} red circles above a blue square" for i in range(args.batch)]
  t0 = time.perf_counter()
  scorer.cosine(images, prompts)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.iters):
    t0 = time.perf_counter()
    cos = scorer.cosine(images, prompts)
    times.append(time.perf_counter() - t0)
  assert np.isfinite(cos).all()
  best = min(times)
  row = {"model": args.model, "image_px": args.image_px, "batch": args.batch,
         "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
         "load_s": round(load_s, 2), "first_call_s": round(compile_s, 2),
         "best_call_s": round(best, 4), "median_call_s": round(float(np.median(times)), 4),
         "images_per_s": round(args.batch / best, 2), "ms_per_image": round(1e3 * best /
                                                                          args.batch, 2)}
  print(json.dumps(row))
  with open(args.out, "a") as f:
    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
