"""The UniGRPO rollout: prompt -> reasoning (AR) -> image (flow SDE window), one jitted function.

Per call: prefill each prompt once and repeat its cache G times (group members share the prompt
context but not their randomness), decode the reasoning, append ``<vision_start>``, then denoise
one image block per row against that fixed context (computed once; the denoiser never writes the
cache). No CFG in training (docs/method.md §2). The cache slot layout is
``trajectory.context_layout``'s, so the train step's packed forward recomputes the same log-probs.

``make_eval_sampler`` is the evaluation variant: ODE only, more steps, optional CFG.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unigrpo_jax import parallel
from unigrpo_jax.models.unified import attention
from unigrpo_jax.models.autoencoder import Autoencoder
from unigrpo_jax.models.unified.kv_cache import KVCache
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.rollout import flow
from unigrpo_jax.rollout import text
from unigrpo_jax.rollout.trajectory import Trajectory, WindowRecord


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
  """Static knobs of a rollout (defaults: docs/method.md §7).

  group_size: G rows per prompt. max_reasoning_len: T reasoning slots. temperature / top_k /
  top_p / vocab_limit: text sampling (top_k 0, top_p 1 and vocab_limit 0 disable; see
  ``distribution``; the train step's ObjectiveConfig must get the same values).
  num_steps / shift: flow time grid.
  noise_level: SDE ``a``. window_range / window_size: the stochastic window lies in steps
  [lo, hi); its start is drawn per row (or per group with window_per_group). sde_type: "sde"|"cps".
  """
  group_size: int
  max_reasoning_len: int
  stop_id: int
  pad_id: int
  vision_start_id: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  vocab_limit: int = 0
  num_steps: int = 25
  shift: float = 3.0
  noise_level: float = 0.8
  window_range: tuple = (0, 5)
  window_size: int = 3
  window_per_group: bool = False  # [ours] share one window start across a group's rows
  # [ours, after DanceGRPO] one initial noise x_1 per group: a group's images then differ only
  # through the SDE window's actions (and the traces), which is what the image advantage credits
  group_initial_noise: bool = False
  sde_type: str = "sde"
  # Images decoded per device at a time (0: all rows at once). A FLUX VAE decoding 12 rows of
  # 1024 px per chip at once needs ~36 GB of activations; one row per step needs ~1/12 of that.
  decode_rows: int = 0
  # Chips per row group of the decode loop (``text.DecodeLayout``): -1 picks the largest of 8,
  # 4, 2 that divides the heads, the KV heads and the devices (``parallel.auto_decode_tensor``);
  # 0 or 1 keeps the trainer's layout (every chip computes a slice of every row's contractions).
  decode_tensor: int = -1
  # Each denoising step's model call in this many sequential row chunks per chip (1: all rows
  # at once). The call's activations scale with the rows: 24 rows of 1024 px per chip need
  # ~20 GB for BAGEL; chunks of 4 a sixth of that, for the same FLOPs.
  denoise_chunks: int = 1
  # First attention window of the decode loop (``text.attention_windows``): each window is one
  # more copy of the unrolled layer stack in the compiled program; 0 decodes in one loop over
  # the whole cache (fewer copies to compile, every step reads all P + T slots).
  decode_min_window: int = text.MIN_WINDOW

  def __post_init__(self):
    def bad(name, why):
      raise ValueError(f"RolloutConfig.{name}={getattr(self, name)!r}: {why}")
    for name in ("group_size", "max_reasoning_len", "num_steps", "window_size"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        bad(name, "must be an int >= 1")
    for name in ("stop_id", "pad_id", "vision_start_id"):
      if getattr(self, name) < 0:
        bad(name, "must be >= 0")
    if not self.temperature > 0:
      bad("temperature", "must be > 0")
    if self.top_k < 0:
      bad("top_k", "must be >= 0")
    if not 0 < self.top_p <= 1:
      bad("top_p", "must be in (0, 1]")
    if not isinstance(self.vocab_limit, int) or self.vocab_limit < 0:
      bad("vocab_limit", "must be an int >= 0 (0 = the whole embedding table)")
    if self.vocab_limit and self.stop_id >= self.vocab_limit:
      bad("vocab_limit", f"must exceed stop_id={self.stop_id} (else the reasoning never stops)")
    if not self.shift > 0:
      bad("shift", "must be > 0")
    if not self.noise_level > 0:
      bad("noise_level", "must be > 0 (the window steps need a Gaussian with std > 0)")
    if self.sde_type not in ("sde", "cps"):
      bad("sde_type", "must be 'sde' or 'cps'")
    if len(self.window_range) != 2:
      bad("window_range", "must be (lo, hi)")
    lo, hi = self.window_range
    if not (isinstance(lo, int) and isinstance(hi, int)) or lo < 0 or hi > self.num_steps:
      bad("window_range", f"must be ints with 0 <= lo and hi <= num_steps={self.num_steps}")
    if hi - lo < self.window_size:
      bad("window_size", f"does not fit in window_range={self.window_range}")
    if not isinstance(self.decode_rows, int) or self.decode_rows < 0:
      bad("decode_rows", "must be an int >= 0 (0: decode all rows at once)")
    if not isinstance(self.denoise_chunks, int) or self.denoise_chunks < 1:
      bad("denoise_chunks", "must be an int >= 1 (1: every row in one call)")
    if not isinstance(self.decode_min_window, int) or self.decode_min_window < 0:
      bad("decode_min_window", "must be an int >= 0 (0: one decode loop over the whole cache)")
    if not isinstance(self.decode_tensor, int) or self.decode_tensor < -1:
      bad("decode_tensor", "must be an int >= -1 (-1: automatic, 0 or 1: the trainer's layout)")
    if self.sde_type == "cps" and hi == self.num_steps:
      # CPS has std 0 at t_next = 0: a window over the last step would have an undefined logp.
      bad("window_range", "with sde_type='cps' the window must not include the last step")

  @property
  def sampling(self) -> text.SamplingConfig:
    return text.SamplingConfig(max_len=self.max_reasoning_len, stop_id=self.stop_id,
                               pad_id=self.pad_id, temperature=self.temperature,
                               top_k=self.top_k, top_p=self.top_p,
                               vocab_limit=self.vocab_limit)


class RowChunks:
  """Splits [B, ...] row arrays into ``chunks`` sequential pieces such that every chip keeps
  its own rows: chunk c holds rows [c*m, (c+1)*m) of each chip's block of B / S rows (S = the
  mesh's batch parallelism, m = B / (S * chunks)), so running the pieces one after another
  (``lax.map``) moves no row between chips."""

  def __init__(self, batch: int, chunks: int, mesh: Optional[Mesh]):
    self.shards = parallel.batch_parallelism(mesh) if mesh is not None else 1
    if batch % (self.shards * chunks):
      raise ValueError(f"rollout.denoise_chunks={chunks}: {batch} rows over {self.shards} "
                       f"batch shards do not split into {chunks} chunks per shard")
    self.batch, self.chunks, self.mesh = batch, chunks, mesh
    self.per = batch // (self.shards * chunks)

  def split(self, tree):
    """[B, ...] leaves -> [chunks, B / chunks, ...]."""
    def one(x):
      rest = x.shape[1:]
      x = x.reshape((self.shards, self.chunks, self.per) + rest).swapaxes(0, 1)
      x = x.reshape((self.chunks, self.shards * self.per) + rest)
      if self.mesh is None:
        return x
      return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(
          None, parallel.BATCH_AXES)))
    return jax.tree.map(one, tree)

  def merge(self, x):
    """[chunks, B / chunks, ...] -> [B, ...] (inverse of ``split``)."""
    rest = x.shape[2:]
    x = x.reshape((self.chunks, self.shards, self.per) + rest).swapaxes(0, 1)
    return x.reshape((self.batch,) + rest)


def _repeat_rows(tree, g: int):
  """Repeats every row g times (rows of a group contiguous): an array or a KVCache (every
  leaf of which, per-layer k/v buffers and validity, has the batch on axis 0)."""
  return jax.tree.map(lambda a: jnp.repeat(a, g, axis=0), tree)


def shard_rows(tree, mesh: Optional[Mesh]):
  """Constrains every row-major array of ``tree`` (a KVCache's per-layer buffers included: rows
  on axis 0) to be split over the mesh's batch axes, so each chip computes only its rows. A no-op without a mesh or when the
  rows do not divide evenly (then XLA chooses)."""
  if mesh is None:
    return tree
  n = parallel.batch_parallelism(mesh)

  def one(x):
    if x.shape[0] % n:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(
        parallel.BATCH_AXES)))

  return jax.tree.map(one, tree)


def decode_layout(mesh: Optional[Mesh], rows: int, model_cfg,
                  decode_tensor: int = -1) -> Optional[text.DecodeLayout]:
  """The decode loop's layout on ``mesh`` (``RolloutConfig.decode_tensor``), None: the mesh's."""
  if mesh is None:
    return None
  if decode_tensor == -1:
    decode_tensor = parallel.auto_decode_tensor(mesh, rows, model_cfg.num_heads,
                                                model_cfg.num_kv_heads)
  return text.DecodeLayout.build(mesh, decode_tensor)


def reasoning_context(model: UnifiedModel, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                      key: jax.Array, sampling: text.SamplingConfig, vision_start_id: int,
                      group_size: int = 1, mesh: Optional[Mesh] = None,
                      decode_tensor: int = -1, min_window: int = text.MIN_WINDOW):
  """Prefill once per prompt, repeat G times, decode reasoning, append ``<vision_start>``.

  Args: prompt_tokens / prompt_mask [Bp, P]; mesh: if given, the B rows are split over its
  batch axes after the repeat (``shard_rows``), and the decode loop runs in
  ``decode_layout(mesh, B, ..., decode_tensor)``; min_window: ``text.decode``'s first
  attention window. Returns (TextSample of B = Bp * G rows whose cache holds the whole
  [B, P + T + 1] context, image_position [B] int32).
  """
  p, t = prompt_tokens.shape[1], sampling.max_len
  prompt_mask = prompt_mask.astype(bool)
  cache, last_logits = text.prefill(model, prompt_tokens, prompt_mask, p + t + 1)
  cache, last_logits, prompt_mask = (shard_rows(_repeat_rows(a, group_size), mesh)
                                     for a in (cache, last_logits, prompt_mask))
  layout = decode_layout(mesh, prompt_mask.shape[0], model.cfg, decode_tensor)
  sample = text.decode(model, cache, last_logits, prompt_mask, key, sampling,
                       min_window=min_window, layout=layout)
  if layout is not None:  # back to the trainer's rows (the image blocks run there)
    sample = shard_rows(sample, mesh)
  vs_pos = (jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)
            + jnp.sum(sample.mask, axis=1, dtype=jnp.int32))
  if model.cfg.block_markers:  # BAGEL: the model puts the markers in the block at p + r
    return sample, vs_pos
  cache = text.append_token(model, sample.cache, vision_start_id, p + t, vs_pos)
  return sample.replace(cache=cache), vs_pos + 1


# An autoencoder with weights (the FLUX VAE: ``.state``) gets them as an argument of the jitted
# rollout, so a 335 MB VAE is not baked into the executable as constants; a weightless one (the
# pixel PatchAutoencoder) passes None and compiles exactly as before.
def _decode(autoencoder: Autoencoder, latents: jax.Array, ae_state) -> jax.Array:
  """latents [B, N, Dl] -> images [B, H, W, C], with ``ae_state`` as the weights if any."""
  if ae_state is None:
    return autoencoder.decode(latents)
  return autoencoder.decode(latents, state=ae_state)


def decode_in_steps(autoencoder: Autoencoder, latents: jax.Array, ae_state, rows: int,
                    mesh: Optional[Mesh]) -> jax.Array:
  """``_decode`` of latents [B, N, Dl] with at most ``rows`` images per device at a time.

  The B rows are split as the mesh splits them (``groups`` = the mesh's batch parallelism, each
  device holding B / groups contiguous rows); step s of a ``lax.map`` decodes rows
  ``s * rows .. (s + 1) * rows`` of every device's block, so each device only ever holds
  ``rows`` images' activations and no row moves between devices. ``rows`` 0, or one that does
  not divide the block, decodes everything at once. Returns images [B, H, W, C].
  """
  b = latents.shape[0]
  groups = parallel.batch_parallelism(mesh) if mesh is not None else 1
  if rows <= 0 or b % groups or (b // groups) % rows or b // groups == rows:
    return _decode(autoencoder, latents, ae_state)
  steps = b // groups // rows
  x = jnp.swapaxes(latents.reshape(groups, steps, rows, *latents.shape[1:]), 0, 1)

  def one(chunk):  # [groups, rows, N, Dl] -> [groups * rows, H, W, C]
    flat = shard_rows(chunk.reshape(groups * rows, *chunk.shape[2:]), mesh)
    return shard_rows(_decode(autoencoder, flat, ae_state), mesh)

  images = jax.lax.map(one, x)  # [steps, groups * rows, H, W, C]
  images = images.reshape(steps, groups, rows, *images.shape[2:])
  return jnp.swapaxes(images, 0, 1).reshape(b, *images.shape[3:])


class _BoundLowered:
  def __init__(self, lowered, ae_state):
    self.lowered, self.ae_state = lowered, ae_state

  def compile(self, *args, **kwargs) -> "_BoundCompiled":
    return _BoundCompiled(self.lowered.compile(*args, **kwargs), self.ae_state)

  def __getattr__(self, name):  # as_text(), cost_analysis(), ...
    return getattr(self.lowered, name)


class _BoundCompiled:
  """A compiled rollout called as ``fn(state, *args)``; memory/cost analysis pass through."""

  def __init__(self, compiled, ae_state):
    self.compiled, self.ae_state = compiled, ae_state

  def __call__(self, state, *args):
    return self.compiled(state, self.ae_state, *args)

  def __getattr__(self, name):  # memory_analysis(), cost_analysis(), as_text(), ...
    return getattr(self.compiled, name)


class _BoundAutoencoderWeights:
  """``jitted(state, ae_state, *args)`` called as ``fn(state, *args)`` (and ``fn.lower(...)``)."""

  def __init__(self, jitted, ae_state):
    self.jitted, self.ae_state = jitted, ae_state

  def __call__(self, state, *args):
    return self.jitted(state, self.ae_state, *args)

  def lower(self, state, *args) -> _BoundLowered:
    return _BoundLowered(self.jitted.lower(state, self.ae_state, *args), self.ae_state)

  def __getattr__(self, name):   # the rest of the jitted function's API (e.g. _cache_size)
    return getattr(self.jitted, name)


def _bind_autoencoder_weights(jitted, autoencoder: Autoencoder) -> _BoundAutoencoderWeights:
  return _BoundAutoencoderWeights(jitted, getattr(autoencoder, "state", None))


def make_rollout(graphdef: nnx.GraphDef, cfg: RolloutConfig, autoencoder: Autoencoder,
                 compiler_options: dict | None = None, *, mesh: Optional[Mesh] = None):
  """Builds the jitted rollout.

  Returns ``fn(state, prompt_tokens [Bp, P], prompt_mask [Bp, P], key) -> Trajectory`` with
  B = Bp * group_size rows (each prompt's G rows contiguous). ``state`` is the model's nnx.State.
  compiler_options: passed to ``jax.jit`` (e.g. a low XLA optimisation level for CPU tests).
  mesh: the rows (and their KV cache, decode loop and denoising) are split over its batch axes
  and the Trajectory comes out in ``parallel.batch_sharding``; without it XLA is free to compute
  every row on every chip (it did: 184 GB of temporaries per chip for BAGEL on v5p-128). The
  inputs keep the shardings they arrive with (``parallel.rows_sharding`` for the prompts).
  """
  grid = flow.timesteps(cfg.num_steps, cfg.shift)

  def rollout(state, ae_state, prompt_tokens, prompt_mask, key):
    model = nnx.merge(graphdef, state)
    mcfg = model.cfg
    k_text, k_window, k_noise, k_flow = jax.random.split(key, 4)
    sample, image_pos = reasoning_context(model, prompt_tokens, prompt_mask, k_text,
                                          cfg.sampling, cfg.vision_start_id, cfg.group_size,
                                          mesh, cfg.decode_tensor, cfg.decode_min_window)
    b = image_pos.shape[0]
    ctx = sample.cache

    if cfg.denoise_chunks == 1:
      def velocity_fn(x, t):
        return model(latents=x, times=t, image_position=image_pos, cache=ctx).velocity
    else:  # the same call, ``denoise_chunks`` row chunks per chip one after another
      chunks = RowChunks(b, cfg.denoise_chunks, mesh)
      ctx_chunks, pos_chunks = chunks.split((ctx, image_pos))  # split once, read every step

      def velocity_fn(x, t):
        def one(args):
          x_c, t_c, pos_c, ctx_c = args
          return model(latents=x_c, times=t_c, image_position=pos_c, cache=ctx_c).velocity
        return chunks.merge(jax.lax.map(one, (*chunks.split((x, t)), pos_chunks, ctx_chunks)))

    starts = flow.random_window_start(
        k_window, b, tuple(cfg.window_range), cfg.window_size,
        group_size=cfg.group_size if cfg.window_per_group else None)
    if cfg.group_initial_noise:  # [Bp, N, D] repeated over each group's rows
      noise = _repeat_rows(jax.random.normal(
          k_noise, (b // cfg.group_size, mcfg.num_image_tokens, mcfg.latent_dim), jnp.float32),
          cfg.group_size)
    else:
      noise = jax.random.normal(k_noise, (b, mcfg.num_image_tokens, mcfg.latent_dim),
                                jnp.float32)
    starts, noise = shard_rows((starts, noise), mesh)
    fs = flow.sample_flow(velocity_fn, noise, grid, k_flow, noise_level=cfg.noise_level,
                          sde_window=(starts, cfg.window_size), sde_type=cfg.sde_type)
    window = WindowRecord(x_t=fs.x_t, x_next=fs.x_next, mean=fs.mean, std=fs.std, t=fs.t,
                          t_next=fs.t_next, logp=fs.logp, step_index=fs.step_index)
    images = jnp.clip(decode_in_steps(autoencoder, fs.x0, ae_state, cfg.decode_rows, mesh),
                      -1.0, 1.0)
    return Trajectory(
        prompt_tokens=_repeat_rows(prompt_tokens.astype(jnp.int32), cfg.group_size),
        prompt_mask=_repeat_rows(prompt_mask.astype(bool), cfg.group_size),
        reasoning_tokens=sample.tokens, reasoning_mask=sample.mask, reasoning_logp=sample.logp,
        truncated=sample.truncated, window=window, latents=fs.x0, images=images)

  out_sh = None if mesh is None else parallel.batch_sharding(mesh)
  return _bind_autoencoder_weights(
      jax.jit(attention.traced_on(rollout, mesh), out_shardings=out_sh,
              compiler_options=compiler_options), autoencoder)


@flax.struct.dataclass
class EvalSample:
  """reasoning_tokens / reasoning_mask [B, T]; latents [B, N, Dl]; images [B, H, W, C] in
  [-1, 1]."""
  reasoning_tokens: jax.Array
  reasoning_mask: jax.Array
  latents: jax.Array
  images: jax.Array


def make_eval_sampler(graphdef: nnx.GraphDef, cfg: RolloutConfig, autoencoder: Autoencoder, *,
                      num_steps: int = 50, shift: float | None = None, cfg_scale: float = 1.0,
                      greedy_text: bool = False, samples_per_prompt: int = 1,
                      compiler_options: dict | None = None, mesh: Optional[Mesh] = None):
  """Evaluation sampler (never used in training): deterministic Euler ODE, optional CFG.

  CFG: ``v = v_u + cfg_scale * (v_c - v_u)``; the unconditional context is the ``<vision_start>``
  token alone (position 0, image at position 1), i.e. neither prompt nor reasoning, like a
  text-dropped condition (BAGEL-format models: no context at all, the block at position 0).
  ``cfg_scale == 1`` skips the unconditional pass. Text knobs come from
  ``cfg`` (``greedy_text`` switches to argmax). mesh: the model's mesh, for TPU attention
  kernels (``attention.traced_on``) and the VAE decode's per-device steps.

  Returns ``fn(state, prompt_tokens [Bp, P], prompt_mask [Bp, P], key) -> EvalSample`` of
  Bp * samples_per_prompt rows (each prompt's rows contiguous). compiler_options: as
  ``make_rollout``.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  grid = flow.timesteps(num_steps, cfg.shift if shift is None else shift)
  sampling = dataclasses.replace(cfg.sampling, greedy=greedy_text)
  use_cfg = cfg_scale != 1.0

  def sample(state, ae_state, prompt_tokens, prompt_mask, key):
    model = nnx.merge(graphdef, state)
    mcfg = model.cfg
    k_text, k_noise, k_flow = jax.random.split(key, 3)
    txt, image_pos = reasoning_context(model, prompt_tokens, prompt_mask, k_text, sampling,
                                       cfg.vision_start_id, samples_per_prompt)
    b = image_pos.shape[0]
    ctx = txt.cache
    if use_cfg and mcfg.block_markers:  # BAGEL: an empty context, the block at position 0
      uncond, uncond_pos = KVCache.zeros(mcfg, b, 1), jnp.zeros((b,), jnp.int32)
    elif use_cfg:
      uncond = text.append_token(model, KVCache.zeros(mcfg, b, 1), cfg.vision_start_id, 0,
                                 jnp.zeros((b,), jnp.int32))
      uncond_pos = jnp.ones((b,), jnp.int32)

    def velocity_fn(x, t):
      v = model(latents=x, times=t, image_position=image_pos, cache=ctx).velocity
      if not use_cfg:
        return v
      v_u = model(latents=x, times=t, image_position=uncond_pos, cache=uncond).velocity
      return v_u + cfg_scale * (v - v_u)

    noise = jax.random.normal(k_noise, (b, mcfg.num_image_tokens, mcfg.latent_dim), jnp.float32)
    fs = flow.sample_flow(velocity_fn, noise, grid, k_flow, noise_level=0.0, sde_window=(0, 0))
    images = jnp.clip(decode_in_steps(autoencoder, fs.x0, ae_state, cfg.decode_rows, mesh),
                      -1.0, 1.0)
    return EvalSample(txt.tokens, txt.mask, fs.x0, images)

  return _bind_autoencoder_weights(
      jax.jit(attention.traced_on(sample, mesh), compiler_options=compiler_options), autoencoder)
