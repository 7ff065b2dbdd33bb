"""Supervised warm-start examples: (prompt, reasoning trace, image) triples from ShapeWorld.

The warm start should reason correctly most of the time but not always, so RL has headroom on
the text side: with probability ``wrong_reasoning_prob`` the trace's final scene is replaced by a
nearby wrong scene (one count, color or relation changed) and the image is drawn from that WRONG
scene. Reasoning and image stay consistent with each other (the image follows the reasoning, as
in the real model); only the reward, scored against the prompt, sees the mistake.

With probability ``wrong_image_prob`` the image is instead drawn from a nearby wrong scene while
the trace stays as it is: the image-side analogue of the wrong traces [ours]. A warm start trained
so draws the scene its trace names most of the time but not always, which gives the image policy
mistakes that its own sampling can avoid (issue #22: with images that always follow the trace, a
group's images pass or fail together and the image policy gets no signal).

``layout_seed`` fixes the render seed, so an image is a deterministic function of its scene (the
layout then depends only on the counts and relation). A tiny flow model learns that nearly
unimodal target in minutes, where random layouts leave it drawing a blur of every layout at once
[ours]. RL's SDE noise still explores other layouts.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.data.pipeline import task_for
from unigrpo_jax.data.shapeworld.render import render


def corrupt_spec(spec: sw.Spec, rng: np.random.Generator) -> sw.Spec:
  """A valid spec that differs from ``spec`` in one count, color or relation."""
  for _ in range(50):
    objs = list(spec.objects)
    i = int(rng.integers(len(objs)))
    kind = rng.choice(["count", "color", "relation"])
    try:
      if kind == "count":
        objs[i] = dataclasses.replace(objs[i], count=int(rng.integers(1, sw.MAX_COUNT + 1)))
        new = sw.Spec(tuple(objs), spec.relation)
      elif kind == "color":
        objs[i] = dataclasses.replace(objs[i], color=str(rng.choice(list(sw.COLORS))))
        new = sw.Spec(tuple(objs), spec.relation)
      else:
        if spec.relation is None:
          continue
        new = sw.Spec(tuple(objs), str(rng.choice(sw.RELATIONS)))
    except ValueError:  # e.g. too many objects in total
      continue
    if new != spec:
      return new
  return spec


def with_scene(reasoning: str, spec: sw.Spec) -> str:
  """Replaces the final canonical scene clause of a trace by ``spec``'s."""
  head = reasoning.rsplit(sw.SCENE_PREFIX, 1)[0]
  return f"{head}{sw.SCENE_PREFIX} {sw.describe(spec)}".strip()


@dataclasses.dataclass
class SFTBatch:
  prompts: list[str]
  reasoning: list[str]
  images: np.ndarray  # uint8 [B, H, W, 3], drawn from the (possibly corrupted) reasoning
  correct: np.ndarray  # bool [B], the trace resolves the prompt correctly
  image_follows_trace: np.ndarray  # bool [B], the image is drawn from the trace's scene


def sample_sft_batch(rng: np.random.Generator, batch_size: int, image_size: int,
                     wrong_reasoning_prob: float, num_train_tasks: Optional[int] = None,
                     layout_seed: Optional[int] = None,
                     wrong_image_prob: float = 0.0) -> SFTBatch:
  """Draws tasks from the TRAIN split only (the test split is never trained on)."""
  prompts, traces, images, correct, follows = [], [], [], [], []
  for _ in range(batch_size):
    index = int(rng.integers(num_train_tasks or 2 ** 31 - 1))
    task = task_for("train", index)
    spec = task.spec
    if rng.random() < wrong_reasoning_prob:
      spec = corrupt_spec(spec, rng)
    prompts.append(task.prompt)
    traces.append(with_scene(task.reasoning, spec))
    seed = int(rng.integers(2 ** 31 - 1)) if layout_seed is None else layout_seed
    drawn = spec
    if wrong_image_prob and rng.random() < wrong_image_prob:
      drawn = corrupt_spec(spec, rng)
    images.append(render(drawn, seed=seed, size=image_size))
    correct.append(spec == task.spec)
    follows.append(drawn == spec)
  return SFTBatch(prompts, traces, np.stack(images), np.array(correct), np.array(follows))
