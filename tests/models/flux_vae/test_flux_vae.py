"""FLUX VAE: parity with diffusers' AutoencoderKL (committed fixture), loader errors, random writer.

The fixture (tests/fixtures/make_flux_vae_fixture.py, run once with torch + diffusers) is a
random 4-level VAE with widths 8/16/16/32, 4 groups, 2 res blocks, every norm/bias perturbed.
"""
import json
import logging
import os
import struct

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from unigrpo_jax.models.flux_vae import model as fv
from unigrpo_jax.models import safetensors_io
from unigrpo_jax.models.autoencoder import Autoencoder
from unigrpo_jax.models.flux_vae import autoencoder as flux_autoencoder, weights as flux_weights
from unigrpo_jax.testing.flux_vae_fixture import write_random_flux_ae

FIX = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "flux_vae_tiny")
BFL = os.path.join(FIX, "ae.safetensors")
DIFF = os.path.join(FIX, "ae_diffusers.safetensors")
SCALE, SHIFT = 0.3611, 0.1159


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(os.path.join(FIX, "parity.npz")))


@pytest.fixture(scope="module")
def ae():
  return flux_weights.load_flux_vae(BFL, num_groups=4)


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def test_infers_architecture(ae):
  assert ae.cfg == fv.FluxVAEConfig(ch=8, ch_mult=(1, 2, 2, 4), num_res_blocks=2, z_channels=16,
                                    in_channels=3, out_channels=3, num_groups=4)
  assert isinstance(ae, Autoencoder) and ae.latent_dim == 64


def test_encode_mean_matches_diffusers(ae, ref):
  z = ae.encode(ref["images"])
  assert z.shape == (2, 5, 3, 16) and z.dtype == np.float32
  assert _rel(z, (ref["mean"] - SHIFT) * SCALE) < 1e-4


def test_encode_sample_uses_logvar(ae, ref):
  key = jax.random.key(7)
  noise = np.asarray(jax.random.normal(key, ref["mean"].shape))
  want = (ref["mean"] + np.exp(0.5 * ref["logvar"]) * noise - SHIFT) * SCALE
  assert _rel(ae.encode(ref["images"], key=key), want) < 1e-4


def test_decode_matches_diffusers(ae, ref):
  out = ae.decode(ref["latents_in"])
  assert out.shape == (2, 40, 24, 3)
  assert _rel(out, ref["decoded"]) < 1e-4


def test_diffusers_names_load_the_same_weights(ae, ref):
  ae_d = flux_weights.load_flux_vae(DIFF, num_groups=4)
  assert ae_d.cfg == ae.cfg
  for a, b in zip(jax.tree.leaves(ae.state), jax.tree.leaves(ae_d.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _rel(ae_d.decode(ref["latents_in"]), ref["decoded"]) < 1e-4   # shares ae's compile


def test_decode_accepts_bagel_tokens_inside_jit_like_the_rollout(ae):
  lat = np.random.default_rng(0).standard_normal((2, 4, 4, 16)).astype(np.float32)
  from unigrpo_jax.models.flux_vae.patches import patchify
  tokens = patchify(lat)                                      # [2, 4, 64], as the sampler's x0
  inside = jax.jit(lambda t: ae.decode(t))(tokens)
  np.testing.assert_allclose(np.asarray(inside), np.asarray(ae.decode(lat)), rtol=1e-5, atol=1e-5)
  # Weights passed through as an argument (not baked in as constants) give the same images.
  as_arg = jax.jit(lambda st, t: ae.decode(t, state=st))(ae.state, tokens)
  np.testing.assert_allclose(np.asarray(as_arg), np.asarray(inside), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bfloat16_load_runs(ref):
  ae16 = flux_weights.load_flux_vae(BFL, num_groups=4, dtype="bfloat16")
  assert flux_autoencoder.state_dtype(ae16.state) == np.dtype("bfloat16")
  assert _rel(ae16.decode(ref["latents_in"]), ref["decoded"]) < 0.1


def test_write_random_loads_and_shapes(tmp_path):
  path = write_random_flux_ae(str(tmp_path) + "/", ch=32, ch_mult=(1, 2, 2, 2),
                                 num_res_blocks=1, seed=3)
  assert path == str(tmp_path / "ae.safetensors")
  ae = flux_weights.load_flux_vae(str(tmp_path), image_size=32)    # directory form
  assert ae.cfg.ch_mult == (1, 2, 2, 2) and ae.cfg.num_res_blocks == 1 and ae.num_tokens == 4
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 16, 3)).astype(np.float32)
  z = ae.encode(x)
  assert z.shape == (2, 4, 2, 16) and np.all(np.isfinite(z))
  y = ae.decode(z)
  assert y.shape == (2, 32, 16, 3) and np.all(np.isfinite(y)) and float(np.std(y)) > 1e-3
  assert ae.encode_tokens(x).shape == (2, 2, 64)


# ---- bad input: one line naming the file and key ---------------------------------------------


def _write(path, tensors):
  save_file(tensors, str(path))
  return str(path)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    flux_weights.load_flux_vae(str(tmp_path / "nope.safetensors"))


def test_truncated_file(tmp_path):
  data = open(BFL, "rb").read()
  bad = tmp_path / "ae.safetensors"
  bad.write_bytes(data[:len(data) - 1000])
  with pytest.raises(ValueError, match=r"ae\.safetensors: truncated: tensor '.*'"):
    flux_weights.load_flux_vae(str(bad), num_groups=4)


def test_missing_key(tmp_path):
  t = load_file(BFL)
  del t["decoder.up.2.block.1.conv2.bias"]
  p = _write(tmp_path / "ae.safetensors", t)
  with pytest.raises(ValueError,
                     match=r"missing 1 tensor.*'decoder\.up\.2\.block\.1\.conv2\.bias'"):
    flux_weights.load_flux_vae(p, num_groups=4)


def test_wrong_shape_names_key_expected_and_found(tmp_path):
  t = load_file(BFL)
  t["encoder.mid.attn_1.k.weight"] = np.zeros((32, 16, 1, 1), np.float32)
  p = _write(tmp_path / "ae.safetensors", t)
  with pytest.raises(ValueError, match=r"'encoder\.mid\.attn_1\.k\.weight' has shape "
                                       r"\[32, 16, 1, 1\], expected \[32, 32, 1, 1\]"):
    flux_weights.load_flux_vae(p, num_groups=4)


def test_unexpected_keys_listed_once_not_fatal(tmp_path, caplog):
  t = load_file(BFL)
  t["encoder.extra.weight"] = np.zeros(3, np.float32)
  t["decoder.up.0.attn.bias"] = np.zeros(3, np.float32)
  p = _write(tmp_path / "ae.safetensors", t)
  with caplog.at_level(logging.WARNING, logger="unigrpo_jax.models.flux_vae.model"):
    flux_weights.load_flux_vae(p, num_groups=4)
  msgs = [r.getMessage() for r in caplog.records if "unexpected" in r.getMessage()]
  assert len(msgs) == 1
  assert "encoder.extra.weight" in msgs[0] and "decoder.up.0.attn.bias" in msgs[0]


def test_diffusers_wrong_shape_names_the_files_key(tmp_path):
  t = load_file(DIFF)
  t["decoder.up_blocks.0.resnets.1.conv1.bias"] = np.zeros(5, np.float32)
  p = _write(tmp_path / "ae.safetensors", t)
  want = (r"'decoder\.up_blocks\.0\.resnets\.1\.conv1\.bias' \(BFL "
          r"'decoder\.up\.3\.block\.1\.conv1\.bias'\) has shape \[5\]")
  with pytest.raises(ValueError, match=want):
    flux_weights.load_flux_vae(p, num_groups=4)


def test_architecture_tensor_with_wrong_rank(tmp_path):
  t = load_file(BFL)
  t["decoder.conv_in.weight"] = t["decoder.conv_in.weight"].reshape(32, -1)
  p = _write(tmp_path / "ae.safetensors", t)
  with pytest.raises(ValueError, match=r"'decoder\.conv_in\.weight' has shape \[32, 144\], "
                                       r"expected a 4-D"):
    flux_weights.load_flux_vae(p, num_groups=4)


def test_quant_conv_rejected(tmp_path):
  t = load_file(BFL)
  t["quant_conv.weight"] = np.zeros((32, 32, 1, 1), np.float32)
  p = _write(tmp_path / "ae.safetensors", t)
  with pytest.raises(ValueError, match="quant_conv.weight"):
    flux_weights.load_flux_vae(p, num_groups=4)


def test_groups_must_divide_widths():
  with pytest.raises(ValueError,
                     match=r"ae\.safetensors: .*width 8 is not divisible by num_groups=32"):
    flux_weights.load_flux_vae(BFL)     # FLUX's default 32 groups cannot hold the 8-wide fixture


def test_bad_image_shape(ae):
  with pytest.raises(ValueError, match="multiples of 8"):
    ae.encode(np.zeros((1, 12, 16, 3), np.float32))


def test_header_reader_rejects_garbage(tmp_path):
  p = tmp_path / "ae.safetensors"
  p.write_bytes(struct.pack("<Q", 10) + b"not json!!")
  with pytest.raises(ValueError, match="unreadable safetensors header"):
    safetensors_io.read_header(str(p))
  header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
  p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
  with pytest.raises(ValueError, match="truncated: tensor 'x'"):
    safetensors_io.read_header(str(p))



def _save_bf16(path, tensors):
  """A safetensors file with BF16 tensors (numpy cannot write them; build the bytes by hand)."""
  import ml_dtypes
  header, blobs, off = {}, [], 0
  for k, v in tensors.items():
    b = np.ascontiguousarray(v.astype(ml_dtypes.bfloat16)).tobytes()
    header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
  h = json.dumps(header).encode()
  with open(path, "wb") as fh:
    fh.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_bf16_file_loads_exact_values(tmp_path, ae):
  import ml_dtypes
  t = load_file(BFL)
  p = str(tmp_path / "ae.safetensors")
  _save_bf16(p, t)
  ae_b = flux_weights.load_flux_vae(p, num_groups=4)             # BF16 file -> float32 weights
  assert ae_b.cfg == ae.cfg
  for a, b in zip(jax.tree.leaves(ae.state), jax.tree.leaves(ae_b.state)):
    want = np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(b), want)


@pytest.mark.slow
def test_rollout_decodes_with_the_flux_vae(tmp_path):
  """The jitted rollout takes the FLUX VAE where it took PatchAutoencoder: 64-wide BAGEL tokens
  (16 latent channels, 2x2 patches) in, 3-channel pixels out."""
  from flax import nnx
  from unigrpo_jax.models.unified.model import UnifiedModel
  from unigrpo_jax.models.unified.config import get_preset
  from unigrpo_jax.rollout.program import RolloutConfig, make_rollout
  write_random_flux_ae(str(tmp_path) + "/", ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
  ae = flux_weights.load_flux_vae(str(tmp_path), image_size=32)
  mcfg = get_preset("tiny", image_size=32, image_channels=16, vae_downsample=8, patch_size=2)
  assert (mcfg.latent_dim, mcfg.num_image_tokens) == (ae.latent_dim, ae.num_tokens)
  graphdef, state = nnx.split(UnifiedModel(mcfg, nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), state)
  cfg = RolloutConfig(group_size=2, max_reasoning_len=3, stop_id=9, pad_id=0, vision_start_id=2,
                      num_steps=3, shift=3.0, noise_level=0.8, window_range=(0, 2), window_size=1)
  prompts = np.asarray([[11, 12, 13]], np.int32)
  traj = make_rollout(graphdef, cfg, ae)(state, prompts, prompts > 0, jax.random.key(0))
  assert traj.latents.shape == (2, 4, 64) and traj.images.shape == (2, 32, 32, 3)
  want = np.clip(np.asarray(ae.decode(traj.latents)), -1, 1)
  np.testing.assert_allclose(np.asarray(traj.images), want, rtol=1e-4, atol=1e-4)
