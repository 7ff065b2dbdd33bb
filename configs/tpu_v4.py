"""UniGRPO on BAGEL-7B-MoT with the paper's Table 3 settings on a Cloud TPU v4 slice.

    python -m unigrpo_jax.main --config=configs/tpu_v4.py \
        --config.init_checkpoint=/path/to/BAGEL-7B-MoT --workdir=gs://BUCKET/runs/bagel_v4

Slice: v4-128 (64 chips, 32 GiB HBM each). Same model, batch and memory plan as
``configs/tpu_v5.py``; checked with
``python -m unigrpo_jax.aot --config=configs/tpu_v4.py --topology=v4-128``.
"""
from configs import tpu_v5


def get_config():
  return tpu_v5.pod_config()
