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
  c.verbose_logs = False  # True: library INFO logs on the console too (always in workdir/log.txt)

  c.model = ml_collections.ConfigDict()
  c.model.preset = "shapes"  # ignored when init_checkpoint is set (its shapes win)
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.remat = False
  c.model.remat_policy = "nothing_saveable"  # with remat: what the backward keeps (ModelConfig)
  c.model.scan_layers = False  # the layer stack as one lax.scan: compile time flat in depth
  # Image-block attention: auto (splash on TPU, cuDNN on GPU, chunked on CPU) | xla (dense) |
  # chunked | splash | cudnn; chunked/splash never hold a whole [N, S + N] score matrix.
  c.model.attention_impl = "auto"
  c.model.attention_chunk = 512  # query rows per chunk of the chunked path
  # True (pod configs of real models): training refuses to start without init_checkpoint; the
  # preset's shapes are then for the AOT planner only.
  c.model.require_weights = False
  c.model.image_size = 1024  # BAGEL directories only: training resolution (<= 16 * 64 px)
  c.model.vocab_size = 0  # 0: the tokenizer's; larger: the preset's real table (AOT planning)
  c.model.num_layers = 0  # 0: the preset's; fewer: cheaper AOT compiles to extrapolate from
  # LoRA (models/unified/lora.py): rank 0 = full fine-tuning. With rank > 0 only float32
  # adapters on the named projections of the named experts train; the base is frozen (and is the
  # velocity-MSE / KL reference); run checkpoints hold adapters + optimizer state only.
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0
  c.model.lora.alpha = 16.0
  c.model.lora.targets = "q,k,v,o,gate,up,down"
  c.model.lora.experts = "und,gen"
  c.model.lora.adapters = ""  # a PEFT adapter directory (save_lora's) to start from

  c.data = ml_collections.ConfigDict()
  c.data.prompt_file = ""  # optional: one prompt (or JSON {prompt, spec}) per line
  c.data.train_tasks = 100_000  # size of the ShapeWorld train split used
  c.data.eval_tasks = 64  # prompts of the held-out test split used by evaluation
  # optional: evaluation prompts (prompt_file's format) instead of the ShapeWorld test split;
  # training refuses to start if any of them is also a training prompt
  c.data.eval_prompt_file = ""
  c.data.max_prompt_len = 32

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts_per_batch = 4
  c.rollout.group_size = 8  # [paper: 24]
  c.rollout.max_reasoning_len = 48
  c.rollout.temperature = 1.0  # [paper]
  c.rollout.top_k = 0
  c.rollout.top_p = 1.0
  # Ids >= vocab_limit are never sampled nor scored. -1: the tokenizer's vocabulary size (the
  # shipped warm start's table has 192 rows for 78 words); 0: the whole embedding table.
  c.rollout.vocab_limit = -1
  c.rollout.num_steps = 10  # [paper: 25]
  c.rollout.shift = 3.0  # [paper]
  c.rollout.noise_level = 0.8  # [paper]
  c.rollout.window_range = (0, 5)  # [paper]
  c.rollout.window_size = 3  # [paper]
  c.rollout.window_per_group = False  # [ours] one window start per group instead of per row
  # Chips per row group of the decode loop (rollout/text.py DecodeLayout): -1 automatic (the
  # largest of 8, 4, 2 dividing the heads, KV heads and devices); 0 or 1: the trainer's layout.
  c.rollout.decode_tensor = -1
  c.rollout.group_initial_noise = False  # [ours, after DanceGRPO] one x_1 per group (program.py)
  c.rollout.sde_type = "sde"
  # images the VAE decodes per device at a time (0: all at once); BAGEL's 1024 px FLUX VAE: 1
  c.rollout.decode_rows = 0
  # each denoising step's model call in this many row chunks per chip (memory, same FLOPs)
  c.rollout.denoise_chunks = 1
  # first attention window of the decode loop, in cache slots (rollout/text.py); 0: one window
  c.rollout.decode_min_window = 128
  # Training rollouts use no classifier-free guidance [paper]; only 1.0 is accepted (the key is
  # kept so that setting it fails loudly; evaluation's guidance is eval.cfg_scale).
  c.rollout.cfg_scale = 1.0

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
  # one rematerialised train forward per window block: 1/K of the activations, +1 forward each
  c.objective.separate_window_blocks = False
  # PPO's old log-probs from the train step's own forward before any update (bf16: the rollout's
  # cached forward differs from it by more than a 1e-6 flow clip), one extra forward per step
  c.objective.recompute_old_logp = False
  c.objective.train_text = True
  c.objective.train_image = True

  c.optim = ml_collections.ConfigDict()
  c.optim.lr_und = 1e-6  # [paper]
  c.optim.lr_gen = 3e-5  # [paper]
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8  # Adam epsilon (both experts)
  c.optim.grad_clip = 1.0
  c.optim.ppo_epochs = 2  # [paper]
  c.optim.num_minibatches = 1
  c.optim.grad_accum = 1

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.logical_rules = ()  # extra (logical, mesh axis) pairs overriding parallel's defaults

  # name -> weight. Any registered reward or remote_rewards entry; --config.rewards.NAME=W adds
  # one from the command line (main.py). See docs/rewards.md.
  c.rewards = ml_collections.ConfigDict({"shapeworld": 1.0})
  # Models of the in-process CLIP rewards (rewards/clip.py; docs/clip_rewards.md). *_dir: an HF
  # CLIPModel directory; *_processor_dir: its tokenizer.json + preprocessor_config.json when they
  # live elsewhere (PickScore_v1 uses laion/CLIP-ViT-H-14-laion2B-s32B-b79K's); "" = *_dir.
  c.reward_models = ml_collections.ConfigDict()
  c.reward_models.pickscore_dir = ""
  c.reward_models.pickscore_processor_dir = ""
  c.reward_models.clip_dir = ""
  c.reward_models.clip_processor_dir = ""
  c.reward_models.batch_size = 32  # images per jitted reward call
  # Rewards served over HTTP, one entry per reward name (keys: remote_reward_defaults below).
  c.remote_rewards = ml_collections.ConfigDict()
  c.remote_rewards.vlm_judge = remote_reward_defaults("vlm_judge")  # needs .url and .model
  c.remote_rewards.geneval = remote_reward_defaults("geneval")  # needs .url (a GenEval-detector server)

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
  # [ours] images drawn from a wrong scene while the trace is kept (sft_examples.py)
  c.sft.wrong_image_prob = 0.0
  c.sft.layout_seed = 0  # -1: random layouts (see data/shapeworld/sft_examples.py)
  c.sft.save_every = 250
  return c


# ------------------------------------------------------------------ remote rewards
REMOTE_REWARD_KINDS = ("protocol", "geneval", "vlm_judge")
VLM_JUDGE_TEMPLATE = (
    "You are judging an AI-generated image against its prompt.\n"
    "Prompt: \"{prompt}\"\n"
    "Rate how faithfully and how well the image depicts the prompt on a scale from 0 to 10. "
    "Answer with one line of the form 'Score: N' and nothing else.")
VLM_JUDGE_PATTERN = r"(?i)\bscore\s*[:=]\s*(-?\d+(?:\.\d+)?)"


def remote_reward_defaults(kind: str = "protocol") -> ml_collections.ConfigDict:
  """The keys of one ``config.remote_rewards.<name>`` entry, with defaults (the client is
  ``rewards/remote/client.py``)."""
  if kind not in REMOTE_REWARD_KINDS:
    raise ValueError(f"remote reward kind {kind!r} is not one of {REMOTE_REWARD_KINDS}")
  e = ml_collections.ConfigDict()
  e.kind = kind
  e.url = ""  # e.g. http://10.0.0.5:8000/score; required when the reward has a weight
  e.token_env = ""  # name of an env var holding a bearer token; "" = no Authorization header
  e.timeout_s = 120.0  # per request
  e.total_timeout_s = 600.0  # per chunk, all attempts and backoffs together; <= 0: no limit
  e.retries = 3  # extra attempts after a connection error, timeout or 5xx
  e.backoff_s = 1.0  # wait before retry k is backoff_s * 2**k
  e.chunk_size = 16  # images per request (vlm_judge: always 1)
  e.max_in_flight = 4  # concurrent requests
  e.max_response_bytes = 1 << 20
  if kind == "vlm_judge":  # the OpenAI-compatible judge (rewards/remote/vlm_judge.py)
    e.model = ""  # the served model name the endpoint expects, e.g. Qwen/Qwen2.5-VL-7B-Instruct
    e.template = VLM_JUDGE_TEMPLATE  # must contain {prompt}
    e.score_pattern = VLM_JUDGE_PATTERN  # regex; group 1 is the score
    e.score_min = 0.0
    e.score_max = 10.0
    e.max_tokens = 64
    e.max_failed_fraction = 0.1  # unparsable replies tolerated per batch
  return e
