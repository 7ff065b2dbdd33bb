"""Grouped-query attention for the two kinds of queries of the unified sequence.

The packed sequence is always laid out ``[cached prefix | text segment | image blocks]``:

* text queries are causal: they see the valid prefix and the valid text keys at or before them;
* each image block is bidirectional inside itself, sees every valid prefix and text key, and is
  seen by nothing (text queries never read image keys, blocks never read each other).

Because the layout is fixed, the image-to-image part is computed per block ([N, N] logits per
block rather than one [K*N, K*N] masked matrix), so K blocks cost K times one block, not K^2.
Logits and softmax are float32 whatever the compute dtype.

Keys and values are head-major, ``[B, Hkv, S, D]`` (the KV cache's layout): with the kv head as a
batch dimension next to B and the slots contiguous per head, both attention contractions are plain
batched matmuls over the buffer as stored, so attending over a cache reads it without first
transposing (copying) it. ``heads_first`` converts freshly projected ``[B, L, Hkv, D]`` keys.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a query with no visible key gets a uniform (unused) row, not NaN.


def _group(q: jax.Array, num_kv_heads: int) -> jax.Array:
  """[..., H, D] -> [..., Hkv, G, D] with G = H // Hkv query heads per kv head."""
  *lead, h, d = q.shape
  return q.reshape(*lead, num_kv_heads, h // num_kv_heads, d)


def heads_first(x: jax.Array) -> jax.Array:
  """[B, L, Hkv, D] -> [B, Hkv, L, D]."""
  return jnp.swapaxes(x, 1, 2)


def text_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked GQA attention.

  Args:
    q: [B, Lq, H, D] queries.
    k, v: [B, Hkv, Lk, D] keys and values (head-major).
    mask: [B, Lq, Lk] bool, True where the query may read the key.
  Returns:
    [B, Lq, H, D] in q's dtype.
  """
  b, lq, h, d = q.shape
  hkv = k.shape[1]
  # Queries as [B, Hkv, G * Lq, D] (a small transpose of q, not of the keys): both contractions
  # are then batched matmuls over (B, Hkv) with the keys/values read as stored.
  qg = jnp.moveaxis(_group(q, hkv), 1, 3).reshape(b, hkv, -1, d)  # [B, Hkv, G * Lq, D]
  logits = jnp.einsum("bhqd,bhkd->bhqk", qg, k, preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(jnp.float32(d))
  logits = logits.reshape(b, hkv, h // hkv, lq, -1)
  logits = jnp.where(mask[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, hkv, h // hkv * lq, -1)
  out = jnp.einsum("bhqk,bhkd->bhqd", probs, v).reshape(b, hkv, h // hkv, lq, d)
  return jnp.moveaxis(out, 3, 1).reshape(b, lq, h, d)


def block_attention(q: jax.Array, ctx_k: jax.Array, ctx_v: jax.Array, ctx_valid: jax.Array,
                    blk_k: jax.Array, blk_v: jax.Array) -> jax.Array:
  """Attention of K isolated bidirectional image blocks onto a shared context.

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
