"""A small UniGRPO config for the multi-process tests (tests/integration/test_multihost.py): the shipped
ShapeWorld warm start (so rewards and losses are not all zero), 2 prompts x 4 rows over a
(data=2, tensor=4) mesh of 8 devices: with two processes each process holds one data shard (one
prompt's group) and the gradients cross processes.

python -m unigrpo_jax.main --config=tests/multihost_small.py --workdir=DIR
"""
from unigrpo_jax import config_defaults


def get_config():
  c = config_defaults.base()
  c.init_checkpoint = "package://shapes_sft"
  c.tensorboard = False
  c.mesh.data = 2
  c.mesh.tensor = 4
  c.async_checkpointing = False
  c.data.train_tasks = 64
  c.data.eval_tasks = 4
  c.rollout.prompts_per_batch = 2
  c.rollout.group_size = 4
  c.rollout.max_reasoning_len = 24
  c.rollout.num_steps = 6
  c.rollout.window_range = (0, 3)
  c.rollout.window_size = 2
  # The embedded default's learning rates (configs/shapes_cpu.py), as the comparison asks.
  c.optim.lr_und = 3e-5
  c.optim.lr_gen = 1e-5
  c.eval.batch_size = 4
  c.eval.num_steps = 3
  c.eval.grid_rows = 1
  c.total_steps = 2
  c.eval_every = 100
  c.checkpoint_every = 1
  return c
