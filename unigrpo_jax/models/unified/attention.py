"""Grouped-query attention for the two kinds of queries of the unified sequence.

The packed sequence is always laid out ``[cached prefix | text segment | image blocks]``:

* text queries are causal: they see the valid prefix and the valid text keys at or before them;
* each image block is bidirectional inside itself, sees every valid prefix and text key, and is
  seen by nothing (text queries never read image keys, blocks never read each other).

Because the layout is fixed, the image-to-image part is computed per block ([N, N] logits per
block rather than one [K*N, K*N] masked matrix), so K blocks cost K times one block, not K^2.
Logits and softmax are float32 whatever the compute dtype. At real image sizes even one block's
dense [N, S + N] logits do not fit (BAGEL-7B at 1024 px: ~1.9 GB per row, block and layer), so
``block_attention`` has memory-lean implementations (``impl``): "chunked" (pure JAX, any backend),
"splash" (TPU Pallas kernel) and "cudnn" (GPU); "xla" is the dense reference.

Keys and values are head-major, ``[B, Hkv, S, D]`` (the KV cache's layout): with the kv head as a
batch dimension next to B and the slots contiguous per head, both attention contractions are plain
batched matmuls over the buffer as stored, so attending over a cache reads it without first
transposing (copying) it. ``heads_first`` converts freshly projected ``[B, L, Hkv, D]`` keys.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

_MASKED = -1e30  # finite, so a query with no visible key gets a uniform (unused) row, not NaN.


def _group(q: jax.Array, num_kv_heads: int) -> jax.Array:
  """[..., H, D] -> [..., Hkv, G, D] with G = H // Hkv query heads per kv head."""
  *lead, h, d = q.shape
  return q.reshape(*lead, num_kv_heads, h // num_kv_heads, d)


def heads_first(x: jax.Array) -> jax.Array:
  """[B, L, Hkv, D] -> [B, Hkv, L, D]."""
  return jnp.swapaxes(x, 1, 2)


def text_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                   keys_transposed: bool = False) -> jax.Array:
  """Masked GQA attention.

  Args:
    q: [B, Lq, H, D] queries.
    k: [B, Hkv, Lk, D] keys (head-major), or [B, Hkv, D, Lk] with ``keys_transposed`` (the decode
      loop's layout, see ``KVCache.keys_transposed``).
    v: [B, Hkv, Lk, D] values (head-major).
    mask: [B, Lq, Lk] bool, True where the query may read the key.
  Returns:
    [B, Lq, H, D] in q's dtype.
  """
  b, lq, h, d = q.shape
  hkv = k.shape[1]
  # Queries as [B, Hkv, G * Lq, D] (a small transpose of q, not of the keys): both contractions
  # are then batched matmuls over (B, Hkv) with the keys/values read as stored.
  qg = jnp.moveaxis(_group(q, hkv), 1, 3).reshape(b, hkv, -1, d)
  if keys_transposed:
    # [D, Lk] keys: the contraction streams over contiguous slots (on CPU about 1.5x faster per
    # byte than contracting the minor D of [Lk, D] when Lq is 1).
    logits = jnp.swapaxes(jnp.einsum("bhdk,bhqd->bhkq", k, qg,
                                     preferred_element_type=jnp.float32), 2, 3)
  else:
    logits = jnp.einsum("bhqd,bhkd->bhqk", qg, k, preferred_element_type=jnp.float32)
  logits = logits.reshape(b, hkv, h // hkv, lq, -1) / jnp.sqrt(jnp.float32(d))
  logits = jnp.where(mask[:, None, None], logits, _MASKED)
  # Softmax with the normalisation after the value contraction: the unnormalised weights are
  # read once (by the dot) and only the [.., Lq, D] output is divided, not the [.., Lq, Lk] rows.
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  total = jnp.sum(weights, axis=-1)  # [B, Hkv, G, Lq], >= 1 (the max's own term)
  weights = weights.astype(v.dtype).reshape(b, hkv, h // hkv * lq, -1)
  out = jnp.einsum("bhqk,bhkd->bhqd", weights, v, preferred_element_type=jnp.float32)
  out = out.reshape(b, hkv, h // hkv, lq, d) / total[..., None]
  return jnp.moveaxis(out, 3, 1).reshape(b, lq, h, d).astype(q.dtype)


# The mesh of the program being traced (``traced_on``): Pallas kernels must be shard_mapped
# over it, and the model's call sites do not carry a mesh.
_TRACE_MESH: contextvars.ContextVar = contextvars.ContextVar("attention_trace_mesh",
                                                             default=None)


def traced_on(fn, mesh):
  """``fn`` whose tracing sees ``mesh`` as the mesh of its attention kernels.

  Wrap a program's function before ``jax.jit`` (``jax.jit(traced_on(fn, mesh), ...)``): every
  ``block_attention(impl="splash")`` traced inside then runs its kernel in a shard_map over
  ``mesh`` (rows over the batch axes). Without a mesh (None) it changes nothing.
  """
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    token = _TRACE_MESH.set(mesh)
    try:
      return fn(*args, **kwargs)
    finally:
      _TRACE_MESH.reset(token)

  return wrapped


# Implementations of ``block_attention``; "auto" is resolved by ``resolve_impl`` for the target.
BLOCK_IMPLS = ("xla", "chunked", "splash", "cudnn")
ATTENTION_IMPLS = ("auto",) + BLOCK_IMPLS


def resolve_impl(impl: str, platform: str, dtype=None) -> str:
  """The ``block_attention`` implementation to use on ``platform``.

  Args:
    impl: one of ATTENTION_IMPLS; explicit names pass through unchanged.
    platform: the *target* platform ("tpu", "gpu"/"cuda", "cpu", ...), i.e. the mesh devices'
      ``platform``, not ``jax.default_backend()``: programs are AOT-compiled for TPUs from a CPU.
    dtype: compute dtype. cuDNN's flash attention only takes bf16/fp16, so "auto" picks "cudnn"
      on GPU only when dtype is one of those; None (unknown) stays on the portable "chunked".
  Returns:
    "splash" on TPU, "cudnn" on an NVIDIA GPU with a half dtype, else "chunked".
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; known: {', '.join(ATTENTION_IMPLS)}")
  if impl != "auto":
    return impl
  platform = platform.lower()
  if platform == "tpu":
    return "splash"
  if (platform in ("gpu", "cuda") and dtype is not None
      and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))):
    return "cudnn"
  return "chunked"


def block_attention(q: jax.Array, ctx_k: jax.Array, ctx_v: jax.Array, ctx_valid: jax.Array,
                    blk_k: jax.Array, blk_v: jax.Array, impl: str = "xla", chunk: int = 512, *,
                    splash_blocks=None, interpret: bool = False, mesh=None) -> jax.Array:
  """Attention of K isolated bidirectional image blocks onto a shared context.

  Each block's queries read the valid context slots and every key of their own block. All
  implementations compute the same function; they differ in how much of the [N, S + N] score
  matrix exists at once:

  * "xla": dense, all float32 logits of all blocks at once (reference; small shapes only).
  * "chunked": pure JAX, any backend: ``chunk`` queries at a time under ``jax.checkpoint``, so
    forward and backward hold only one chunk's [chunk, S + N] float32 scores (and the few
    arrays its softmax and gradient make of them), never all N rows.
  * "splash": TPU Pallas splash attention (flash-style, scores only in VMEM tiles); ``interpret``
    runs the kernel in the Pallas interpreter (CPU tests). ``splash_blocks``: a
    ``splash_block_sizes(...)`` (default 128 x 128). XLA cannot partition a Pallas kernel, so
    under a multi-device jit pass ``mesh``: the kernel then runs in a ``shard_map`` with rows
    split over the mesh's batch axes and heads over its tensor axis (parallel.py's names).
  * "cudnn": NVIDIA GPU cuDNN flash attention via ``jax.nn.dot_product_attention``; bf16/fp16
    only. Not run in this project's tests (no GPU): only its key reordering is checked, through
    the same call with XLA's implementation.

  Args:
    q: [B, K, N, H, D] image-block queries.
    ctx_k, ctx_v: [B, Hkv, S, D] context keys/values (prefix and text; head-major).
    ctx_valid: [B, S] bool, which context slots hold real tokens.
    blk_k, blk_v: [B, K, N, Hkv, D] keys/values of the blocks themselves.
    impl: one of BLOCK_IMPLS (resolve "auto" first with ``resolve_impl``).
    chunk: queries per chunk for "chunked".
    splash_blocks, interpret, mesh: "splash" only (see above); the others ignore them.
  Returns:
    [B, K, N, H, D].
  """
  if impl == "xla":
    return _block_attention_xla(q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v)
  if impl == "chunked":
    return _block_attention_chunked(q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v, chunk)
  if impl == "splash":
    mesh = mesh if mesh is not None else _TRACE_MESH.get()
    fn = functools.partial(_block_attention_splash, blocks=splash_blocks or splash_block_sizes(),
                           interpret=interpret)
    if mesh is not None and mesh.size > 1:
      fn = _shard_rows_and_heads(fn, mesh, q.shape[0], q.shape[3], ctx_k.shape[1])
    return fn(q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v)
  if impl == "cudnn":
    return _block_attention_cudnn(q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v)
  raise ValueError(f"block_attention impl {impl!r} is not one of {', '.join(BLOCK_IMPLS)} "
                   "(resolve 'auto' with resolve_impl(impl, platform) first)")


def _block_attention_chunked(q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v, chunk: int):
  """``_block_attention_xla`` over ``chunk`` queries at a time; same args and result."""
  if chunk <= 0:
    raise ValueError(f"attention chunk must be positive, got {chunk}")
  b, nb, n, h, d = q.shape
  chunk = min(chunk, n)
  num = -(-n // chunk)
  if num == 1:  # one chunk: the dense code as is (small blocks, e.g. the toy world's 64 tokens)
    return _block_attention_xla(q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v)
  # Pad N to whole chunks: the padded queries' outputs are dropped, so their cotangent is zero
  # and they add nothing to the key/value gradients.
  qp = jnp.pad(q, ((0, 0), (0, 0), (0, num * chunk - n), (0, 0), (0, 0)))
  chunks = jnp.moveaxis(qp.reshape(b, nb, num, chunk, h, d), 2, 0)  # [C, B, K, chunk, H, D]

  # Checkpointed body: the backward pass recomputes one chunk's scores instead of the scan
  # stacking every chunk's softmax as a residual (which would rebuild the full [N, S+N]).
  @jax.checkpoint
  def one(qc):
    return _block_attention_xla(qc, ctx_k, ctx_v, ctx_valid, blk_k, blk_v)

  out = jax.lax.map(one, chunks)  # [C, B, K, chunk, H, D]
  return jnp.moveaxis(out, 0, 2).reshape(b, nb, num * chunk, h, d)[:, :, :n]


def splash_block_sizes(block_q: int = 128, block_kv: int = 128):
  """Splash tile sizes, the same for forward and both backward kernels.

  Query and key lengths are padded to multiples of these; 128 is the smallest the TPU kernel
  takes (keys: lanes) and wastes the least padding; larger tiles mean fewer grid steps (usually
  faster on long blocks; not measured here: no TPU to run on).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak
  return sak.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                        block_q_dkv=block_q, block_kv_dkv=block_kv,
                        block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, q_len: int, kv_len: int, blocks, interpret: bool):
  """A GQA splash kernel over [heads, q_len, D] queries, full mask (masking is by segment)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sam
  mask = sam.MultiHeadMask([sam.FullMask((q_len, kv_len))] * heads)
  return sak.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                             interpret=interpret)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _block_attention_splash(q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v, *, blocks, interpret: bool):
  """Splash attention per (row, block) over keys [context (S) | block (N)] (padded)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak
  b, nb, n, h, d = q.shape
  hkv, s = ctx_k.shape[1], ctx_k.shape[2]
  # Every forward/backward kernel tiles both lengths: pad to a multiple of all its tile sizes.
  lq = _round_up(n, math.lcm(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq))
  lk = _round_up(s + n, math.lcm(blocks.block_kv, blocks.block_kv_compute, blocks.block_kv_dkv,
                                 blocks.block_kv_dkv_compute, blocks.block_kv_dq))
  # The kernel does not scale logits.
  qh = (jnp.moveaxis(q, 3, 2) * (1.0 / math.sqrt(d))).astype(q.dtype)  # [B, K, H, N, D]
  qh = jnp.pad(qh, ((0, 0), (0, 0), (0, 0), (0, lq - n), (0, 0)))

  def keys(ctx, blk):  # [B, Hkv, S, D], [B, K, N, Hkv, D] -> [B, K, Hkv, lk, D]
    ctx = jnp.broadcast_to(ctx[:, None], (b, nb, hkv, s, d)).astype(blk.dtype)
    both = jnp.concatenate([ctx, jnp.moveaxis(blk, 3, 2)], axis=3)
    return jnp.pad(both, ((0, 0), (0, 0), (0, 0), (0, lk - s - n), (0, 0)))

  k, v = keys(ctx_k, blk_k), keys(ctx_v, blk_v)
  # Masking by segment ids: queries (padded ones too) are segment 1; real keys 1; invalid context
  # slots and key padding 0, which no query has. Every query keeps its own block's N >= 1 keys,
  # so no softmax row is empty. GQA is native: the MHA kernel maps q head i to kv head i // G.
  kv_seg = jnp.concatenate([ctx_valid.astype(jnp.int32), jnp.ones((b, n), jnp.int32),
                            jnp.zeros((b, lk - s - n), jnp.int32)], axis=1)
  kv_seg = jnp.broadcast_to(kv_seg[:, None], (b, nb, lk)).reshape(b * nb, lk)
  seg = sak.SegmentIds(q=jnp.ones((lq,), jnp.int32), kv=kv_seg)
  kernel = _splash_kernel(h, lq, lk, blocks, interpret)
  # The kernel is per example ([H, L, D]): vmap over the B * K (row, block) pairs.
  out = jax.vmap(kernel, in_axes=(0, 0, 0, sak.SegmentIds(q=None, kv=0)))(
      qh.reshape(b * nb, h, lq, d), k.reshape(b * nb, hkv, lk, d),
      v.reshape(b * nb, hkv, lk, d), seg)
  out = jnp.moveaxis(out.reshape(b, nb, h, lq, d)[:, :, :, :n], 2, 3)
  return out.astype(jnp.result_type(ctx_v.dtype, blk_v.dtype))


def _shard_rows_and_heads(fn, mesh, rows: int, heads: int, kv_heads: int):
  """``fn`` (block-attention args) in a shard_map: rows over the batch axes, heads over tensor.

  Each shard holds whole (row, block) pairs and a contiguous run of kv heads with their G query
  heads (query head i reads kv head i // G), so the per-shard call is the same attention.
  """
  from unigrpo_jax import parallel
  batch = tuple(a for a in parallel.BATCH_AXES if a in mesh.shape)
  tensor = "tensor" if "tensor" in mesh.shape else None
  row_shards = math.prod(mesh.shape[a] for a in batch)
  head_shards = mesh.shape[tensor] if tensor else 1
  if rows % row_shards or heads % head_shards or kv_heads % head_shards:
    raise ValueError(f"splash block attention: {rows} rows / {heads} heads / {kv_heads} kv heads "
                     f"do not split over mesh axes {batch} ({row_shards}) / {tensor} "
                     f"({head_shards})")
  rows_spec = batch or None
  q_spec = P(rows_spec, None, None, tensor)  # q, blk_k, blk_v: [B, K, N, heads, D]
  ctx_spec = P(rows_spec, tensor)  # ctx_k, ctx_v: [B, Hkv, S, D]
  return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, ctx_spec, ctx_spec, P(rows_spec),
                                                q_spec, q_spec),
                       out_specs=q_spec, check_vma=False)


def _block_attention_cudnn(q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v, implementation="cudnn"):
  """cuDNN flash attention per (row, block) over keys [block (N) | valid ctx | invalid ctx].

  cuDNN takes a key mask cheaply only as lengths (a bool mask becomes a [N, S + N] bias), so the
  context is reordered per row, valid slots first (a stable sort; softmax attention does not
  depend on key order), and each row's length is N + its number of valid slots.
  ``implementation`` is passed to ``jax.nn.dot_product_attention``; tests use "xla" on CPU.
  """
  b, nb, n, h, d = q.shape
  hkv, s = ctx_k.shape[1], ctx_k.shape[2]
  if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"cudnn block attention needs bf16/fp16 inputs, got {q.dtype}; use "
                     "impl='chunked' for float32")
  order = jnp.argsort(~ctx_valid, axis=1, stable=True)  # [B, S], valid slots first

  def keys(ctx, blk):  # [B, Hkv, S, D], [B, K, N, Hkv, D] -> [B * K, N + S, Hkv, D]
    ctx = jnp.swapaxes(jnp.take_along_axis(ctx, order[:, None, :, None], axis=2), 1, 2)
    ctx = jnp.broadcast_to(ctx[:, None], (b, nb, s, hkv, d)).astype(blk.dtype)
    return jnp.concatenate([blk, ctx], axis=2).reshape(b * nb, n + s, hkv, d)

  lengths = n + jnp.sum(ctx_valid, axis=1, dtype=jnp.int32)  # [B]
  out = jax.nn.dot_product_attention(
      q.reshape(b * nb, n, h, d), keys(ctx_k, blk_k), keys(ctx_v, blk_v),
      key_value_seq_lengths=jnp.repeat(lengths, nb), implementation=implementation)
  return out.reshape(b, nb, n, h, d).astype(jnp.result_type(ctx_v.dtype, blk_v.dtype))


def _block_attention_xla(q: jax.Array, ctx_k: jax.Array, ctx_v: jax.Array, ctx_valid: jax.Array,
                         blk_k: jax.Array, blk_v: jax.Array) -> jax.Array:
  """Dense reference: all [N, S + N] float32 logits of every block at once.

  Also the per-chunk body of ``chunked``: q may hold any number of queries (N_q) of each block,
  the block keys stay all N.

  Args:
    q: [B, K, N, H, D] image-block queries.
    ctx_k, ctx_v: [B, Hkv, S, D] context keys/values (prefix and text; head-major).
    ctx_valid: [B, S] bool, which context slots hold real tokens.
    blk_k, blk_v: [B, K, N, Hkv, D] keys/values of the blocks themselves.
  Returns:
    [B, K, N, H, D].
  """
  b, nb, n, h, d = q.shape
  qg = _group(q, ctx_k.shape[1])  # [B, K, N, Hkv, G, D]
  scale = 1.0 / jnp.sqrt(jnp.float32(d))
  ctx_logits = jnp.einsum("bknhgd,bhsd->bkhgns", qg, ctx_k,
                          preferred_element_type=jnp.float32) * scale
  ctx_logits = jnp.where(ctx_valid[:, None, None, None, None, :], ctx_logits, _MASKED)
  self_logits = jnp.einsum("bknhgd,bkmhd->bkhgnm", qg, blk_k,
                           preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(jnp.concatenate([ctx_logits, self_logits], axis=-1), axis=-1)
  probs = probs.astype(ctx_v.dtype)
  s = ctx_k.shape[2]
  out = (jnp.einsum("bkhgns,bhsd->bknhgd", probs[..., :s], ctx_v)
         + jnp.einsum("bkhgnm,bkmhd->bknhgd", probs[..., s:], blk_v))
  return out.reshape(b, nb, n, h, d)


def causal_text_mask(text_valid: jax.Array, prefix_valid: jax.Array | None) -> jax.Array:
  """Mask of text queries over keys ``[prefix | text]``.

  Args:
    text_valid: [B, L] bool, real (non-padding) text tokens.
    prefix_valid: [B, S] bool or None, valid cached slots (all earlier than the text).
  Returns:
    [B, L, S + L] bool.
  """
  b, length = text_valid.shape
  causal = jnp.tril(jnp.ones((length, length), bool))[None] & text_valid[:, None, :]
  if prefix_valid is None:
    return causal
  prefix = jnp.broadcast_to(prefix_valid[:, None, :], (b, length, prefix_valid.shape[1]))
  return jnp.concatenate([prefix, causal], axis=-1)


def cached_text_mask(cache_valid: jax.Array, slot, length: int) -> jax.Array:
  """Mask of text queries written into a cache at slots ``slot .. slot+L`` over all its slots.

  Args:
    cache_valid: [B, S] bool, valid slots after the queries' own keys were written.
    slot: int or traced int32 scalar, the first query's slot.
    length: static L, number of queries.
  Returns:
    [B, L, S] bool: query q reads slot s iff s is valid and s <= slot + q (slots after the
    query are never read, whatever they hold).
  """
  s = cache_valid.shape[1]
  causal = jnp.arange(s)[None, :] <= slot + jnp.arange(length)[:, None]
  return cache_valid[:, None, :] & causal[None]
