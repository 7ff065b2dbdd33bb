"""UniGRPO on BAGEL-7B-MoT on ONE Cloud TPU VM host (v5e-8, v6e-8, v4-8, v5p-8) with LoRA.

    python -m unigrpo_jax.main --config=configs/bagel_lora_1host.py \
        --config.init_checkpoint=/path/to/BAGEL-7B-MoT --workdir=gs://BUCKET/runs/bagel_lora

What fits, from ``python -m unigrpo_jax.aot --config=configs/bagel_lora_1host.py --topology=T``
on a CPU machine: the README's "Will it fit?" table (one row per host type).

Memory plan: the 14.16 B base weights frozen in bf16 (28.3 GB over the host's chips, FSDP), and
float32 LoRA adapters (rank 32, alpha 64, every projection of both experts; ~0.3 % of the
weights) with their AdamW moments: the only trained state. The velocity-MSE reference is the
base with the adapters off, not a second copy; a run checkpoint holds adapters, optimizer state
and data position only. The paper's Table 3 image and group settings (1024 px, 25 steps,
window 3, G = 24), 8 prompts a step (192 rows); updates of 32 rows in micro-batches of 8
(one row per chip on 8-chip hosts), so activations are those of one row per chip.
"""
from configs import tpu_v5


def get_config():
  c = tpu_v5.pod_config()
  c.model.param_dtype = "bfloat16"  # the frozen base: 28.3 GB in bf16
  c.model.lora.rank = 32
  c.model.lora.alpha = 64.0
  c.model.lora.targets = "q,k,v,o,gate,up,down"
  c.model.lora.experts = "und,gen"
  c.rollout.prompts_per_batch = 8  # 8 x G = 192 rows a step
  # One decode loop over the whole 384-slot cache instead of two attention windows: the loop
  # runs unrolled over the 28 layers, so each window is another copy of them to compile
  # (v5p-8 rollout: 235 -> 225 CPU-seconds of XLA compile); attending over up to 126 unused
  # slots for the first 130 tokens is noise next to streaming the weights every step.
  c.rollout.decode_min_window = 0
  c.rollout.denoise_chunks = 6  # 24 (8 chips) or 48 (4 chips) rows per chip: 6 calls of 4 or 8
  # One rematerialised forward per window block in the train step: one block's activations per
  # chip (3 x 4096 image tokens at once need ~7 GB more on a 16 GB v5e chip).
  c.objective.separate_window_blocks = True
  # The LM head [3584, 152064] split by vocabulary over the chips instead of by width: the text
  # logits then move 1/8 of the head's rows' activations instead of all-gathering the whole
  # 1.09 GB head (bf16) for every use in the train step (8 such copies on a v5e-8).
  c.logical_rules = (("head_embed", None), ("head_vocab", "fsdp"))
  c.optim.num_minibatches = 6  # 32 rows per update, 2 PPO epochs = 12 updates a step
  c.optim.grad_accum = 4  # micro-batches of 8 rows
  # Adapters take larger steps than full fine-tuning (flow_grpo trains its LoRA at 3e-4): 10x
  # the paper's full-model rates (1e-6 text, 3e-5 image). Untuned on the real model.
  c.optim.lr_und = 1e-5
  c.optim.lr_gen = 3e-4
  return c
