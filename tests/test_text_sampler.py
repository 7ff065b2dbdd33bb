"""The AR text sampler: on-policy log-probs, greedy vs a no-cache reference, padding, stop, filters."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unigrpo_jax.models import UnifiedModel, get_preset
from unigrpo_jax.sampling import text
from unigrpo_jax.sampling.trajectory import context_layout, token_logprobs

T = 6
VS_ID, PAD_ID = 2, 0
# Three prompts of lengths 3, 5, 2 (ids >= 3 so they never collide with pad/vision_start).
PROMPTS = [[11, 12, 13], [21, 22, 23, 24, 25], [31, 32]]


def left_pad(prompts, p):
  toks = np.full((len(prompts), p), PAD_ID, np.int32)
  mask = np.zeros((len(prompts), p), bool)
  for i, pr in enumerate(prompts):
    toks[i, p - len(pr):] = pr
    mask[i, p - len(pr):] = True
  return jnp.asarray(toks), jnp.asarray(mask)


@pytest.fixture(scope="module")
def model():
  return UnifiedModel(get_preset("tiny"), nnx.Rngs(0))


_SAMPLERS = {}


def run(model, cfg, prompts, p, key=0):
  """Jitted sample_text, one compile per (cfg, P) shared across tests."""
  graphdef, state = nnx.split(model)
  fn = _SAMPLERS.setdefault((graphdef, cfg), text.make_text_sampler(graphdef, cfg))
  toks, mask = left_pad(prompts, p)
  return fn(state, toks, mask, jax.random.key(key)), toks, mask


def teacher_forced_logits(model, toks, mask, sample):
  """Full no-cache forward over the shared layout -> [B, T, V] logits predicting each token."""
  lay = context_layout(toks, mask, sample.tokens, sample.mask, VS_ID, PAD_ID)
  p = toks.shape[1]
  logits = model(lay.tokens, lay.positions, lay.valid).logits
  return logits[:, p - 1:p + T - 1]


def reference_greedy(model, prompt, stop_id, steps=T):
  """Re-runs the whole growing sequence (no cache, no padding) each step and takes argmax."""
  seq, toks, logps = list(prompt), [], []
  for _ in range(steps):
    ids = jnp.asarray(seq, jnp.int32)[None]
    logits = model(ids, jnp.arange(len(seq), dtype=jnp.int32)[None]).logits[0, -1]
    tok = int(jnp.argmax(logits))
    toks.append(tok)
    logps.append(float(jax.nn.log_softmax(logits)[tok]))
    seq.append(tok)
    if tok == stop_id:
      break
  return toks, logps


@pytest.fixture(scope="module")
def greedy_refs(model):
  # stop_id -1 never matches: full-length reference sequences.
  return [reference_greedy(model, pr, -1) for pr in PROMPTS]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_on_policy(model, temperature):
  cfg = text.SamplingConfig(max_len=T, stop_id=7, pad_id=PAD_ID, temperature=temperature)
  sample, toks, mask = run(model, cfg, PROMPTS, 6)
  lp = token_logprobs(teacher_forced_logits(model, toks, mask, sample), sample.tokens,
                      temperature)
  lp = jnp.where(sample.mask, lp, 0.0)
  np.testing.assert_allclose(sample.logp, lp, atol=2e-5)
  assert np.all(np.asarray(sample.logp)[np.asarray(sample.mask)] < 0)
  # A wrong temperature on the teacher side must be detected (the check can fail).
  other = jnp.where(sample.mask, token_logprobs(
      teacher_forced_logits(model, toks, mask, sample), sample.tokens, temperature + 0.5), 0.0)
  assert np.max(np.abs(np.asarray(other - sample.logp))) > 1e-2


def test_greedy_matches_no_cache_reference(model, greedy_refs):
  cfg = text.SamplingConfig(max_len=T, stop_id=191, pad_id=PAD_ID, greedy=True)
  assert all(191 not in toks for toks, _ in greedy_refs)
  sample, _, _ = run(model, cfg, PROMPTS, 6)
  for i, (toks, logps) in enumerate(greedy_refs):
    assert list(np.asarray(sample.tokens[i])) == toks
    np.testing.assert_allclose(sample.logp[i], logps, atol=2e-5)
  assert np.all(np.asarray(sample.mask)) and np.all(np.asarray(sample.truncated))


@pytest.mark.parametrize("greedy", [True, False])
def test_left_padding_invariance(model, greedy):
  cfg = text.SamplingConfig(max_len=T, stop_id=191, pad_id=PAD_ID, greedy=greedy)
  prompts = [[3, 4, 5], [40, 41, 42, 43, 44]]
  a, _, _ = run(model, cfg, prompts, 5, key=3)
  b, _, _ = run(model, cfg, prompts, 9, key=3)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logp, b.logp, atol=2e-5)


def test_stop_token_mask_truncation_and_cache(model, greedy_refs):
  refs = [toks for toks, _ in greedy_refs]
  # A stop token that row 0 first emits at step >= 1 and some other row never emits.
  stop = next((tok for step, tok in enumerate(refs[0]) if step >= 1 and tok not in refs[0][:step]
               and any(tok not in r for r in refs[1:])), None)
  assert stop is not None, "fixture: no usable stop token in the greedy reference"
  cfg = text.SamplingConfig(max_len=T, stop_id=stop, pad_id=PAD_ID, greedy=True)
  sample, _, mask = run(model, cfg, PROMPTS, 6)
  p = mask.shape[1]
  for i, ref in enumerate(refs):
    n = ref.index(stop) + 1 if stop in ref else T  # the stop token itself is valid
    want_tok = ref[:n] + [PAD_ID] * (T - n)
    assert list(np.asarray(sample.tokens[i])) == want_tok
    assert list(np.asarray(sample.mask[i])) == [True] * n + [False] * (T - n)
    assert bool(sample.truncated[i]) == (stop not in ref)
    assert np.all(np.asarray(sample.logp[i, n:]) == 0)
    valid = np.asarray(sample.cache.valid[i])
    assert list(valid[p:p + T]) == [True] * n + [False] * (T - n)
    assert list(valid[:p]) == list(np.asarray(mask[i])) and not valid[p + T]
  assert not bool(sample.truncated[0]) and bool(np.any(sample.truncated))


def test_all_rows_stop_immediately(model):
  # A zero LM head gives uniform logits: argmax is token 0 for every row, which is the stop id.
  zero = nnx.clone(model)
  zero.lm_head[...] = jnp.zeros_like(zero.lm_head[...])
  cfg = text.SamplingConfig(max_len=T, stop_id=0, pad_id=1, greedy=True)
  sample, _, _ = run(zero, cfg, PROMPTS, 6)
  np.testing.assert_array_equal(sample.tokens, [[0] + [1] * (T - 1)] * 3)
  np.testing.assert_array_equal(sample.mask, [[True] + [False] * (T - 1)] * 3)
  assert not np.any(np.asarray(sample.truncated))
  np.testing.assert_allclose(sample.logp[:, 0], -np.log(192.0), rtol=1e-5)


@pytest.mark.parametrize("knob", [dict(top_k=1), dict(top_p=1e-6)])
def test_degenerate_filters_equal_greedy(model, greedy_refs, knob):
  cfg = text.SamplingConfig(max_len=T, stop_id=191, pad_id=PAD_ID, temperature=0.9, **knob)
  sample, _, _ = run(model, cfg, PROMPTS, 6, key=5)
  np.testing.assert_array_equal(sample.tokens, [toks for toks, _ in greedy_refs])
  # The distribution sampled from is a point mass: log-prob 0.
  np.testing.assert_allclose(sample.logp, 0.0, atol=1e-6)


def _np_filter(logits, temperature, top_k, top_p):
  x = np.asarray(logits, np.float64) / temperature
  kth = np.sort(x, axis=-1)[..., -top_k][..., None]
  x = np.where(x < kth, -np.inf, x)
  order = np.argsort(-x, axis=-1)
  sx = np.take_along_axis(x, order, -1)
  pr = np.exp(sx - sx.max(-1, keepdims=True))
  pr /= pr.sum(-1, keepdims=True)
  before = np.cumsum(pr, -1) - pr
  thr = np.min(np.where(before < top_p, sx, np.inf), -1, keepdims=True)
  x = np.where(x < thr, -np.inf, x)
  return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(
      -1, keepdims=True)


def test_top_k_top_p_logprobs_on_policy(model):
  cfg = text.SamplingConfig(max_len=T, stop_id=191, pad_id=PAD_ID, temperature=0.5, top_k=8,
                            top_p=0.8)
  sample, toks, mask = run(model, cfg, PROMPTS, 6, key=11)
  ref = _np_filter(teacher_forced_logits(model, toks, mask, sample), 0.5, 8, 0.8)
  got = np.take_along_axis(ref, np.asarray(sample.tokens)[..., None], -1)[..., 0]
  assert np.all(np.isfinite(got)), "sampled a token outside the top-k / nucleus set"
  np.testing.assert_allclose(sample.logp, got, atol=2e-5)
  # The filter actually bites: the kept set is smaller than the vocabulary.
  assert np.all(np.sum(np.isfinite(ref), -1) <= 8)


def test_determinism_and_key_dependence(model):
  cfg = text.SamplingConfig(max_len=T, stop_id=7, pad_id=PAD_ID)
  a, _, _ = run(model, cfg, PROMPTS, 6, key=1)
  b, _, _ = run(model, cfg, PROMPTS, 6, key=1)
  c, _, _ = run(model, cfg, PROMPTS, 6, key=2)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logp, b.logp)
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_append_token_layout(model):
  cfg = text.SamplingConfig(max_len=T, stop_id=7, pad_id=PAD_ID)
  toks, mask = left_pad(PROMPTS, 6)
  sample = text.sample_text(model, toks, mask, jax.random.key(0), cfg)
  pos = jnp.sum(mask, 1) + jnp.sum(sample.mask, 1)
  cache = text.append_token(model, sample.cache, VS_ID, 6 + T, pos)
  lay = context_layout(toks, mask, sample.tokens, sample.mask, VS_ID, PAD_ID)
  np.testing.assert_array_equal(cache.valid, lay.valid)
  full = model(lay.tokens, lay.positions, lay.valid)
  v = np.asarray(lay.valid)
  np.testing.assert_allclose(np.asarray(cache.k)[:, v], np.asarray(full.text_k)[:, v], atol=1e-5)
  np.testing.assert_allclose(np.asarray(cache.v)[:, v], np.asarray(full.text_v)[:, v], atol=1e-5)


def test_config_validation():
  with pytest.raises(ValueError, match="top_p"):
    text.SamplingConfig(max_len=4, stop_id=1, pad_id=0, top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    text.SamplingConfig(max_len=4, stop_id=1, pad_id=0, temperature=0.0)
  with pytest.raises(ValueError, match="max_len"):
    text.SamplingConfig(max_len=0, stop_id=1, pad_id=0)
  assert dataclasses.replace(text.SamplingConfig(max_len=4, stop_id=1, pad_id=0), greedy=True)
