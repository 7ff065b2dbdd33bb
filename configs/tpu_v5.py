"""UniGRPO on BAGEL-7B-MoT with the paper's Table 3 settings on a Cloud TPU v5p slice.

    python -m unigrpo_jax.main --config=configs/tpu_v5.py \
        --config.init_checkpoint=/path/to/BAGEL-7B-MoT --workdir=gs://BUCKET/runs/bagel_v5p
    bash launch/tpu_vm.sh create   # ACCELERATOR=v5p-128, see launch/README.md

Slice: v5p-128 (64 chips, 95 GiB HBM each). What compiles and fits there, from
``python -m unigrpo_jax.aot --config=configs/tpu_v5.py --topology=v5p-128`` on a CPU machine
(the README's "Will it fit?" table has the measured bytes per chip and compile times).

Memory plan: f32 master weights, AdamW moments and the frozen reference, all FSDP over every
chip; bf16 compute; the layer stack as one scan with full remat (only each layer's input is kept
for the backward pass); image-block attention that never materialises the [4098, S + 4098] score
matrix (splash attention on TPU); LM-head logits only at the reasoning slots. 768 rollout rows
(32 prompts x G = 24) are 12 rows per chip in the rollout and one row per chip per update
(num_minibatches = 12: 64 rows per update, 2 PPO epochs = 24 updates per UniGRPO step).

Without ``init_checkpoint`` the shapes are BAGEL's (``bagel_7b_mot`` preset, 152064-row vocab):
enough for the AOT planner, but training refuses to start (``model.require_weights``).
"""
from configs import bagel_7b


def pod_config():
  """BAGEL-7B-MoT, Table 3, laid out for a pod (shared by the v5p and v4 configs)."""
  c = bagel_7b.get_config()
  c.model.preset = "bagel_7b_mot"  # planning shapes when no weights are given
  c.model.vocab_size = 152064  # BAGEL's Qwen2.5 table
  c.model.require_weights = True
  c.model.scan_layers = True  # compile time flat in depth
  c.model.remat = True
  c.model.remat_policy = "nothing_saveable"
  c.model.attention_impl = "auto"  # splash on TPU, cuDNN on GPU, chunked on CPU
  c.mesh.data = 1
  c.mesh.fsdp = -1  # every chip: parameters, optimizer state and reference sharded 1/N
  c.mesh.tensor = 1
  c.optim.num_minibatches = 12  # 768 rows -> 64 rows per update
  return c


def get_config():
  return pod_config()
