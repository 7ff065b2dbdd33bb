"""The decode loop's key layout ([B, Hkv, D, S], ``KVCache.keys_transposed``) and the attention
softmax normalised after the value contraction: same numbers as the reference formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_model import TOL, _positions, _tokens, model  # noqa: F401  (module fixture)
from unigrpo_jax.models.unified.kv_cache import KVCache
from unigrpo_jax.models.unified import attention
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.rollout import text


def _softmax_attention_f64(q, k, v, mask):
  """float64 reference: q [B, Lq, H, D], k/v [B, Hkv, Lk, D], mask [B, Lq, Lk]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, lq, h, d = q.shape
  g = h // k.shape[1]
  kk, vv = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # [B, H, Lk, D]
  logits = np.einsum("bqhd,bhkd->bhqk", q, kk) / np.sqrt(d)
  logits = np.where(np.asarray(mask)[:, None], logits, -1e30)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bhkd->bqhd", w, vv)


@pytest.mark.parametrize("lq", [1, 3])
def test_text_attention_matches_float64_in_both_key_layouts(lq):
  b, h, hkv, d, s = 2, 4, 2, 8, 11
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, lq, h, d))
  k = 3.0 * jax.random.normal(ks[1], (b, hkv, s, d))  # large logits: the max shift matters
  v = jax.random.normal(ks[2], (b, hkv, s, d))
  mask = jax.random.bernoulli(ks[3], 0.6, (b, lq, s)).at[:, :, 0].set(True)
  mask = mask.at[1, 0].set(False)  # one query that sees nothing: a uniform (finite) row
  want = _softmax_attention_f64(q, k, v, mask)
  got = attention.text_attention(q, k, v, mask)
  got_t = attention.text_attention(q, jnp.swapaxes(k, 2, 3), v, mask, keys_transposed=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_t, want, rtol=1e-5, atol=1e-5)
  # The query that sees nothing gets uniform weights (finite, the mean of its kv head's values).
  uniform = np.repeat(np.asarray(v, np.float64)[1].mean(1), h // hkv, axis=0)  # [H, D]
  np.testing.assert_allclose(got[1, 0], uniform, rtol=1e-5, atol=1e-6)


def test_key_layout_round_trip_write_and_resize():
  cfg = get_preset("tiny")
  b, s = 2, 7
  cache = KVCache.zeros(cfg, b, s)
  layers, hkv, d = cfg.num_layers, cfg.num_kv_heads, cfg.resolved_head_dim
  new_k = jax.random.normal(jax.random.key(1), (layers, b, 3, hkv, d))
  new_v = jax.random.normal(jax.random.key(2), (layers, b, 3, hkv, d))
  valid = jnp.ones((b, 3), bool)
  plain = cache.write(new_k, new_v, 2, valid)
  flipped = cache.with_key_layout(True)
  assert flipped.keys_transposed and flipped.k[0].shape == (b, hkv, d, s)
  assert flipped.with_key_layout(True) is flipped  # no copy when the layout is already right
  written = flipped.write(new_k, new_v, 2, valid)
  for got, want in zip(written.stacked(), plain.stacked()):
    np.testing.assert_array_equal(got, want)
  back = written.with_key_layout(False)
  assert not back.keys_transposed
  for got, want in zip(back.k, plain.k):
    np.testing.assert_array_equal(got, want)
  grown = written.resized(10)
  assert grown.k[0].shape == (b, hkv, d, 10) and grown.v[0].shape == (b, hkv, 10, d)
  np.testing.assert_array_equal(grown.with_key_layout(False).resized(s).k[1], plain.k[1])


def test_decode_step_in_transposed_layout_matches_the_plain_layout(model):  # noqa: F811
  cfg = model.cfg
  b, prompt_len, total = 2, 5, 8
  tok, pos = _tokens(cfg, b, total), _positions(b, total)
  pre = model(tok[:, :prompt_len], pos[:, :prompt_len])
  caches = {}
  for transposed in (False, True):
    cache = KVCache.zeros(cfg, b, total).write(pre.text_k, pre.text_v, 0,
                                               jnp.ones((b, prompt_len), bool))
    cache = cache.with_key_layout(transposed)
    logits = []
    for i in range(prompt_len, total):
      out = model(tok[:, i:i + 1], pos[:, i:i + 1], cache=cache, cache_slot=i)
      cache = out.cache
      assert cache.keys_transposed == transposed
      logits.append(out.logits)
    caches[transposed] = (cache, jnp.concatenate(logits, 1))
  np.testing.assert_allclose(caches[True][1], caches[False][1], **TOL)
  for got, want in zip(caches[True][0].stacked(), caches[False][0].stacked()):
    np.testing.assert_allclose(got, want, **TOL)


def test_a_transposed_cache_is_refused_as_a_prefix(model):  # noqa: F811
  cfg = model.cfg
  cache = KVCache.zeros(cfg, 1, 4).with_key_layout(True)
  with pytest.raises(ValueError, match="with_key_layout"):
    model(jnp.zeros((1, 2), jnp.int32), _positions(1, 2), cache=cache)


def test_decode_returns_the_plain_layout_and_loops_over_transposed_keys(model):  # noqa: F811
  cfg = model.cfg
  b, p = 2, 4
  sampling = text.SamplingConfig(max_len=5, stop_id=cfg.vocab_size, pad_id=0)
  tokens, mask = _tokens(cfg, b, p), jnp.ones((b, p), bool)
  graphdef, state = nnx.split(model)
  prefill_fn, decode_fn = text.make_prefill_decode(graphdef, sampling)
  cache, last = prefill_fn(state, tokens, mask)
  s, d = cache.length, cfg.resolved_head_dim
  hlo = decode_fn.lower(state, cache, last, mask, jax.random.key(0)).compile().as_text()
  # The loop carries [B, Hkv, D, S] key buffers (d != s here, so the shapes are unambiguous).
  assert d != s and f"[{b},{cfg.num_kv_heads},{d},{s}]" in hlo
  sample = decode_fn(state, cache, last, mask, jax.random.key(0))
  assert not sample.cache.keys_transposed
  assert sample.cache.k[0].shape == (b, cfg.num_kv_heads, s, d)
