"""``rollout.decode_min_window``: one decode loop over the whole cache (0) samples the same
trajectory as the windowed loops, and the compiled rollout holds one decode loop fewer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unigrpo_jax import parallel as par
from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.rollout import text
from unigrpo_jax.rollout.program import RolloutConfig, make_rollout

FAST = {"xla_backend_optimization_level": 0}
PROMPT, REASONING = 4, 24


def test_one_decode_window_samples_the_same_trajectory_with_one_loop_fewer():
  # P = 4, T = 24: with a first window of 4 slots the loop runs in widths 10 and 28.
  assert text.attention_windows(PROMPT, REASONING, PROMPT + REASONING + 1, 4) == [10, 28]
  cfg = get_preset("tiny")
  mesh = par.make_mesh(2, 2, 1, devices=jax.devices()[:4])
  graphdef, state = par.create_sharded_model(cfg, 0, mesh, model_fn=UnifiedModel,
                                             compiler_options=FAST)
  prompts = jax.random.randint(jax.random.key(2), (2, PROMPT), 3, cfg.vocab_size)
  mask = jnp.ones((2, PROMPT), bool)
  out, loops = [], []
  for min_window in (4, 0):
    rcfg = RolloutConfig(group_size=2, max_reasoning_len=REASONING, stop_id=1, pad_id=0,
                         vision_start_id=2, num_steps=3, window_range=(0, 2), window_size=1,
                         decode_min_window=min_window)
    rollout = make_rollout(graphdef, rcfg, PatchAutoencoder.for_model(cfg), mesh=mesh)
    lowered = rollout.lower(state, prompts, mask, jax.random.key(3))
    loops.append(lowered.as_text().count("stablehlo.while"))
    out.append(jax.device_get(lowered.compile(FAST)(state, prompts, mask, jax.random.key(3))))
  assert loops[1] == loops[0] - 1, loops
  np.testing.assert_array_equal(out[0].reasoning_tokens, out[1].reasoning_tokens)
  for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_negative_decode_min_window_is_refused():
  with pytest.raises(ValueError, match="decode_min_window"):
    RolloutConfig(group_size=2, max_reasoning_len=4, stop_id=1, pad_id=0, vision_start_id=2,
                  num_steps=3, window_range=(0, 2), window_size=1, decode_min_window=-1)
