"""Planning only: BAGEL-7B-MoT shapes with the paper's Table 3 batch on a v5p slice, random init.

For ``python -m unigrpo_jax.aot`` (what compiles and fits), not for training: the BAGEL weight
importer and the FLUX VAE are not wired in yet, so ``main`` would train a random model with the
ShapeWorld tokenizer. The vocabulary is BAGEL's (152064), prompts are 64 tokens, reasoning 256.

python -m unigrpo_jax.aot --config=configs/tpu_bagel_plan.py --topology=v5p-128
python -m unigrpo_jax.aot --config=configs/tpu_bagel_plan.py --config.model.num_layers=4 \\
    --topology=v5p-128    # 7x cheaper compile; per-layer bytes extrapolate linearly
"""
from unigrpo_jax import config_defaults


def get_config():
  c = config_defaults.base()
  c.mode = "train"
  c.model.preset = "bagel_7b_mot"
  c.model.vocab_size = 152064  # BAGEL's Qwen2.5 table
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = True
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.data.max_prompt_len = 64
  c.rollout.prompts_per_batch = 32  # [paper]
  c.rollout.group_size = 24  # [paper]
  c.rollout.max_reasoning_len = 256
  c.rollout.num_steps = 25  # [paper]
  c.rollout.shift = 3.0  # [paper]
  c.rollout.window_range = (0, 5)  # [paper]
  c.rollout.window_size = 3  # [paper]
  c.rollout.noise_level = 0.8  # [paper]
  c.optim.ppo_epochs = 2  # [paper]
  c.optim.num_minibatches = 12  # 768 rows -> 64 rows (one per v5p-128 chip) per update
  c.optim.lr_und = 1e-6  # [paper]
  c.optim.lr_gen = 3e-5  # [paper]
  c.objective.flow_clip = 1e-6  # [paper]
  c.objective.reg_weight = 1.5e-5  # [paper]
  c.eval.num_steps = 50
  c.total_steps = 1000
  return c
