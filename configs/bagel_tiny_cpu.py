"""CPU smoke run of the real-model path: 2 UniGRPO steps on a tiny random BAGEL directory.

Exercises what ``configs/bagel_7b.py`` runs on BAGEL-7B-MoT, at toy size: ``load_bagel``
(BAGEL key names, MoT experts), the directory's Qwen2-style ``tokenizer.json``, the FLUX VAE
``ae.safetensors`` decoding 16-channel latents (2x2 patches, 64-wide tokens) to pixels, free-text
prompt files, and a pixel reward (JPEG size). The weights are random: the run checks plumbing and
on-policy consistency (``train/onpolicy/*``), not learning. Two commands:

    python -m unigrpo_jax.testing.tiny_bagel /tmp/bagel_tiny
    python -m unigrpo_jax.main --config=configs/bagel_tiny_cpu.py \
        --config.init_checkpoint=/tmp/bagel_tiny --workdir=/tmp/runs/bagel_tiny_cpu
"""
import os

import ml_collections

from unigrpo_jax import config_defaults

_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


def get_config():
  c = config_defaults.base()
  c.mode = "train"
  c.init_checkpoint = ""  # required: the directory written by python -m ...models.tiny_bagel
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.image_size = 64  # tiny_bagel's default: 64 px -> 8x8 latents -> 16 tokens of 64
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.data.prompt_file = os.path.join(_PROMPTS, "smoke_train.txt")
  c.data.eval_prompt_file = os.path.join(_PROMPTS, "smoke_eval.txt")  # disjoint from train
  c.data.max_prompt_len = 160  # the tiny 300-word tokenizer spends ~120 ids on system + prompt
  c.rewards = ml_collections.ConfigDict({"jpeg_incompressibility": 1.0})
  c.rollout.prompts_per_batch = 2
  c.rollout.group_size = 4
  c.rollout.max_reasoning_len = 8
  c.rollout.num_steps = 4
  c.rollout.window_range = (0, 2)
  c.rollout.window_size = 1
  c.optim.lr_und = 1e-5
  c.optim.lr_gen = 1e-5
  c.optim.ppo_epochs = 1
  c.optim.num_minibatches = 1
  c.eval.num_steps = 4
  c.eval.batch_size = 2
  c.eval.grid_rows = 1
  c.total_steps = 2
  c.eval_every = 2
  c.checkpoint_every = 2
  c.log_every = 1
  return c
