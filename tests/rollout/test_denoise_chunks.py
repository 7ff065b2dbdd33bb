"""``rollout.denoise_chunks``: the denoising call in sequential row chunks gives the same
trajectory as one call over every row (on a mesh, with rows split over 4 batch shards)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unigrpo_jax import parallel as par
from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.rollout.program import RolloutConfig, RowChunks, make_rollout

FAST = {"xla_backend_optimization_level": 0}


def test_row_chunks_split_and_merge_are_inverse_and_keep_rows_on_their_shard():
  mesh = par.make_mesh(2, 2, 1, devices=jax.devices()[:4])
  chunks = RowChunks(16, 2, mesh)
  x = jnp.arange(16 * 3).reshape(16, 3)
  pieces = chunks.split(x)
  assert pieces.shape == (2, 8, 3)
  # chunk 0 holds the first 2 rows of each of the 4 shards' blocks of 4 rows
  np.testing.assert_array_equal(pieces[0, :, 0] // 3, [0, 1, 4, 5, 8, 9, 12, 13])
  np.testing.assert_array_equal(chunks.merge(pieces), x)
  with pytest.raises(ValueError, match="denoise_chunks=3"):
    RowChunks(16, 3, mesh)


def test_chunked_denoising_equals_one_call():
  cfg = get_preset("tiny")
  mesh = par.make_mesh(2, 2, 1, devices=jax.devices()[:4])
  graphdef, state = par.create_sharded_model(cfg, 0, mesh, model_fn=UnifiedModel,
                                             compiler_options=FAST)
  kernel = state["latent_io"]["llm2vae_kernel"]  # zero at init: make the velocity non-zero
  kernel.set_value(0.1 * jax.random.normal(jax.random.key(1), kernel.get_value().shape))
  prompts = jax.random.randint(jax.random.key(2), (4, 4), 3, cfg.vocab_size)
  mask = jnp.ones((4, 4), bool)
  out = []
  for chunks in (1, 2):
    rcfg = RolloutConfig(group_size=4, max_reasoning_len=4, stop_id=1, pad_id=0,
                         vision_start_id=2, num_steps=4, window_range=(0, 3), window_size=2,
                         denoise_chunks=chunks)
    rollout = make_rollout(graphdef, rcfg, PatchAutoencoder.for_model(cfg), mesh=mesh)
    traj = rollout.lower(state, prompts, mask, jax.random.key(3)).compile(FAST)(
        state, prompts, mask, jax.random.key(3))
    out.append(jax.device_get(traj))
  for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
