"""The config of tests/integration/test_multihost_eval.py: ``tests/multihost_small.py`` with
held-out free-text evaluation prompts (no ShapeWorld spec: the run's reward scores them) and a
reward that logs every row it scores to ``$UNIGRPO_SCORED_DIR/scored_<process>.jsonl``.

python -m unigrpo_jax.main --config=tests/integration/multihost_eval_config.py --workdir=DIR
(with tests/ on PYTHONPATH and UNIGRPO_SCORED_DIR set)
"""
import json
import os

import numpy as np

from unigrpo_jax.rewards import registry

import multihost_small

# Word salads of the ShapeWorld vocabulary: encodable, and in no split (held out).
EVAL_PROMPTS = ("red red red", "blue blue blue", "green circle green", "square purple square",
                "circle circle triangle", "triangle yellow yellow")


def prompt_reward(prompt: str) -> float:
  """What the counting reward gives a prompt (so the test knows every eval metric)."""
  return len(prompt) / 100.0


@registry.register("counting_prompt_length")
def counting_prompt_length(images, specs, reasoning_texts=None, prompts=None):
  import jax
  del images, reasoning_texts
  path = os.path.join(os.environ["UNIGRPO_SCORED_DIR"], f"scored_{jax.process_index()}.jsonl")
  with open(path, "a") as f:
    f.write(json.dumps({"process": jax.process_index(), "prompts": list(prompts)}) + "\n")
  return {"reward": np.array([prompt_reward(p) for p in prompts], np.float32)[:len(specs)]}


def get_config():
  c = multihost_small.get_config()
  eval_file = os.path.join(os.environ["UNIGRPO_SCORED_DIR"], "eval_prompts.jsonl")
  with open(eval_file, "w") as f:
    for i, p in enumerate(EVAL_PROMPTS):
      f.write(json.dumps({"prompt": p, "metadata": {"n": i}, "category": f"c{i % 2}"}) + "\n")
  c.data.eval_prompt_file = eval_file
  c.rewards = {"counting_prompt_length": 1.0}
  c.total_steps = 1  # evaluations at step 0 and step 1
  return c
