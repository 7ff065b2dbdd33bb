"""The rollout's VAE decode in per-device steps (``rollout.decode_rows``) gives the images of the
one-shot decode, row for row, on a mesh and without one."""
import jax
import numpy as np
import pytest

from unigrpo_jax import parallel
from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.rollout.program import RolloutConfig, decode_in_steps


@pytest.mark.parametrize("rows,with_mesh", [(1, True), (2, True), (3, False), (5, True)])
def test_stepped_decode_equals_one_shot(rows, with_mesh):
  cfg = get_preset("tiny")
  ae = PatchAutoencoder.for_model(cfg)
  latents = jax.random.normal(jax.random.key(0), (48, cfg.num_image_tokens, cfg.latent_dim))
  mesh = parallel.make_mesh(data=-1) if with_mesh else None  # 8 devices: 6 rows each
  want = np.asarray(ae.decode(latents))
  fn = jax.jit(lambda x: decode_in_steps(ae, x, None, rows, mesh))
  np.testing.assert_allclose(np.asarray(fn(latents)), want, rtol=1e-6, atol=1e-6)
  hlo = fn.lower(latents).as_text()
  # rows 5 divides no device's 6-row block: decoded at once; the others loop over steps.
  assert ("while" in hlo) == (rows != 5 and (6 if with_mesh else 48) // rows > 1)


def test_bad_decode_rows_is_refused():
  with pytest.raises(ValueError, match="decode_rows"):
    RolloutConfig(group_size=2, max_reasoning_len=4, stop_id=1, pad_id=0, vision_start_id=2,
                  decode_rows=-1)
