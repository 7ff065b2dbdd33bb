"""Autoregressive text sampler over the unified model's KV cache.

Prefill writes the left-padded prompt into cache slots ``[0, P)``; decode writes reasoning token t
at slot ``P + t`` with position ``p + t`` (p = the row's real prompt length); ``append_token``
writes ``<vision_start>`` at slot ``P + T`` with position ``p + r``. This is exactly
``trajectory.context_layout``, so the train step's packed forward sees the same context.

Everything is a pure function of arrays (a merged nnx module is only read, never mutated), so the
functions can be called inside one jitted rollout; ``make_text_sampler`` is a standalone jitted
prefill + decode over ``(graphdef, state)``, ``make_prefill_decode`` the same as two jitted calls
(the decode one takes the cache donated).

The cache is never copied while decoding: each decode step's layers write the new token's
key/value into their own cache buffer in place and attend over it (``UnifiedModel`` with
``cache_slot``), so a step costs the cache's read and one slot's write per layer, not a copy.

On a mesh the rollout decodes in a ``DecodeLayout``: rows over groups of chips, the weights a
step reads split Megatron-style inside a group (resharded once per call), so a step moves only
its group's rows' activations (docs/aot.md, "The decode layout").
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
from unigrpo_jax.models.unified import layout as layer_layout
from unigrpo_jax.models.unified.kv_cache import KVCache
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.rollout import distribution
from unigrpo_jax.rollout.trajectory import prompt_positions


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  """Static sampling knobs (hashable: part of the compiled function, not of its inputs).

  max_len: T, reasoning slots. temperature > 0; top_k = 0 disables; top_p = 1 disables;
  vocab_limit: ids >= it are never sampled (0 = the whole table). The distribution these define
  is ``distribution.masked_logits`` (the train step rescores with the same function).
  greedy: argmax over ids < vocab_limit; the recorded logp is then the temperature-1 log-prob
  over those ids (no top-k / top-p).
  """
  max_len: int
  stop_id: int
  pad_id: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  vocab_limit: int = 0
  greedy: bool = False

  def __post_init__(self):
    if self.max_len < 1:
      raise ValueError(f"SamplingConfig.max_len must be >= 1, got {self.max_len}")
    distribution.check_knobs("SamplingConfig", temperature=self.temperature, top_k=self.top_k,
                             top_p=self.top_p, vocab_limit=self.vocab_limit)
    for name in ("stop_id", "pad_id"):
      if getattr(self, name) < 0:
        raise ValueError(f"SamplingConfig.{name} must be >= 0, got {getattr(self, name)}")
    if self.vocab_limit and self.stop_id >= self.vocab_limit:
      raise ValueError(f"SamplingConfig.stop_id={self.stop_id} is >= vocab_limit="
                       f"{self.vocab_limit}: the stop token could never be sampled")


@flax.struct.dataclass
class DecodeState:
  """Loop state of ``decode``.

  tokens / logp / mask: [B, T] outputs so far (pad / 0 / False beyond the current step);
  done: [B] row has emitted the stop token; step: [] int32; cache: the context so far;
  logits: [B, V] float32 next-token logits; prompt_len: [B] int32; key: base PRNG key.
  """
  tokens: jax.Array
  logp: jax.Array
  mask: jax.Array
  done: jax.Array
  step: jax.Array
  cache: KVCache
  logits: jax.Array
  prompt_len: jax.Array
  key: jax.Array


@flax.struct.dataclass
class TextSample:
  """tokens [B, T] int32 (pad after the stop token), logp [B, T] float32 (0 where invalid),
  mask [B, T] bool (valid incl. the stop token), truncated [B] bool (no stop within T),
  cache: prompt + reasoning written (invalid slots after each row's stop)."""
  tokens: jax.Array
  logp: jax.Array
  mask: jax.Array
  truncated: jax.Array
  cache: KVCache


def prefill(model: UnifiedModel, prompt_tokens: jax.Array, prompt_mask: jax.Array,
            cache_len: int) -> tuple[KVCache, jax.Array]:
  """Runs the left-padded prompt and caches it.

  Args:
    prompt_tokens, prompt_mask: [B, P] int / bool, left-padded (the last slot is always real).
    cache_len: static total slots S >= P (normally P + T + 1).
  Returns:
    (cache with slots [0, P) written, last_logits [B, V] float32 predicting reasoning token 0).
  """
  b, p = prompt_tokens.shape
  prompt_mask = prompt_mask.astype(bool)
  if cache_len < p:
    raise ValueError(f"cache_len={cache_len} is shorter than the prompt ({p} slots)")
  # Only the last slot's logits are needed: the LM head runs on that slot alone.
  out = model(prompt_tokens, prompt_positions(prompt_mask), prompt_mask, logits_slice=(p - 1, 1))
  cache = KVCache.zeros(model.cfg, b, cache_len).write(out.text_k, out.text_v, 0, prompt_mask)
  return cache, out.logits[:, 0]


def select_token(logits: jax.Array, key: jax.Array,
                 cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """Samples one token per row: logits [B, V] -> (token [B] int32, logp [B] float32).

  logp is the log-prob under the distribution actually sampled from,
  ``distribution.sampling_log_probs`` (the train step's ``token_logprobs`` scores with the same
  function); for greedy, the temperature-1 log-prob over the ids below ``vocab_limit``.
  """
  if cfg.greedy:
    masked = distribution.masked_logits(logits, vocab_limit=cfg.vocab_limit)
    tok = jnp.argmax(masked, axis=-1).astype(jnp.int32)
  else:
    masked = distribution.masked_logits(logits, temperature=cfg.temperature, top_k=cfg.top_k,
                                        top_p=cfg.top_p, vocab_limit=cfg.vocab_limit)
    tok = jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)
  logp = jax.nn.log_softmax(masked, axis=-1)
  return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def init_decode_state(cache: KVCache, last_logits: jax.Array, prompt_mask: jax.Array,
                      key: jax.Array, cfg: SamplingConfig) -> DecodeState:
  """Empty outputs [B, T] after a prefill of ``prompt_mask`` [B, P]."""
  b, p = prompt_mask.shape
  if cache.length < p + cfg.max_len:
    raise ValueError(f"cache has {cache.length} slots, needs >= P + max_len = "
                     f"{p} + {cfg.max_len}")
  t = cfg.max_len
  return DecodeState(
      tokens=jnp.full((b, t), cfg.pad_id, jnp.int32), logp=jnp.zeros((b, t), jnp.float32),
      mask=jnp.zeros((b, t), bool), done=jnp.zeros((b,), bool), step=jnp.zeros((), jnp.int32),
      cache=cache, logits=last_logits.astype(jnp.float32),
      prompt_len=jnp.sum(prompt_mask, axis=1, dtype=jnp.int32), key=key)


def decode_step(model: UnifiedModel, state: DecodeState, prompt_slots: int,
                cfg: SamplingConfig) -> DecodeState:
  """Samples token ``step`` for every live row, caches it at slot P + step, gets next logits."""
  step = state.step
  tok, logp = select_token(state.logits, jax.random.fold_in(state.key, step), cfg)
  live = ~state.done  # the stop token itself is valid; rows after their stop emit pad
  tok = jnp.where(live, tok, cfg.pad_id)
  logp = jnp.where(live, logp, 0.0)
  col = lambda buf, val: jax.lax.dynamic_update_slice(buf, val[:, None], (0, step))
  # Each layer writes the token's key/value into slot P + step in place, then attends over the
  # cache: the carried cache is updated, never concatenated or copied.
  out = model(tok[:, None], (state.prompt_len + step)[:, None], live[:, None],
              cache=state.cache, cache_slot=prompt_slots + step)
  return state.replace(
      tokens=col(state.tokens, tok), logp=col(state.logp, logp), mask=col(state.mask, live),
      done=state.done | (live & (tok == cfg.stop_id)), step=step + 1, cache=out.cache,
      logits=out.logits[:, 0])


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
  """Where the decode loop's arrays live: ``parallel.decode_mesh`` (rows over groups of chips,
  the understanding expert split over the chips of a group).

  In the trainer's layout (weights FSDP over every chip, rows split over every chip) XLA keeps
  the weights in place and has every chip compute a slice of each contraction for ALL rows: per
  token and layer it all-reduces every row's activations over all chips, and per token the f32
  logits of every row (467 MB on v5p-128). Here the weights a decode step reads (the
  understanding expert, the embedding and the LM head; matrices cast to the compute dtype, as
  the model casts them anyway, so the numbers are unchanged) are resharded ONCE per decode call:
  heads, MLP and vocabulary over the ``tensor`` chips of a group, replicated across groups. A
  step then all-reduces only its group's rows' [rows, D] activations, twice per layer, inside the
  group, and each chip holds the logits of its group's rows over its vocabulary shard (sampling
  reduces over the shards: a max, a sum and an argmax per row).
  """
  mesh: Mesh

  @classmethod
  def build(cls, mesh: Optional[Mesh], tensor: int) -> Optional["DecodeLayout"]:
    """None (the trainer's layout) without a mesh or for ``tensor`` <= 1."""
    if mesh is None or tensor <= 1:
      return None
    return cls(parallel.decode_mesh(mesh, tensor))

  @property
  def tensor(self) -> int:
    return self.mesh.shape["model"]

  def _put(self, x: jax.Array, *spec) -> jax.Array:
    spec = tuple(a if a is None or x.shape[i] % self.mesh.shape[a] == 0 else None
                 for i, a in enumerate(spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(*spec)))

  def weights(self, params: nnx.State, compute_dtype, staged: bool = False) -> nnx.State:
    """``params`` (a model's state) in this layout; matrices (ndim >= 2) in ``compute_dtype``.

    ``staged``: go through ``embed`` split over the row groups first (an all-to-all inside each
    group, then an all-gather across groups). Straight from the trainer's FSDP layout XLA
    replicates each matrix whole on every chip before slicing it (the 2.2 GB LM head and
    embedding included)."""
    logical = nnx.get_partition_spec(params)
    rules = (((("embed", "rows"), ("head_embed", "rows")) + parallel.DECODE_RULES,
              parallel.DECODE_RULES) if staged
             else (parallel.DECODE_RULES,))

    def place(spec, leaf):
      if not hasattr(leaf, "ndim") or leaf.ndim == 0:
        return leaf
      if leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating):
        leaf = leaf.astype(compute_dtype)
      for r in rules:
        mesh_spec = parallel.logical_to_mesh_spec(spec, r, self.mesh, leaf.shape)
        leaf = jax.lax.with_sharding_constraint(leaf, NamedSharding(self.mesh, mesh_spec))
      return leaf

    return jax.tree.map(place, logical, params, is_leaf=lambda x: isinstance(x, PartitionSpec))

  def cache(self, cache: KVCache) -> KVCache:
    kv = lambda bufs: tuple(self._put(b, "rows", "model") for b in bufs)  # [B, Hkv, ...]
    return cache.replace(k=kv(cache.k), v=kv(cache.v), valid=self._put(cache.valid, "rows"))

  def state(self, s: DecodeState) -> DecodeState:
    rows = lambda x: self._put(x, "rows")
    return s.replace(tokens=rows(s.tokens), logp=rows(s.logp), mask=rows(s.mask),
                     done=rows(s.done), prompt_len=rows(s.prompt_len),
                     logits=self._put(s.logits, "rows", "model"), cache=self.cache(s.cache))


# Smallest attention window of the decode loop (slots); see ``attention_windows``.
MIN_WINDOW = 128


def attention_windows(prompt_slots: int, max_len: int, cache_len: int,
                      min_window: int = MIN_WINDOW) -> list[int]:
  """Static cache widths of the decode phases: W_0 < W_1 < ...

  Decode step t writes slot P + t and reads slots [0, P + t], so phase j runs the steps with
  P + t < W_j on a cache of W_j slots instead of all ``cache_len``. W_0 = max(``min_window``,
  2 (P + 1)); each next width is 1.5x the last, rounded up to 64 slots, so a step reads at most
  about 1.5x the slots in use (2x in the first window) for log_1.5(T / W_0) + 1 compiled loops.
  The last width is the slots the loop can fill, P + T, or ``cache_len`` if that is not larger
  than ``min_window``. ``min_window=0`` gives one phase over the whole cache.
  """
  need = prompt_slots + max_len
  if min_window <= 0 or cache_len <= min_window:
    return [cache_len]
  widths, w = [], max(min_window, 2 * (prompt_slots + 1))
  while w < need:
    widths.append(w)
    w = -(-(3 * w // 2) // 64) * 64
  return widths + [need]


def decode(model: UnifiedModel, cache: KVCache, last_logits: jax.Array, prompt_mask: jax.Array,
           key: jax.Array, cfg: SamplingConfig, min_window: int = MIN_WINDOW,
           layout: Optional[DecodeLayout] = None) -> TextSample:
  """Decodes up to T = cfg.max_len tokens (stops when all rows are done).

  One ``lax.while_loop`` per attention window (``attention_windows``): between two windows the
  cache is copied once into the next, wider buffers; within one, every step writes its slot in
  place and attends over the window only. The sampled tokens do not depend on the windows.

  Args:
    cache: from ``prefill`` with >= P + T slots. last_logits: [B, V]. prompt_mask: [B, P].
    key: PRNG key; step t uses ``fold_in(key, t)``.
    min_window: first window (0: one loop over the whole cache).
    layout: where the loop's weights and rows live (``DecodeLayout``; None: where they are).
  Returns:
    TextSample ([B, T] tokens / logp / mask, [B] truncated, the updated cache of S slots).
  """
  prompt_slots = prompt_mask.shape[1]
  prompt_mask = prompt_mask.astype(bool)
  # The loop runs unrolled over per-layer cache buffers. With ``scan_layers`` each layer's
  # weights are taken out of the stacked [L, ...] arrays once here: sliced inside the loop body,
  # XLA copied every layer's weights on every step.
  graphdef, params = nnx.split(layer_layout.convert_model(model, scan_layers=False))
  place = (lambda s: s) if layout is None else layout.state
  pin = (lambda p: p) if layout is None else (
      lambda p: layout.weights(p, model.cfg.compute_dtype))
  if layout is not None:  # resharded once per call, not per step
    params = layout.weights(params, model.cfg.compute_dtype, staged=True)
  cache_len = cache.length

  def body(state):
    # Merge inside the body so the loop is a pure function of its carried/closed-over arrays.
    # The layout is pinned inside the body too (XLA chose differently per loop otherwise).
    return place(decode_step(nnx.merge(graphdef, pin(params)), place(state), prompt_slots, cfg))

  # The loop attends over [B, Hkv, D, S] keys (``KVCache.keys_transposed``): one transpose of
  # the keys here and one back at the end, instead of a slower contraction on every step.
  state = place(init_decode_state(cache.with_key_layout(True), last_logits, prompt_mask, key,
                                  cfg))
  for width in attention_windows(prompt_slots, cfg.max_len, cache_len, min_window):
    last_step = min(cfg.max_len, width - prompt_slots)  # steps < last_step fit in the window
    cond = lambda s, last_step=last_step: (s.step < last_step) & ~jnp.all(s.done)
    if width != state.cache.length:
      state = place(state.replace(cache=state.cache.resized(width)))
    # Pinned on the way out too: else XLA gives the last loop's carry the layout of whatever
    # reads the result and reshards every step (224 all-gathers per step on v5e-128).
    state = place(jax.lax.while_loop(cond, body, state))
  cache = state.cache if state.cache.length == cache_len else state.cache.resized(cache_len)
  return TextSample(state.tokens, state.logp, state.mask, ~state.done,
                    cache.with_key_layout(False))


def append_token(model: UnifiedModel, cache: KVCache, token_id: int, slot: int,
                 position: jax.Array) -> KVCache:
  """Writes one always-valid token (e.g. ``<vision_start>``) into every row's cache.

  Args:
    token_id: static id. slot: static cache slot (P + T in the shared layout).
    position: [B] int32 RoPE position (p + r: right after each row's last valid token).
  """
  b = position.shape[0]
  tokens = jnp.full((b, 1), token_id, jnp.int32)
  valid = jnp.ones((b, 1), bool)
  out = model(tokens, position[:, None].astype(jnp.int32), valid, cache=cache,
              compute_logits=False, cache_slot=slot)
  return out.cache


def sample_text(model: UnifiedModel, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                key: jax.Array, cfg: SamplingConfig,
                cache_len: Optional[int] = None) -> TextSample:
  """prefill + decode. cache_len defaults to P + T + 1 (room for ``<vision_start>``)."""
  p = prompt_tokens.shape[1]
  cache_len = p + cfg.max_len + 1 if cache_len is None else cache_len
  cache, last_logits = prefill(model, prompt_tokens, prompt_mask, cache_len)
  return decode(model, cache, last_logits, prompt_mask, key, cfg)


def make_text_sampler(graphdef: nnx.GraphDef, cfg: SamplingConfig,
                      compiler_options: Optional[dict] = None):
  """Jitted ``fn(state, prompt_tokens [B, P], prompt_mask [B, P], key) -> TextSample``.

  compiler_options: passed to ``jax.jit`` (e.g. a low XLA optimisation level for CPU tests).
  """

  def fn(state, prompt_tokens, prompt_mask, key):
    return sample_text(nnx.merge(graphdef, state), prompt_tokens, prompt_mask, key, cfg)

  return jax.jit(fn, compiler_options=compiler_options)


def make_prefill_decode(graphdef: nnx.GraphDef, cfg: SamplingConfig,
                        cache_len: Optional[int] = None,
                        compiler_options: Optional[dict] = None,
                        min_window: int = MIN_WINDOW):
  """The text sampler as two jitted calls, for timing each half and reusing a cache.

  Returns ``(prefill_fn, decode_fn)``:
    ``prefill_fn(state, prompt_tokens [B, P], prompt_mask [B, P]) -> (cache, last_logits [B, V])``
    with ``cache_len`` slots (default P + T + 1);
    ``decode_fn(state, cache, last_logits, prompt_mask, key) -> TextSample``. The cache argument
    is donated: its buffers become the loop's carry and the returned cache, so decoding allocates
    no second cache (do not reuse the cache passed in). ``min_window``: see ``decode``.
  """

  def prefill_fn(state, prompt_tokens, prompt_mask):
    p = prompt_tokens.shape[1]
    length = p + cfg.max_len + 1 if cache_len is None else cache_len
    return prefill(nnx.merge(graphdef, state), prompt_tokens, prompt_mask, length)

  def decode_fn(state, cache, last_logits, prompt_mask, key):
    return decode(nnx.merge(graphdef, state), cache, last_logits, prompt_mask, key, cfg,
                  min_window)

  return (jax.jit(prefill_fn, compiler_options=compiler_options),
          jax.jit(decode_fn, donate_argnums=(1,), compiler_options=compiler_options))
