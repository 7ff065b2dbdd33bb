"""UniGRPO on a Cloud TPU v5 pod slice: the ShapeWorld world at pod scale.

The larger `shapes_large` model in bfloat16, FSDP over all chips, the paper's group size and
denoising schedule: a pod smoke test that needs no weights. BAGEL-7B-MoT on a pod is
``configs/tpu_v5.py``.

python -m unigrpo_jax.main --config=configs/tpu_v5_shapes.py --workdir=gs://BUCKET/runs/v5_shapes
"""
from unigrpo_jax import config_defaults


def get_config():
  c = config_defaults.base()
  c.mode = "train"
  c.model.preset = "shapes_large"
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.rollout.prompts_per_batch = 32  # [paper]
  c.rollout.group_size = 24  # [paper]
  c.rollout.num_steps = 25  # [paper]
  c.optim.num_minibatches = 4
  c.optim.lr_und = 1e-5
  c.optim.lr_gen = 3e-5
  c.objective.flow_clip = 1e-4
  c.eval.num_steps = 50  # [paper]
  c.data.eval_tasks = 512
  c.eval.batch_size = 128
  c.total_steps = 2000
  c.eval_every = 100
  c.checkpoint_every = 100
  c.log_every = 10
  return c
