"""Foreign checkpoints: parity against transformers' Qwen2 and an independent torch BAGEL forward
(fixtures made once by tests/fixtures/make_*_fixture.py), BAGEL round trips, sharded loading and
bad input. No torch here."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from unigrpo_jax import parallel
from unigrpo_jax.models.unified.kv_cache import KVCache
from unigrpo_jax.models.safetensors_io import CheckpointFormatError
from unigrpo_jax.models.unified.loading import load_bagel, load_qwen2
from unigrpo_jax.models.unified.export import save_bagel

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures")
QWEN, QWEN_TIED, BAGEL = (os.path.join(FIX, n) for n in ("qwen2_tiny", "qwen2_tiny_tied",
                                                         "bagel_tiny"))
MARKERS = dict(vision_start_id=98, vision_end_id=99)
SKIPPED = ("vit_model.", "connector.", "vit_pos_embed.")


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _tensors(path):
  with safe_open(path, framework="numpy") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def _leaves(model):
  return {".".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def bagel():
  return load_bagel(BAGEL, image_size=48, **MARKERS)


@pytest.mark.parametrize("path", [QWEN, QWEN_TIED])
def test_qwen2_logits_match_transformers(path):
  model = load_qwen2(path, vision_start_id=1, vision_end_id=2)
  ref = np.load(os.path.join(path, "reference.npz"))
  ids = jnp.asarray(ref["input_ids"], jnp.int32)
  logits = model(ids, jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)).logits
  assert _rel(logits, ref["logits"]) < 1e-4
  assert model.cfg.tie_embeddings == (path == QWEN_TIED)
  assert (model.cfg.rope_theta, model.cfg.rms_eps, model.cfg.num_kv_heads) == (1e4, 1e-5, 2)


def test_qwen2_mot_copies_the_understanding_expert():
  model = load_qwen2(QWEN, mot=True, vision_start_id=1, vision_end_id=2)
  leaves = _leaves(model)
  for name, value in leaves.items():
    if ".gen." in name:
      np.testing.assert_array_equal(value, leaves[name.replace(".gen.", ".und.")])
  np.testing.assert_array_equal(leaves["gen_norm.scale"], leaves["und_norm.scale"])
  assert not np.any(leaves["latent_io.llm2vae_kernel"])  # fresh head predicts zero velocity


@pytest.mark.parametrize("i", [0, 1])
def test_bagel_forward_matches_reference(bagel, i):
  """Text logits and the image-block velocity, both through the packed call (the train step's
  route) and through a cached context (the rollout's route)."""
  ref = np.load(os.path.join(BAGEL, "reference.npz"))
  ctx = jnp.asarray(ref[f"ctx{i}"], jnp.int32)[None]
  n = ctx.shape[1]
  x, t = jnp.asarray(ref[f"latents{i}"])[None], jnp.asarray([float(ref[f"t{i}"])])
  pos = jnp.arange(n)[None]
  out = bagel(ctx, pos, latents=x, times=t, image_position=jnp.asarray([n]))
  assert _rel(out.logits[0], ref[f"logits{i}"]) < 1e-4
  assert _rel(out.velocity[0], ref[f"velocity{i}"]) < 1e-4
  cache = KVCache.zeros(bagel.cfg, 1, n + 2).write(out.text_k, out.text_v, 0,
                                                   jnp.ones((1, n), bool))
  v = bagel(latents=x, times=t, image_position=jnp.asarray([n]), cache=cache).velocity
  assert _rel(v[0], ref[f"velocity{i}"]) < 1e-4


def test_bagel_round_trip_is_exact(bagel, tmp_path):
  original = _tensors(os.path.join(BAGEL, "ema.safetensors"))
  keys = save_bagel(bagel, str(tmp_path / "f32"), dtype="float32")
  saved = _tensors(str(tmp_path / "f32" / "ema.safetensors"))
  # BAGEL's key set (its ViT/connector aside) with every loaded tensor unchanged, bit for bit.
  assert set(keys) == set(saved) == {k for k in original if not k.startswith(SKIPPED)}
  for k in saved:
    assert saved[k].dtype == original[k].dtype and saved[k].shape == original[k].shape, k
    np.testing.assert_array_equal(saved[k], original[k], err_msg=k)
  conf = json.load(open(tmp_path / "f32" / "llm_config.json"))
  again = load_bagel(str(tmp_path / "f32"), image_size=48, **MARKERS)
  assert again.cfg == bagel.cfg
  for name, value in _leaves(bagel).items():
    np.testing.assert_array_equal(_leaves(again)[name], value, err_msg=name)
  assert conf["num_key_value_heads"] == 2 and conf["tie_word_embeddings"] is False
  # bfloat16 (the default): save -> load -> save writes the same bytes.
  save_bagel(bagel, str(tmp_path / "bf16"))
  first = _tensors(str(tmp_path / "bf16" / "ema.safetensors"))
  assert first["vae2llm.weight"].dtype.name == "bfloat16"
  save_bagel(load_bagel(str(tmp_path / "bf16"), image_size=48, **MARKERS), str(tmp_path / "b2"))
  second = _tensors(str(tmp_path / "b2" / "ema.safetensors"))
  for k in first:
    np.testing.assert_array_equal(first[k].view(np.uint16), second[k].view(np.uint16), err_msg=k)


def test_save_bagel_with_source_is_a_complete_bagel_file(bagel, tmp_path):
  keys = save_bagel(bagel, str(tmp_path / "full"), dtype="float32", source=BAGEL)
  original = _tensors(os.path.join(BAGEL, "ema.safetensors"))
  saved = _tensors(str(tmp_path / "full" / "ema.safetensors"))
  assert set(keys) == set(saved) == set(original)
  for k in original:
    np.testing.assert_array_equal(saved[k], original[k], err_msg=k)


def test_sharded_load_reads_slices(bagel, tmp_path):
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = load_bagel(BAGEL, image_size=48, mesh=mesh, **MARKERS)
  state = nnx.state(sharded)
  q = state["layers"][0]["gen"]["q"].get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (24, 3, 8)
  want = _leaves(bagel)
  for name, value in _leaves(sharded).items():
    np.testing.assert_array_equal(value, want[name], err_msg=name)
  save_bagel(sharded, str(tmp_path), dtype="float32")  # gathered one tensor at a time
  original = _tensors(os.path.join(BAGEL, "ema.safetensors"))
  for k, v in _tensors(str(tmp_path / "ema.safetensors")).items():
    np.testing.assert_array_equal(v, original[k], err_msg=k)


def test_qwen2_sharded_mesh_load_matches():
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  a = _leaves(load_qwen2(QWEN_TIED, mesh=mesh, vision_start_id=1, vision_end_id=2))
  b = _leaves(load_qwen2(QWEN_TIED, vision_start_id=1, vision_end_id=2))
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _copy(tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(BAGEL, dst)
  return dst


def _edit_config(d, **fields):
  conf = json.load(open(d / "llm_config.json"))
  conf.update(fields)
  json.dump(conf, open(d / "llm_config.json", "w"))


def _rewrite(d, drop=(), add=None):
  tensors = _tensors(str(d / "ema.safetensors"))
  for k in drop:
    del tensors[k]
  tensors.update(add or {})
  save_file(tensors, str(d / "ema.safetensors"))


def _bad(d, match):
  with pytest.raises(CheckpointFormatError, match=match) as e:
    load_bagel(str(d), image_size=48, **MARKERS)
  assert "\n" not in str(e.value)  # one line


def test_bad_input(tmp_path):
  d = _copy(tmp_path)
  os.remove(d / "ema.safetensors")
  _bad(d, r"ema\.safetensors: file not found")
  d = _copy(tmp_path / "2")
  os.remove(d / "llm_config.json")
  _bad(d, r"llm_config\.json: file not found")
  d = _copy(tmp_path / "3")
  _edit_config(d, intermediate_size=90)  # the config contradicts the tensors
  _bad(d, r"'language_model\.model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[88, 48\], "
          r"expected \[90, 48\] from .*llm_config\.json.*intermediate_size=90")
  d = _copy(tmp_path / "4")
  _edit_config(d, model_type="llama", architectures=["LlamaForCausalLM"])
  _bad(d, "unknown architecture")
  d = _copy(tmp_path / "5")
  with open(d / "ema.safetensors", "r+b") as f:
    f.truncate(os.path.getsize(d / "ema.safetensors") - 100)
  _bad(d, "truncated")
  d = _copy(tmp_path / "6")
  _rewrite(d, drop=["language_model.model.layers.1.self_attn.k_norm_moe_gen.weight"])
  _bad(d, r"missing tensor 'language_model\.model\.layers\.1\.self_attn\.k_norm_moe_gen\.weight'")
  d = _copy(tmp_path / "7")
  _edit_config(d, num_key_value_heads=4)  # 6 heads: 4 does not divide them
  _bad(d, "num_kv_heads=4 does not divide")
  with pytest.raises(CheckpointFormatError, match="image_size=128 exceeds"):
    load_bagel(BAGEL, image_size=128, **MARKERS)
  with pytest.raises(CheckpointFormatError, match="vision_start_id=151652 is outside"):
    load_bagel(BAGEL, image_size=48)  # no tokenizer.json: Qwen2.5's ids do not fit vocab 101


def test_qwen2_missing_shard(tmp_path):
  d = tmp_path / "q"
  shutil.copytree(QWEN_TIED, d)
  os.remove(d / "model-00002-of-00004.safetensors")
  with pytest.raises(CheckpointFormatError, match=r"model-00002-of-00004\.safetensors: file not "
                                                  "found"):
    load_qwen2(str(d), vision_start_id=1, vision_end_id=2)


def test_unknown_tensors_are_listed_once(tmp_path, capsys):
  d = _copy(tmp_path)
  _rewrite(d, add={"some.new.head.weight": np.ones((2, 2), np.float32),
                   "another.bias": np.ones(3, np.float32)})
  load_bagel(str(d), image_size=48, **MARKERS)
  err = capsys.readouterr().err
  assert err.count("ignored 2 unknown tensors: another.bias, some.new.head.weight") == 1
  assert err.count("skipped 4 tensors") == 1


def test_progress_lines(monkeypatch, capsys):
  from unigrpo_jax.models.unified import loading as pretrained
  init = pretrained._Progress.__init__
  monkeypatch.setattr(pretrained._Progress, "__init__",
                      lambda self, *a, **kw: init(self, *a, **{**kw, "every_s": 0.0}))
  load_bagel(BAGEL, image_size=48, **MARKERS)
  lines = [l for l in capsys.readouterr().err.splitlines() if " tensors, " in l]
  n = len(pretrained.bagel_key_map(pretrained.bagel_config(BAGEL, image_size=48, **MARKERS)))
  assert lines[-1].split(": ")[1].startswith(f"{n}/{n} tensors, 0.00/0.00 GB")


def test_save_bagel_refuses_non_bagel_models(tmp_path):
  model = load_qwen2(QWEN, vision_start_id=1, vision_end_id=2)  # no MoT, no QK-norm
  with pytest.raises(ValueError, match="ModelConfig.mot=False"):
    save_bagel(model, str(tmp_path / "x"))
  assert not os.path.exists(tmp_path / "x")


def test_scan_layout_loads_stacked_and_exports_per_layer(bagel, tmp_path):
  """``scan_layers=True`` (the pod configs): BAGEL's per-layer tensors load into the stacked
  layout on a mesh, the forward is unchanged, and the export writes BAGEL's keys bit for bit."""
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  scanned = load_bagel(BAGEL, image_size=48, mesh=mesh, scan_layers=True, **MARKERS)
  assert scanned.cfg == bagel.cfg.replace(scan_layers=True)
  q = nnx.state(scanned)["layers"]["gen"]["q"].get_value()
  per_layer = nnx.state(bagel)["layers"][0]["gen"]["q"].get_value()
  assert q.shape == (bagel.cfg.num_layers,) + per_layer.shape
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  b, p = 2, 6
  tokens = jnp.arange(b * p, dtype=jnp.int32).reshape(b, p) % 90
  positions = jnp.broadcast_to(jnp.arange(p), (b, p))
  np.testing.assert_allclose(scanned(tokens, positions).logits, bagel(tokens, positions).logits,
                             rtol=1e-5, atol=1e-5)
  save_bagel(scanned, str(tmp_path), dtype="float32")
  original = _tensors(os.path.join(BAGEL, "ema.safetensors"))
  for k, v in _tensors(str(tmp_path / "ema.safetensors")).items():
    np.testing.assert_array_equal(v, original[k], err_msg=k)
