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
  c.optim.lr_gen = 1e-5
  c.objective.flow_clip = 1e-3
  c.objective.reg_weight = 1.5e-5
  c.total_steps = 60
  c.eval_every = 20
  c.checkpoint_every = 20
  c.data.eval_tasks = 128
  return c
