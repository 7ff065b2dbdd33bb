"""The unified BAGEL-style model: one Qwen2-style transformer over text and image-latent tokens.

Mixture-of-Transformers: every layer holds an *understanding* expert (text tokens) and a
*generation* expert (image tokens), each a full set of norms, q/k/v/o and MLP; the two meet in one
shared attention. Routing is by modality. Because every sequence we build is laid out
``[cached prefix | text segment | image blocks]``, routing is a static split of the sequence: no
token pays for the expert it does not use.

One call covers every use:

========================  ======================================================================
prefill                   ``model(tokens, positions, text_valid)`` -> logits, text k/v to cache
decode one token          ``model(tokens[:, None], ..., cache=cache, cache_slot=s)`` -> logits and
                          ``out.cache``: each layer writes its new key/value into slot ``s`` of
                          the cache in place, then attends over the whole cache (see ``KVCache``)
read over a cache         ``model(tokens, ..., cache=cache)``: the cache is read only, the text
                          k/v are returned (``KVCache.write`` stores them)
denoise against context   ``model(latents=x, times=t, image_position=p, cache=cache)`` (read only;
                          BAGEL-format configs wrap each block in its two marker tokens)
packed training pass      ``model(tokens, ..., latents=[B, K, N, D], times=[B, K], ...)``: text
                          logits and K isolated image blocks' velocities in one forward pass
========================  ======================================================================
"""
from __future__ import annotations
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from unigrpo_jax.models.unified import attention
from unigrpo_jax.models.unified.config import ModelConfig
from unigrpo_jax.models.unified.kv_cache import KVCache, write_slots
from unigrpo_jax.models.unified.latent_io import LatentIO
from unigrpo_jax.models.unified.lora import ExpertAdapters
from unigrpo_jax.models.unified.layers import (RMSNorm, SwiGLU, abstract_params, annotated_param,
                                               fan_in_init, rope, zeros_init)
from unigrpo_jax.models.unified.stack import layer_list, loop_layers, scan_layers, stack_layers


@flax.struct.dataclass
class ModelOutput:
  """logits: [B, L, V] float32 or None; velocity: like the latents given, float32, or None;
  text_k / text_v: [num_layers, B, L, Hkv, D] of the text segment (to write into a cache), or
  None in ``cache_slot`` mode, where ``cache`` is the cache with them written in place."""
  logits: Optional[jax.Array]
  velocity: Optional[jax.Array]
  text_k: Optional[jax.Array]
  text_v: Optional[jax.Array]
  cache: Optional[KVCache] = None


class Expert(nnx.Module):
  """One expert's half of a layer: norms, q/k/v/o with Qwen2 biases, optional QK-norm, MLP."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, name: str = "und"):
    d, h, hkv, hd = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    pd = cfg.weight_dtype
    self.cfg = cfg
    self.input_norm = RMSNorm(d, cfg.rms_eps, pd, rngs)
    self.post_attn_norm = RMSNorm(d, cfg.rms_eps, pd, rngs)
    self.q = annotated_param(rngs, fan_in_init(), (d, h, hd), ("embed", "heads", "head_dim"), pd)
    self.k = annotated_param(rngs, fan_in_init(), (d, hkv, hd), ("embed", "kv_heads",
                                                                  "head_dim"), pd)
    self.v = annotated_param(rngs, fan_in_init(), (d, hkv, hd), ("embed", "kv_heads",
                                                                  "head_dim"), pd)
    self.o = annotated_param(rngs, fan_in_init(2), (h, hd, d), ("heads", "head_dim", "embed"), pd)
    if cfg.qkv_bias:
      self.q_bias = annotated_param(rngs, zeros_init, (h, hd), ("heads", "head_dim"), pd)
      self.k_bias = annotated_param(rngs, zeros_init, (hkv, hd), ("kv_heads", "head_dim"), pd)
      self.v_bias = annotated_param(rngs, zeros_init, (hkv, hd), ("kv_heads", "head_dim"), pd)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(hd, cfg.rms_eps, pd, rngs)
      self.k_norm = RMSNorm(hd, cfg.rms_eps, pd, rngs)
    self.mlp = SwiGLU(d, cfg.mlp_dim, cfg.compute_dtype, pd, rngs)
    # LoRA adapters (None without): models/unified/lora.py.
    self.lora = ExpertAdapters(cfg, rngs) if cfg.lora_on(name) else None

  def qkv(self, x: jax.Array, positions: jax.Array):
    """x: [B, L, D], positions: [B, L] -> q [B, L, H, hd], k and v [B, L, Hkv, hd]."""
    dt = self.cfg.compute_dtype
    h = self.input_norm(x).astype(dt)
    q = jnp.einsum("bld,dhk->blhk", h, self.q[...].astype(dt))
    k = jnp.einsum("bld,dhk->blhk", h, self.k[...].astype(dt))
    v = jnp.einsum("bld,dhk->blhk", h, self.v[...].astype(dt))
    if self.lora is not None:
      q, k, v = (self.lora.add(n, y, h) for n, y in (("q", q), ("k", k), ("v", v)))
    if self.cfg.qkv_bias:
      q, k, v = (q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt),
                 v + self.v_bias[...].astype(dt))
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    theta = self.cfg.rope_theta
    return rope(q, positions, theta), rope(k, positions, theta), v

  def finish(self, x: jax.Array, attn_out: jax.Array) -> jax.Array:
    """Residual output projection and MLP: x [B, L, D], attn_out [B, L, H, hd] -> [B, L, D]."""
    dt = self.cfg.compute_dtype
    attn_out = attn_out.astype(dt)
    o = jnp.einsum("blhk,hkd->bld", attn_out, self.o[...].astype(dt))
    if self.lora is not None:
      o = self.lora.add("o", o, attn_out)
    x = x + o.astype(x.dtype)
    return x + self.mlp(self.post_attn_norm(x), self.lora).astype(x.dtype)


class MoTLayer(nnx.Module):
  """A decoder layer with an understanding and (if ``cfg.mot``) a generation expert."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.und = Expert(cfg, rngs, "und")
    self.gen = Expert(cfg, rngs, "gen") if cfg.mot else None

  @property
  def gen_expert(self) -> Expert:
    return self.gen if self.gen is not None else self.und

  def __call__(self, text_x, text_pos, text_mask, text_valid, image_x, marker_x, image_pos,
               prefix_k, prefix_v, prefix_valid, stop_context_grad: bool):
    """One layer over the text segment [B, Lt, D] and/or K image blocks [B, K, N, D].

    prefix_k / prefix_v: [B, Hkv, S, D] a read-only cache layer (or None), prefix_valid [B, S].
    marker_x: [B, K, M, D] the blocks' marker tokens (BAGEL's <|vision_start|>/<|vision_end|>,
    M = 2) or None; they share the blocks' position and attention but use the understanding
    expert. Returns (text_x, image_x, marker_x, text_k, text_v); absent segments stay None.
    """
    ctx_k, ctx_v, ctx_valid = [], [], []
    if prefix_k is not None:
      ctx_k.append(prefix_k), ctx_v.append(prefix_v), ctx_valid.append(prefix_valid)
    tk = tv = None
    if text_x is not None:
      tq, tk, tv = self.und.qkv(text_x, text_pos)
      ctx_k.append(attention.heads_first(tk)), ctx_v.append(attention.heads_first(tv))
      keys, values = jnp.concatenate(ctx_k, axis=2), jnp.concatenate(ctx_v, axis=2)
      text_x = self.und.finish(text_x, attention.text_attention(tq, keys, values, text_mask))
      ctx_valid.append(text_valid)
    if image_x is not None:
      b, nb, n, d = image_x.shape
      flat = image_x.reshape(b, nb * n, d)
      pos = jnp.broadcast_to(image_pos[:, None], (b, nb * n))
      split = lambda a, per: a.reshape(b, nb, per, *a.shape[2:])
      iq, ik, iv = (split(a, n) for a in self.gen_expert.qkv(flat, pos))
      if not ctx_k:  # a block with no context at all (e.g. BAGEL's unconditional CFG branch)
        empty = jnp.zeros((b, ik.shape[3], 0, ik.shape[4]), ik.dtype)  # [B, Hkv, 0, D]
        ctx_k, ctx_v = [empty], [empty]
        ctx_valid = [jnp.zeros((b, 0), bool)]
      keys = jnp.concatenate(ctx_k, axis=2)
      values = jnp.concatenate(ctx_v, axis=2)
      if stop_context_grad:  # flow loss must not move the text policy through the context
        keys, values = jax.lax.stop_gradient(keys), jax.lax.stop_gradient(values)
      if marker_x is not None:
        # The markers join each block: same position, bidirectional, und expert. The block is
        # stored [latents | markers]; attention inside a block is order-free, so this is exact.
        m = marker_x.shape[2]
        mflat = marker_x.reshape(b, nb * m, d)
        mpos = jnp.broadcast_to(image_pos[:, None], (b, nb * m))
        mq, mk, mv = (split(a, m) for a in self.und.qkv(mflat, mpos))
        if stop_context_grad:  # the markers are text-policy (und) tokens: same rule
          mk, mv = jax.lax.stop_gradient(mk), jax.lax.stop_gradient(mv)
        iq, ik, iv = (jnp.concatenate(pair, axis=2) for pair in ((iq, mq), (ik, mk), (iv, mv)))
      cfg = self.und.cfg
      out = attention.block_attention(iq, keys, values, jnp.concatenate(ctx_valid, 1), ik, iv,
                                      impl=block_attention_impl(cfg), chunk=cfg.attention_chunk)
      if marker_x is not None:
        marker_out = out[:, :, n:].reshape(b, nb * m, *out.shape[3:])
        marker_x = self.und.finish(mflat, marker_out).reshape(b, nb, m, d)
        out = out[:, :, :n]
      image_x = self.gen_expert.finish(flat, out.reshape(b, nb * n, *out.shape[3:]))
      image_x = image_x.reshape(b, nb, n, d)
    return text_x, image_x, marker_x, tk, tv

  def text_into_cache(self, text_x, text_pos, text_mask, cache_k, cache_v, slot,
                      keys_transposed: bool = False):
    """Text tokens that write their keys/values into this layer's cache, then attend over it.

    Args:
      text_x: [B, Lt, D]; text_pos: [B, Lt]; text_mask: [B, Lt, S] (``cached_text_mask``).
      cache_k, cache_v: [B, Hkv, S, D] this layer's cache buffers (keys [B, Hkv, D, S] with
        ``keys_transposed``).
      slot: first slot of the Lt tokens (int or int32 scalar).
    Returns:
      (text_x [B, Lt, D], cache_k, cache_v with the new slots written).
    """
    tq, tk, tv = self.und.qkv(text_x, text_pos)
    cache_k = write_slots(cache_k, tk, slot, keys_transposed)
    cache_v = write_slots(cache_v, tv, slot)
    out = attention.text_attention(tq, cache_k, cache_v, text_mask, keys_transposed)
    text_x = self.und.finish(text_x, out)
    return text_x, cache_k, cache_v


class UnifiedModel(nnx.Module):
  """The whole model: embeddings, MoT layers, duplicated final norm, LM head, latent I/O."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.weight_dtype
    self.embed = annotated_param(rngs, fan_in_init(0), (cfg.vocab_size, cfg.hidden),
                                 ("vocab", "embed"), pd)
    layers = [MoTLayer(cfg, rngs) for _ in range(cfg.num_layers)]
    # scan_layers: one MoTLayer whose params carry a leading [num_layers] axis (logical name
    # "layers"), built from the same per-layer inits, so both layouts hold the same values.
    self.layers = stack_layers(layers) if cfg.scan_layers else nnx.List(layers)
    self.und_norm = RMSNorm(cfg.hidden, cfg.rms_eps, pd, rngs)
    self.gen_norm = RMSNorm(cfg.hidden, cfg.rms_eps, pd, rngs) if cfg.mot else None
    self.lm_head = None if cfg.tie_embeddings else annotated_param(
        rngs, fan_in_init(), (cfg.hidden, cfg.vocab_size), ("head_embed", "head_vocab"), pd)
    self.latent_io = LatentIO(cfg, rngs)

  def __call__(self, tokens: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None,
               text_valid: Optional[jax.Array] = None,
               latents: Optional[jax.Array] = None,
               times: Optional[jax.Array] = None,
               image_position: Optional[jax.Array] = None,
               cache: Optional[KVCache] = None,
               stop_context_grad: bool = False,
               compute_logits: bool = True,
               cache_slot=None,
               logits_slice: Optional[tuple[int, int]] = None) -> ModelOutput:
    """Forward pass over ``[cache | text | image blocks]``.

    Args:
      tokens: [B, Lt] int token ids of the text segment, or None.
      positions: [B, Lt] RoPE position ids of the text tokens.
      text_valid: [B, Lt] bool, real text tokens (default: all).
      latents: [B, N, Dl] one image block, or [B, K, N, Dl] K isolated blocks, or None.
      times: [B] or [B, K] flow times of the blocks (matching ``latents``).
      image_position: [B] the one RoPE position id shared by every image token of a row (with
        ``cfg.block_markers``, also by the block's <|vision_start|> and <|vision_end|>, which
        this call adds around every block itself: the context then ends with the text).
      cache: read-only context in front of the text segment (without ``cache_slot``).
      stop_context_grad: image blocks read the context keys/values through stop_gradient.
      compute_logits: skip the LM head when only the text k/v are needed.
      logits_slice: static (start, length): the LM head runs only on text slots
        ``start .. start+length`` (the slots whose next-token logits are used), never on the
        whole context: logits are then [B, length, V].
      cache_slot: int or int32 scalar: the text tokens are written into ``cache`` at slots
        ``cache_slot .. cache_slot+Lt`` (each layer in place, before attending) and attend over
        the valid cache slots up to their own. Text only; the output carries the new cache.
    Returns:
      ModelOutput (logits [B, Lt, V] f32, velocity like ``latents`` f32, text k/v per layer or,
      with ``cache_slot``, the updated cache).
    """
    cfg = self.cfg
    if tokens is None and latents is None:
      raise ValueError("UnifiedModel needs tokens, latents, or both")
    if cache_slot is not None:
      if cache is None or tokens is None or latents is not None:
        raise ValueError("cache_slot needs a cache and tokens, and no latents")
      return self._text_into_cache(tokens, positions, text_valid, cache, cache_slot,
                                   compute_logits)
    if cache is not None and cache.keys_transposed:
      raise ValueError("a cache read as a prefix needs [B, Hkv, S, D] keys: pass "
                       "cache.with_key_layout(False) (keys_transposed is the decode loop's layout)")
    text_x = text_mask = None
    if tokens is not None:
      if positions is None:
        raise ValueError("positions are required with tokens")
      if text_valid is None:
        text_valid = jnp.ones(tokens.shape, bool)
      text_x = self.embed_text(tokens)
      text_mask = attention.causal_text_mask(text_valid, None if cache is None else cache.valid)
    image_x = None
    single_block = latents is not None and latents.ndim == 3
    if latents is not None:
      if times is None or image_position is None:
        raise ValueError("times and image_position are required with latents")
      if single_block:
        latents, times = latents[:, None], times[:, None]
      image_x = self.latent_io.embed(latents, times)
    marker_x = None
    if image_x is not None and cfg.block_markers:  # BAGEL: <|vision_start|> latents <|vision_end|>
      ids = jnp.asarray([cfg.vision_start_id, cfg.vision_end_id], jnp.int32)
      marker_x = jnp.broadcast_to(jnp.take(self.embed[...], ids, axis=0).astype(cfg.compute_dtype),
                                  image_x.shape[:2] + (2, cfg.hidden))

    inputs = (positions, text_mask, text_valid, image_position)
    run = scan_layers if cfg.scan_layers else loop_layers
    text_x, image_x, marker_x, text_k, text_v = run(self.layers, cfg, (text_x, image_x, marker_x),
                                                    inputs, cache, stop_context_grad)

    logits = velocity = None
    if text_x is not None:
      if compute_logits:
        if logits_slice is not None:
          start, length = logits_slice
          if not (0 <= start and length >= 1 and start + length <= text_x.shape[1]):
            raise ValueError(f"logits_slice={logits_slice} is outside the {text_x.shape[1]} "
                             "text slots")
          text_x = text_x[:, start:start + length]
        logits = self.text_logits(text_x)
    if image_x is not None:
      gen_norm = self.gen_norm if self.gen_norm is not None else self.und_norm
      velocity = self.latent_io.velocity(gen_norm(image_x))
      if single_block:
        velocity = velocity[:, 0]
    return ModelOutput(logits, velocity, text_k, text_v)

  def _text_into_cache(self, tokens, positions, text_valid, cache: KVCache, slot,
                       compute_logits: bool) -> ModelOutput:
    """``cache_slot`` mode of ``__call__`` (decode): no concatenation, no cache-sized copy."""
    if positions is None:
      raise ValueError("positions are required with tokens")
    if text_valid is None:
      text_valid = jnp.ones(tokens.shape, bool)
    valid = cache.write_valid(text_valid, slot)
    mask = attention.cached_text_mask(valid, slot, tokens.shape[1])
    x = self.embed_text(tokens)
    k, v = list(cache.k), list(cache.v)
    for i, layer in enumerate(layer_list(self.layers, self.cfg)):
      x, k[i], v[i] = layer.text_into_cache(x, positions, mask, k[i], v[i], slot,
                                            cache.keys_transposed)
    logits = self.text_logits(x) if compute_logits else None
    return ModelOutput(logits, None, None, None, cache.replace(k=tuple(k), v=tuple(v),
                                                                 valid=valid))

  def embed_text(self, tokens: jax.Array) -> jax.Array:
    """[B, L] token ids -> [B, L, D] embeddings in the compute dtype."""
    return jnp.take(self.embed[...], tokens, axis=0).astype(self.cfg.compute_dtype)

  def text_logits(self, h: jax.Array) -> jax.Array:
    """[B, L, D] last hidden states -> [B, L, V] float32 logits."""
    h = self.und_norm(h).astype(self.cfg.compute_dtype)
    if self.lm_head is None:
      w = self.embed[...].astype(h.dtype).T
    else:
      w = self.lm_head[...].astype(h.dtype)
    return jnp.einsum("bld,dv->blv", h, w, preferred_element_type=jnp.float32)



def abstract_model(cfg: ModelConfig) -> UnifiedModel:
  """A ``cfg`` model whose params are ShapeDtypeStructs (the structure, shapes, dtypes and
  logical axes of ``nnx.eval_shape(lambda: UnifiedModel(cfg, rngs))``), built without tracing:
  milliseconds where ``nnx.eval_shape`` of BAGEL-7B-MoT takes minutes (``abstract_params``)."""
  with abstract_params():
    return UnifiedModel(cfg, nnx.Rngs(0))


def block_attention_impl(cfg: ModelConfig) -> str:
  """``cfg.attention_impl``; "auto" (a model built outside the trainer, e.g. in tests) resolves
  for the backend running it. The trainer and the AOT planner resolve "auto" for their mesh's
  platform first (``build.model_and_params``)."""
  return attention.resolve_impl(cfg.attention_impl, jax.default_backend(), cfg.compute_dtype)



def count_params(model_or_state, exclude: tuple[str, ...] = ()) -> int:
  """Number of parameter values; ``exclude`` drops top-level attributes (e.g. 'latent_io')."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(
      model_or_state, nnx.Param)
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    top = str(getattr(path[0], "key", path[0]))
    if top not in exclude:
      total += int(leaf.size)
  return total
