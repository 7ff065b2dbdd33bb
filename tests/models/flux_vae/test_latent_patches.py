"""BAGEL-order 2x2 patchify against a literal NumPy transcription of BAGEL's torch code."""
import numpy as np
import pytest

from unigrpo_jax.models.flux_vae.patches import patchify, unpatchify


def bagel_patchify(latent_chw, h, w):
  """BAGEL forward_cache_update_vae, one image: [C, 2h, 2w] -> [h*w, 4C]."""
  c = latent_chw.shape[0]
  x = latent_chw[:, :h * 2, :w * 2].reshape(c, h, 2, w, 2)
  return np.einsum("chpwq->hwpqc", x).reshape(h * w, 4 * c)


def bagel_unpatchify(tokens, h, w, c):
  """BAGEL inferencer.decode_image: [h*w, 4C] -> [C, 2h, 2w]."""
  x = tokens.reshape(1, h, w, 2, 2, c)
  return np.einsum("nhwpqc->nchpwq", x).reshape(1, c, h * 2, w * 2)[0]


def test_patchify_matches_bagel_einsum():
  rng = np.random.default_rng(0)
  b, h, w, c = 3, 3, 5, 7             # non-square, odd channel count
  lat = rng.standard_normal((b, 2 * h, 2 * w, c)).astype(np.float32)
  tok = np.asarray(patchify(lat))
  assert tok.shape == (b, h * w, 4 * c)
  for i in range(b):
    np.testing.assert_array_equal(tok[i], bagel_patchify(lat[i].transpose(2, 0, 1), h, w))
  # The documented index formula, on one element: token row*w+col, feature p*2C + q*C + ch.
  row, col, p, q, ch = 2, 3, 1, 0, 4
  assert tok[1, row * w + col, p * 2 * c + q * c + ch] == lat[1, 2 * row + p, 2 * col + q, ch]


def test_unpatchify_matches_bagel_and_inverts():
  rng = np.random.default_rng(1)
  b, h, w, c = 2, 4, 3, 16
  tok = rng.standard_normal((b, h * w, 4 * c)).astype(np.float32)
  lat = np.asarray(unpatchify(tok, h, w))
  assert lat.shape == (b, 2 * h, 2 * w, c)
  for i in range(b):
    np.testing.assert_array_equal(lat[i].transpose(2, 0, 1), bagel_unpatchify(tok[i], h, w, c))
  np.testing.assert_array_equal(np.asarray(patchify(lat)), tok)


def test_not_flux_channel_major_packing():
  lat = np.arange(2 * 2 * 3, dtype=np.float32).reshape(1, 2, 2, 3)
  flux = lat[0].transpose(2, 0, 1).reshape(1, 12)     # "(c ph pw)": channel slowest
  assert not np.array_equal(np.asarray(patchify(lat))[0], flux)


@pytest.mark.parametrize("shape", [(1, 3, 4, 2), (1, 4, 4)])
def test_patchify_bad_shapes(shape):
  with pytest.raises(ValueError, match="patchify"):
    patchify(np.zeros(shape, np.float32))


def test_unpatchify_bad_shapes():
  with pytest.raises(ValueError, match="h\\*w"):
    unpatchify(np.zeros((1, 6, 8), np.float32), 2, 2)
