"""The embedded default: UniGRPO on ShapeWorld, from the shipped SFT warm start, on a CPU.

python -m unigrpo_jax.main --config=configs/shapes_cpu.py --workdir=runs/shapes_cpu
"""
from unigrpo_jax import config_defaults


def get_config():
  c = config_defaults.base()
  c.mode = "train"
  c.init_checkpoint = "package://shapes_sft"
  c.rollout.prompts_per_batch = 8
  c.rollout.group_size = 8
  c.rollout.num_steps = 10
  # The toy model is ~1M params per expert: it moves with far larger steps than BAGEL-7B.
  c.optim.lr_und = 3e-5
  c.optim.lr_gen = 3e-5  # [paper]
  # One x_1 per group: a group's image spread then comes from the SDE window's actions, which
  # the loss can credit, not from initial noise it cannot (docs/results.md, "Where a group's
  # reward spread comes from").
  c.rollout.group_initial_noise = True
  c.objective.flow_clip = 1e-3
  c.objective.reg_weight = 1.5e-5
  # 100 steps fit the 10-minute budget on 2 cores (about 3 s a step); 512 held-out prompts make
  # the eval's sampling noise (about 0.013 standard error) small against a 0.05 gain.
  c.total_steps = 100
  c.eval_every = 25
  c.checkpoint_every = 25
  c.data.eval_tasks = 512
  return c
