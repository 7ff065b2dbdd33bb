"""What the image policy gets wrong: a grid of rollout images that fail the strict check.

Runs the trainer's own rollout from a checkpoint on training prompts at a low text temperature
(so nearly every trace names the right scene and a failure is the image's), and writes the
first 48 failing images (8 per row, in rollout order: a group's rows sit side by side) with
what the reward's detector found in each. Used for docs/results.md ("Why the first-stage warm
start gives the image policy no signal").

  python benchmarks/image_failures.py --out=failures.png \\
      [--config.init_checkpoint=runs/sft/model] [--batches=4]
"""
from __future__ import annotations

import collections
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from unigrpo_jax import config_validation
from unigrpo_jax.data.encoding import encode_prompts
from unigrpo_jax.data.pipeline import ShapeWorldSource
from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.models.autoencoder import to_uint8
from unigrpo_jax.rewards import shapeworld as sw_reward
from unigrpo_jax.trainers import build

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes_cpu.py",
                                         "Config file; override keys with --config.key=value.")
_BATCHES = flags.DEFINE_integer("batches", 4, "Prompt batches to roll out.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.05, "Text sampling temperature.")
_OUT = flags.DEFINE_string("out", "failures.png", "Where to write the grid.")
_MAX = 48


def main(argv):
  del argv
  config = _CONFIG.value
  config.rollout.temperature = _TEMPERATURE.value
  try:
    config_validation.validate(config)
  except config_validation.ConfigError as e:
    sys.exit(f"error: bad config: {e}")
  tokenizer, params, rcfg, rollout = build.standalone_rollout(config)
  source = ShapeWorldSource("train", config.data.train_tasks)
  rng = np.random.default_rng(0)
  p, g = config.rollout.prompts_per_batch, rcfg.group_size
  counts, fails = collections.Counter(), []
  for b in range(_BATCHES.value):
    records = [source[int(i)] for i in rng.choice(len(source), p, replace=False)]
    tokens, mask = encode_prompts(tokenizer, [r["prompt"] for r in records],
                                  config.data.max_prompt_len)
    traj = rollout(params, tokens, mask, jax.random.key(b))
    images = np.asarray(to_uint8(traj.images))
    specs = [sw.Spec.from_json(r["spec"]) for r in records for _ in range(g)]
    for image, spec in zip(images, specs):
      counts["images"] += 1
      if sw_reward.score_one(image, spec)["strict"] >= 1:
        continue
      counts["fail"] += 1
      found = collections.Counter(d["shape"] for d in sw_reward.detect(image))
      if len(fails) < _MAX:
        fails.append(image)
        print(f"{len(fails) - 1:2d} wanted: {sw.describe(spec)}; detected: {dict(found)}")
  print(f"{counts['fail']} of {counts['images']} images fail the strict check")
  if not fails:
    return
  h, w = fails[0].shape[:2]
  rows = -(-len(fails) // 8)
  grid = np.zeros((rows * (h + 2), 8 * (w + 2), 3), np.uint8)
  for k, image in enumerate(fails):
    r, c = divmod(k, 8)
    grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = image
  Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
      _OUT.value, optimize=True)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
