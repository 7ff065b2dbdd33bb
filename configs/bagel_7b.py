"""UniGRPO on BAGEL-7B-MoT with the paper's Table 3 settings (PAPER.md section 7).

    python -m unigrpo_jax.main --config=configs/bagel_7b.py \
        --config.init_checkpoint=/path/to/BAGEL-7B-MoT --workdir=gs://BUCKET/runs/bagel_7b

``init_checkpoint`` is the downloaded BAGEL directory (``llm_config.json``, ``ema.safetensors``,
``tokenizer.json``, ``ae.safetensors``): the model is loaded with
``models.unified.loading.load_bagel`` straight into the FSDP mesh (ViT / connector skipped), the
tokenizer is the directory's, and the image block follows BAGEL's layout. Export the trained
weights back with ``models.unified.export.save_bagel``.
"""
from unigrpo_jax import config_defaults


def get_config():
  c = config_defaults.base()
  c.mode = "train"
  c.init_checkpoint = ""  # required: --config.init_checkpoint=/path/to/BAGEL-7B-MoT
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"  # f32 master weights for AdamW (28 GB bf16 -> 57 GB)
  c.model.remat = True
  c.model.image_size = 1024  # [paper] resolution
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.data.max_prompt_len = 128  # system chunk (~45 Qwen2.5 tokens) + prompt chunk + <|im_start|>
  c.rollout.prompts_per_batch = 32  # [paper] batch size
  c.rollout.group_size = 24  # [paper] G
  c.rollout.max_reasoning_len = 256
  c.rollout.temperature = 1.0  # [paper]
  c.rollout.num_steps = 25  # [paper] training denoising steps
  c.rollout.shift = 3.0  # [paper]
  c.rollout.noise_level = 0.8  # [paper] a
  c.rollout.window_range = (0, 5)  # [paper]
  c.rollout.window_size = 3  # [paper]
  c.rollout.cfg_scale = 1.0  # [paper] no CFG in training
  c.rollout.decode_rows = 1  # FLUX VAE at 1024 px: one image per device at a time (memory)
  c.objective.flow_weight = 1.0  # [paper] lambda
  c.objective.text_kl_coef = 0.0  # [paper]
  c.objective.flow_clip = 1e-6  # [paper] e_img
  # bf16: the rollout's and the train step's forwards differ by more than 1e-6 in a window
  # step's log-prob (tests/rl/test_bf16_onpolicy.py): take PPO's old log-probs from the train
  # step's own forward, or the first epoch clips those steps.
  c.objective.recompute_old_logp = True
  c.objective.regularizer = "velocity_mse"  # [paper]
  c.objective.reg_weight = 1.5e-5  # [paper]
  c.optim.lr_und = 1e-6  # [paper]
  c.optim.lr_gen = 3e-5  # [paper]
  c.optim.ppo_epochs = 2  # [paper]
  c.optim.num_minibatches = 8
  c.eval.num_steps = 50  # [paper] evaluation steps
  c.eval.batch_size = 64
  c.total_steps = 1000
  c.eval_every = 50
  c.checkpoint_every = 50
  c.log_every = 1
  return c
