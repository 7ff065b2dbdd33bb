"""UniGRPO on BAGEL-7B-MoT with the paper's Table 3 settings on a Cloud TPU v5e (v5litepod) slice.

    python -m unigrpo_jax.main --config=configs/tpu_v5e.py \
        --config.init_checkpoint=/path/to/BAGEL-7B-MoT --workdir=gs://BUCKET/runs/bagel_v5e

Slice: v5e-128 (128 chips, 15.75 GiB HBM each), the smallest v5e slice the planner found to fit
(``python -m unigrpo_jax.aot --config=configs/tpu_v5e.py --topology=v5e-128``: train step 13.75
GB per chip, rollout 5.75 GB). On 64 chips the train step needs 18.35 GB per chip (the v5p-128
compile of the same sharding), more than a v5e chip's 16.9 GB. Same model and memory plan as
``configs/tpu_v5.py``; 6 minibatches of 128 rows (one row per chip per update).
"""
from configs import tpu_v5


def get_config():
  c = tpu_v5.pod_config()
  c.optim.num_minibatches = 6  # 768 rows -> 128 rows per update: one per v5e-128 chip
  return c
