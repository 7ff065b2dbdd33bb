"""The one list of config keys, with defaults. Every file in configs/ starts from ``base()``.

Values marked [paper] are UniGRPO's Table 3; [ours] are choices where the paper is silent.
"""
from __future__ import annotations

import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train (UniGRPO) | sft | eval | sample
  c.seed = 0
  c.init_checkpoint = ""  # a model directory, or package://shapes_sft for the shipped one
  c.tensorboard = True
  c.log_every = 1

  c.model = ml_collections.ConfigDict()
  c.model.preset = "shapes"  # ignored when init_checkpoint is set (its shapes win)
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.remat = False

  c.data = ml_collections.ConfigDict()
  c.data.prompt_file = ""  # optional: one prompt (or JSON {prompt, spec}) per line
  c.data.train_tasks = 100_000  # size of the ShapeWorld train split used
  c.data.eval_tasks = 64  # prompts of the held-out test split used by evaluation
  c.data.max_prompt_len = 32

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts_per_batch = 4
  c.rollout.group_size = 8  # [paper: 24]
  c.rollout.max_reasoning_len = 48
  c.rollout.temperature = 1.0  # [paper]
  c.rollout.top_k = 0
  c.rollout.top_p = 1.0
  c.rollout.num_steps = 10  # [paper: 25]
  c.rollout.shift = 3.0  # [paper]
  c.rollout.noise_level = 0.8  # [paper]
  c.rollout.window_range = (0, 5)  # [paper]
  c.rollout.window_size = 3  # [paper]
  c.rollout.sde_type = "sde"
  c.rollout.cfg_scale = 1.0  # classifier-free guidance in TRAINING rollouts: 1 = none [paper]

  c.advantage = ml_collections.ConfigDict()
  c.advantage.estimator = "grpo"  # grpo | dr_grpo | batch_std
  c.advantage.clip = 5.0  # Flow-GRPO
  c.advantage.eps = 1e-4

  c.objective = ml_collections.ConfigDict()
  c.objective.text_clip = 0.2  # [ours]
  c.objective.text_aggregation = "seq_mean"
  c.objective.text_kl_coef = 0.0  # [paper]
  c.objective.flow_clip = 1e-4  # [paper 1e-6 at 1024px / 25 steps; ours for the toy world]
  c.objective.ratio_norm = True  # GRPO-Guard RatioNorm [paper]
  c.objective.reweight_by_dt = False  # [ours]
  c.objective.flow_weight = 1.0  # lambda [paper]
  c.objective.regularizer = "velocity_mse"  # velocity_mse | latent_kl | none
  c.objective.reg_weight = 1.5e-5  # [paper]
  c.objective.stop_context_grad = True  # [ours]
  c.objective.train_text = True
  c.objective.train_image = True

  c.optim = ml_collections.ConfigDict()
  c.optim.lr_und = 1e-6  # [paper]
  c.optim.lr_gen = 3e-5  # [paper]
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 1.0
  c.optim.ppo_epochs = 2  # [paper]
  c.optim.num_minibatches = 1
  c.optim.grad_accum = 1

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.logical_rules = ()  # extra (logical, mesh axis) pairs overriding parallel's defaults

  c.rewards = ml_collections.ConfigDict({"shapeworld": 1.0})

  # Multi-process runs (unigrpo_jax/distributed.py, docs/multihost.md): '' = one process;
  # 'auto' = JAX detects the cluster (Cloud TPU VM slice); 'host:port' = process 0's address.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  c.distributed.init_timeout_s = 300  # start-up: all processes must connect within this
  c.distributed.heartbeat_timeout_s = 100  # a silent (dead) peer is declared dead after this
  c.distributed.barrier_timeout_s = 600  # a peer later than this at a sync point ends the run

  c.eval = ml_collections.ConfigDict()
  c.eval.num_steps = 20
  c.eval.cfg_scale = 1.0
  c.eval.greedy = False  # sample reasoning at the training temperature (fixed key): text RL shows
  c.eval.batch_size = 32
  c.eval.grid_rows = 8

  c.total_steps = 20
  c.eval_every = 10
  c.checkpoint_every = 10
  c.keep_checkpoints = 2
  c.async_checkpointing = True
  c.max_nonfinite_in_row = 3

  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 1500
  c.sft.batch_size = 32
  c.sft.learning_rate = 1e-3
  c.sft.warmup_steps = 100
  c.sft.weight_decay = 0.0
  c.sft.grad_clip = 1.0
  c.sft.image_loss_weight = 1.0
  c.sft.wrong_reasoning_prob = 0.3
  c.sft.layout_seed = 0  # -1: random layouts (see data/sft_examples.py)
  c.sft.save_every = 250
  return c
