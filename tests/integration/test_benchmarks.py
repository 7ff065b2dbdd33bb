"""The benchmark's analytic FLOP counter agrees with XLA's cost analysis (nothing is timed)."""
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent.parent))
from benchmarks import flops  # noqa: E402
from unigrpo_jax.models.unified.kv_cache import KVCache  # noqa: E402
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.models.unified.config import get_preset


def _xla_flops(fn, *args) -> float:
  return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


@pytest.mark.parametrize("logits", [True, False])
def test_forward_flops_match_xla_cost_analysis(logits):
  """Packed forward (text over a cache + image blocks) of the tiny preset, shapes chosen so that
  attention (>10%) and the LM head (>7%) weigh enough that a wrong term leaves the band.
  With ``logits=False`` XLA drops the last layer's dead text work, as the counter assumes."""
  cfg = get_preset("tiny")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: UnifiedModel(cfg, nnx.Rngs(0))))
  b, lt, s, k = 2, 96, 24, 2
  sds = jax.ShapeDtypeStruct
  args = (state, sds((b, lt), jnp.int32), sds((b, k, cfg.num_image_tokens, cfg.latent_dim),
                                             jnp.float32), sds((b, k), jnp.float32))

  def forward(state, tokens, latents, times):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(s + jnp.arange(lt), tokens.shape)
    cache = KVCache.zeros(cfg, b, s)
    out = model(tokens, positions, latents=latents, times=times,
                image_position=jnp.full((b,), s + lt), cache=cache, compute_logits=logits)
    return out.logits, out.velocity, out.text_k

  analytic = flops.forward(cfg, batch=b, text_len=lt, cache_len=s, num_blocks=k, logits=logits)
  parts = analytic.as_dict()
  assert parts["text_attention"] + parts["image_attention"] > 0.1 * analytic.total
  if logits:
    assert parts["lm_head"] > 0.07 * analytic.total
  xla = _xla_flops(forward, *args)
  # Only matmuls are counted; XLA adds the elementwise ops (norms, RoPE, softmax): a few %.
  print(analytic.total / xla)
  assert 0.85 < analytic.total / xla <= 1.0, (analytic.total, xla, parts)


def test_decode_bytes_follow_the_cache_length_in_use():
  """The decode bound reads, per step, the slots of the attention window the step runs in."""
  cfg = get_preset("tiny")
  per_slot = 2 * cfg.num_layers * 3 * cfg.num_kv_heads * cfg.resolved_head_dim * 4  # B = 3, f32
  # A short cache (S = 81 <= MIN_WINDOW): every step reads all S slots.
  short = flops.decode_bytes(cfg, rows=3, prompt_len=16, reasoning_len=64, decode_steps=64)
  assert short["kv_decode_bytes"] == per_slot * 81 * 64
  assert short["kv_cache_bytes"] == per_slot * 81
  # A long one (P 16, T 300, S 317): windows 128 / 192 / 316 cover 112 / 64 / 124 steps.
  assert flops.decode_widths(16, 300, 300, 317)[::100] == [128, 128, 316]
  long = flops.decode_bytes(cfg, rows=3, prompt_len=16, reasoning_len=300, decode_steps=300)
  assert long["kv_decode_bytes"] == per_slot * (112 * 128 + 64 * 192 + 124 * 316)
  assert long["decode_total"] == 300 * long["weight_bytes_per_pass"] + long["kv_decode_bytes"]


def test_the_benchmark_setup_never_stops_decoding_and_passes_validation():
  """``python benchmarks/run.py --quick`` once died at once: its stop id past the vocabulary
  failed RolloutConfig's check against the tokenizer's vocab_limit. The benchmark samples the
  whole table (vocab_limit 0, rollout and train step alike) with the stop id one past it."""
  from benchmarks import run as bench
  setup = bench.build_setup("tiny", "float32", {"warmup": 1, "repeats": 1})
  assert setup.rcfg.vocab_limit == setup.ocfg.vocab_limit == 0  # the whole embedding table
  assert setup.rcfg.stop_id >= setup.cfg.vocab_size  # an id the model has no row for
  assert setup.rcfg.sampling.stop_id == setup.rcfg.stop_id  # SamplingConfig accepts it too
  args = bench.parse_args(["--tiny"])
  assert args.tiny and not args.quick
