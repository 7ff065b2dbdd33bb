"""The decode loop never copies its KV cache: checked on XLA's optimized HLO, and by donation.

Before the in-place cache (one stacked [L, B, S, Hkv, D] array, read per layer, concatenated
with the new key and written back after all layers), XLA's copy insertion copied the whole stacked
cache twice for keys and twice for values in every loop iteration, and every layer concatenated
(copied) its slice. ``benchmarks/hlo_copies.py`` finds both kinds in the compiled text.
"""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent.parent))
from benchmarks import hlo_copies  # noqa: E402
from unigrpo_jax.models.unified.kv_cache import KVCache  # noqa: E402
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.rollout import text  # noqa: E402

B, P, T = 2, 5, 8
S = P + T + 1
# Qwen2-style grouped heads (4 query / 2 kv heads), two layers: enough to see per-layer buffers.
CFG = get_preset("tiny", vocab_size=192, hidden=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 mlp_dim=128, qk_norm=False)
SAMPLING = text.SamplingConfig(max_len=T, stop_id=CFG.vocab_size, pad_id=0)
LAYER_BUFFER = B * CFG.num_kv_heads * S * CFG.resolved_head_dim


@pytest.fixture(scope="module")
def split_model():
  return nnx.split(UnifiedModel(CFG, nnx.Rngs(0)))


def _prompts():
  tokens = jax.random.randint(jax.random.key(1), (B, P), 3, CFG.vocab_size, jnp.int32)
  return tokens, jnp.ones((B, P), bool)


def _assert_no_cache_copies(hlo: str):
  assert hlo_copies.while_bodies(hlo), "no while loop in the compiled decode"
  copies = hlo_copies.cache_copies(hlo, LAYER_BUFFER)
  assert copies == [], f"cache-sized copies in the decode loop body: {copies}"
  made = hlo_copies.cache_materialisations(hlo, LAYER_BUFFER, S)
  assert made == [], f"cache-sized arrays built in the decode loop body: {made}"


def test_sampler_decode_loop_has_no_cache_copies(split_model):
  graphdef, state = split_model
  tokens, mask = _prompts()
  sampler = text.make_text_sampler(graphdef, SAMPLING)
  _assert_no_cache_copies(sampler.lower(state, tokens, mask, jax.random.key(0)).compile()
                          .as_text())


def test_donated_decode_has_no_cache_copies_and_reuses_the_buffers(split_model):
  graphdef, state = split_model
  tokens, mask = _prompts()
  prefill_fn, decode_fn = text.make_prefill_decode(graphdef, SAMPLING)
  cache, last = prefill_fn(state, tokens, mask)
  assert cache.k[0].shape == (B, CFG.num_kv_heads, S, CFG.resolved_head_dim)
  compiled = decode_fn.lower(state, cache, last, mask, jax.random.key(0)).compile()
  _assert_no_cache_copies(compiled.as_text())
  # Same tokens as the one-call sampler, and the donated cache was consumed (not copied).
  sample = decode_fn(state, cache, last, mask, jax.random.key(0))
  whole = text.make_text_sampler(graphdef, SAMPLING)(state, tokens, mask, jax.random.key(0))
  np.testing.assert_array_equal(sample.tokens, whole.tokens)
  assert all(buf.is_deleted() for buf in cache.k + cache.v)


def test_windowed_decode_same_sample_and_no_copies(split_model):
  """Several attention windows (a loop each, cache regrown between them) give the same tokens,
  log-probs and final cache as one loop over the whole cache, and no loop copies its cache."""
  graphdef, state = split_model
  tokens, mask = _prompts()
  s_long, window = 24, 6
  widths = text.attention_windows(P, T, s_long, window)
  assert widths == [12, P + T], widths
  outs = []
  for w in (window, 0):
    prefill_fn, decode_fn = text.make_prefill_decode(graphdef, SAMPLING, cache_len=s_long,
                                                     min_window=w)
    cache, last = prefill_fn(state, tokens, mask)
    if w:
      hlo = decode_fn.lower(state, cache, last, mask, jax.random.key(0)).compile().as_text()
      assert len(hlo_copies.while_bodies(hlo)) >= len(widths)
      layer = B * CFG.num_kv_heads * min(widths) * CFG.resolved_head_dim
      assert hlo_copies.cache_copies(hlo, layer) == []
      assert hlo_copies.cache_materialisations(hlo, layer, widths) == []
    outs.append(decode_fn(state, cache, last, mask, jax.random.key(0)))
  windowed, whole = outs
  assert windowed.cache.length == s_long
  np.testing.assert_array_equal(windowed.tokens, whole.tokens)
  np.testing.assert_allclose(windowed.logp, whole.logp, atol=1e-5)
  np.testing.assert_array_equal(windowed.cache.valid, whole.cache.valid)
  for got, want in zip(windowed.cache.stacked(), whole.cache.stacked()):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_attention_windows():
  assert text.attention_windows(32, 64, 97) == [97]  # small caches: one loop
  assert text.attention_windows(16, 64, 1024) == [80]  # never wider than the slots in use
  assert text.attention_windows(16, 1024, 1041) == [128, 192, 320, 512, 768, 1040]
  assert text.attention_windows(16, 1024, 1041, min_window=0) == [1041]


def test_audit_finds_copies_of_a_stacked_concatenated_cache():
  """The audit is not vacuous: the old decode step's pattern (stacked cache, per-layer read,
  concatenate the new slot, write all layers back after the loop body's layers) is flagged."""
  layers, hkv, d = 2, 2, 16

  def body(carry):
    step, k = carry
    new = []
    for i in range(layers):
      keys = jnp.concatenate([k[i], jnp.ones((B, hkv, 1, d))], axis=2)  # [B, Hkv, S + 1, D]
      new.append(keys[:, :, :1] * jnp.sum(keys))
    k = jax.lax.dynamic_update_slice(k, jnp.stack(new), (0, 0, 0, step, 0))
    return step + 1, k

  fn = jax.jit(lambda k: jax.lax.while_loop(lambda c: c[0] < T, body, (jnp.int32(P), k)))
  hlo = fn.lower(jnp.zeros((layers, B, hkv, S, d))).compile().as_text()
  found = (hlo_copies.cache_copies(hlo, B * hkv * S * d)
           + hlo_copies.cache_materialisations(hlo, B * hkv * S * d, S))
  assert found, "the audit missed the concatenated cache"


def test_cache_slot_needs_a_cache_and_text_only(split_model):
  model = nnx.merge(*split_model)
  tokens, mask = _prompts()
  pos = jnp.broadcast_to(jnp.arange(P), (B, P))
  with pytest.raises(ValueError, match="cache_slot needs a cache"):
    model(tokens, pos, mask, cache_slot=0)
  cache = KVCache.zeros(CFG, B, S)
  x = jnp.zeros((B, CFG.num_image_tokens, CFG.latent_dim))
  with pytest.raises(ValueError, match="cache_slot needs a cache"):
    model(tokens, pos, mask, latents=x, times=jnp.zeros((B,)), image_position=pos[:, -1],
          cache=cache, cache_slot=0)


def test_scanned_layer_stack_keeps_the_decode_copy_free(split_model):
  """With ``scan_layers`` (the pod configs: stacked [L, ...] params) the prefill runs as one
  scan, but the decode loop keeps its per-layer cache buffers and in-place writes, reading
  each layer's slice of the stacked weights: no cache copies, the same tokens."""
  graphdef, state = split_model
  scan_graphdef, scan_state = nnx.split(UnifiedModel(CFG.replace(scan_layers=True, remat=True),
                                                     nnx.Rngs(0)))  # same values as state
  tokens, mask = _prompts()
  sampler = text.make_text_sampler(scan_graphdef, SAMPLING)
  _assert_no_cache_copies(sampler.lower(scan_state, tokens, mask, jax.random.key(0)).compile()
                          .as_text())
  scanned = sampler(scan_state, tokens, mask, jax.random.key(0))
  looped = text.make_text_sampler(graphdef, SAMPLING)(state, tokens, mask, jax.random.key(0))
  np.testing.assert_array_equal(scanned.tokens, looped.tokens)
  np.testing.assert_allclose(scanned.logp, looped.logp, atol=1e-5)
  # Nor does the loop copy the weights: each layer's weights are sliced out of the stacked
  # arrays once per decode call, not in every step (inside the loop XLA materialised the slices).
  prefill_fn, decode_fn = text.make_prefill_decode(scan_graphdef, SAMPLING)
  cache, last = prefill_fn(scan_state, tokens, mask)
  hlo = decode_fn.lower(scan_state, cache, last, mask, jax.random.key(0)).compile().as_text()
  mlp = {f"{CFG.hidden},{CFG.mlp_dim}", f"{CFG.mlp_dim},{CFG.hidden}"}  # a layer's MLP weights
  comps = hlo_copies.split_computations(hlo)
  in_loops = set().union(*hlo_copies.while_bodies(hlo).values())
  assert in_loops
  made = [line.strip()[:120] for name in in_loops for line in comps[name]
          if (m := hlo_copies._INSTR.search(line)) and m.group(2) in mlp
          and m.group(3) not in ("parameter", "get-tuple-element", "bitcast", "tuple")]
  assert made == [], made


def test_scanned_rollout_stacks_the_cache_once_outside_the_denoising_loop():
  """With ``scan_layers`` every denoising call reads the cache as [L, ...] arrays (the scan's
  input). The stack is loop-invariant: XLA must build it once per rollout, outside every while
  loop, not once per denoising step (25 copies of the cache per rollout at BAGEL's settings)."""
  from unigrpo_jax.models.autoencoder import PatchAutoencoder
  from unigrpo_jax.rollout.program import RolloutConfig, make_rollout
  cfg = CFG.replace(scan_layers=True, num_layers=3)
  rollout_cfg = RolloutConfig(group_size=2, max_reasoning_len=T, stop_id=cfg.vocab_size, pad_id=0,
                              vision_start_id=2, num_steps=6, shift=3.0, noise_level=0.8,
                              window_range=(0, 5), window_size=3)
  graphdef, state = nnx.split(UnifiedModel(cfg, nnx.Rngs(0)))
  rollout = make_rollout(graphdef, rollout_cfg, PatchAutoencoder.for_model(cfg))
  tokens, mask = _prompts()
  hlo = rollout.lower(state, tokens, mask, jax.random.key(0)).compile().as_text()
  rows = B * rollout_cfg.group_size
  stacked = f"[{cfg.num_layers},{rows},{cfg.num_kv_heads},{S},{cfg.resolved_head_dim}]"
  comps = hlo_copies.split_computations(hlo)
  builds = [(name, line) for name, lines in comps.items() for line in lines
            if f"{stacked}" in line.split("=", 1)[-1].split("(", 1)[0] and "concatenate" in line]
  assert builds, f"no {stacked} stack of the cache found (did the layout change?)"
  in_loops = set().union(*hlo_copies.while_bodies(hlo).values())
  assert not [n for n, _ in builds if n in in_loops], [l for n, l in builds if n in in_loops]
