"""LoRA adapters (models/unified/lora.py, lora_io.py): exactness at step 0, the reference path,
PEFT files, the merged export. Tiny models and a tiny BAGEL-format directory, CPU."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from unigrpo_jax.models.safetensors_io import CheckpointFormatError
from unigrpo_jax.models.unified import lora, lora_io
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.models.unified.export import save_bagel
from unigrpo_jax.models.unified.loading import load_bagel
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.models.unified.weights import bagel_key_map
from unigrpo_jax.testing.tiny_bagel import write_tiny_bagel_dir

RANK, ALPHA = 4, 8.0


def _inputs(cfg):
  ids = (jnp.arange(12).reshape(2, 6) * 7) % cfg.vocab_size
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  latents = jax.random.normal(jax.random.key(0), (2, 1, cfg.num_image_tokens, cfg.latent_dim))
  return dict(tokens=ids, positions=pos, latents=latents, times=jnp.full((2, 1), 0.4),
              image_position=jnp.array([6, 6]))


def _call(model, inputs):
  x = dict(inputs)
  out = model(x.pop("tokens"), x.pop("positions"), **x)
  return np.asarray(out.logits), np.asarray(out.velocity)


def _tiny_base(**fields) -> UnifiedModel:
  """The tiny model with a non-zero velocity head (llm2vae is zero-initialised)."""
  base = UnifiedModel(get_preset("tiny", **fields), nnx.Rngs(0))
  kernel = base.latent_io.llm2vae_kernel
  kernel.set_value(0.1 * jax.random.normal(jax.random.key(9), kernel.shape, kernel.dtype))
  return base


def _lora_over(base: UnifiedModel, **fields):
  cfg = base.cfg.replace(lora_rank=RANK, lora_alpha=ALPHA, **fields)
  return nnx.merge(*lora_io.with_adapters(nnx.split(base), cfg, seed=3))


def _randomise_adapters(model, scale=0.2):
  """B is zero at init; give every adapter values so that they change the output."""
  for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
    var.set_value(scale * jax.random.normal(jax.random.key(i), var.shape, jnp.float32))


@pytest.mark.parametrize("scan", [False, True])
def test_fresh_adapters_equal_the_base_bit_exactly(scan):
  base = _tiny_base(scan_layers=scan)
  model = _lora_over(base)
  assert lora.adapter_count(nnx.state(model)) > 0
  inputs = _inputs(base.cfg)
  for got, want in zip(_call(model, inputs), _call(base, inputs)):
    np.testing.assert_array_equal(got, want)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    assert var.get_value().dtype == jnp.float32  # the adapter master is f32 over any base


def test_adapters_are_float32_over_a_bf16_base_and_only_they_are_trainable():
  base = UnifiedModel(get_preset("tiny", param_dtype="bfloat16", dtype="bfloat16"),
                      nnx.Rngs(0))
  state = nnx.state(_lora_over(base))
  trainable, rest = nnx.split_state(state, lora.trainable_filter(state), ...)
  kinds = {type(v) for _, v in nnx.to_flat_state(trainable)}
  assert kinds == {nnx.LoRAParam}
  assert {v.get_value().dtype for _, v in nnx.to_flat_state(trainable)} == {jnp.dtype("float32")}
  assert all(not isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(rest))
  assert lora.trainable_filter(nnx.state(base)) is nnx.Param  # no adapters: full fine-tuning


def test_reference_state_is_the_adapter_free_forward():
  base = _tiny_base()
  model = _lora_over(base)
  _randomise_adapters(model)
  inputs = _inputs(base.cfg)
  assert not np.array_equal(_call(model, inputs)[0], _call(base, inputs)[0])
  assert not np.array_equal(_call(model, inputs)[1], _call(base, inputs)[1])
  graphdef, state = nnx.split(model)
  reference = nnx.merge(graphdef, lora.reference_state(state))
  for got, want in zip(_call(reference, inputs), _call(base, inputs)):
    np.testing.assert_array_equal(got, want)


def test_only_the_named_experts_and_projections_get_adapters():
  base = UnifiedModel(get_preset("tiny"), nnx.Rngs(0))
  model = _lora_over(base, lora_targets=("q", "down"), lora_experts=("gen",))
  names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
  assert names == {f"layers.{i}.gen.lora.{t}" for i in range(2)
                   for t in ("q_a", "q_b", "down_a", "down_b")}


@pytest.mark.parametrize("field,value,match", [
    ("lora_targets", ("q", "qkv"), "lora_targets"),
    ("lora_experts", ("vision",), "lora_experts"),
    ("lora_rank", -1, "lora_rank"),
    ("lora_alpha", 0.0, "lora_alpha"),
])
def test_bad_lora_fields_are_named(field, value, match):
  fields = {"lora_rank": RANK, field: value}
  with pytest.raises(ValueError, match=match):
    get_preset("tiny", **fields)


@pytest.fixture(scope="module")
def bagel(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bagel"))
  write_tiny_bagel_dir(path, image_size=32, max_latent_size=4)
  base = load_bagel(path, image_size=32)
  model = _lora_over(base)
  _randomise_adapters(model)
  return path, base, model


def test_peft_files_have_the_names_and_shapes(bagel, tmp_path):
  path, base, model = bagel
  keys = lora_io.save_lora(model, str(tmp_path), base_model=path)
  cfg = model.cfg
  conf = json.loads((tmp_path / "adapter_config.json").read_text())
  assert conf["peft_type"] == "LORA" and conf["r"] == RANK and conf["lora_alpha"] == ALPHA
  assert conf["base_model_name_or_path"] == path
  assert set(conf["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                         "up_proj", "down_proj", "q_proj_moe_gen",
                                         "k_proj_moe_gen", "v_proj_moe_gen", "o_proj_moe_gen"}
  d, h, hkv, hd, m = (cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                      cfg.mlp_dim)
  lm = "base_model.model.language_model.model.layers.1."
  want = {  # PEFT: lora_A [r, in], lora_B [out, r] of BAGEL's [out, in] weights
      lm + "self_attn.q_proj.lora_A.weight": (RANK, d),
      lm + "self_attn.q_proj.lora_B.weight": (h * hd, RANK),
      lm + "self_attn.k_proj_moe_gen.lora_B.weight": (hkv * hd, RANK),
      lm + "self_attn.o_proj.lora_A.weight": (RANK, h * hd),
      lm + "self_attn.o_proj_moe_gen.lora_B.weight": (d, RANK),
      lm + "mlp.down_proj.lora_A.weight": (RANK, m),
      lm + "mlp_moe_gen.gate_proj.lora_B.weight": (m, RANK),
  }
  with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="numpy") as f:
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  assert sorted(shapes) == keys
  assert len(keys) == 2 * 7 * 2 * cfg.num_layers  # A and B, 7 projections, 2 experts
  for key, shape in want.items():
    assert shapes[key] == shape, key
  base_keys = {k for _, k, _ in bagel_key_map(lora.base_config(cfg))}
  for key in keys:  # every adapter sits on a real BAGEL module
    module = key[len("base_model.model."):].rsplit(".lora_", 1)[0]
    assert module + ".weight" in base_keys, key


def test_merged_export_is_base_plus_scaled_BA(bagel, tmp_path):
  """save_bagel(merge_lora=True) against W + (alpha / r) B A computed in BAGEL's layout from
  the PEFT file and the base file (numpy, independent of our layout code)."""
  path, base, model = bagel
  lora_io.save_lora(model, str(tmp_path / "adapter"))
  save_bagel(model, str(tmp_path / "merged"), dtype="float32", merge_lora=True)
  with pytest.raises(ValueError, match="merge_lora=True"):
    save_bagel(model, str(tmp_path / "refused"), dtype="float32")
  read = lambda p: (lambda f: {k: f.get_tensor(k) for k in f.keys()})(
      safe_open(p, framework="numpy"))
  adapters = read(str(tmp_path / "adapter" / "adapter_model.safetensors"))
  original = read(os.path.join(path, "ema.safetensors"))
  merged = read(str(tmp_path / "merged" / "ema.safetensors"))
  changed = 0
  for key, w in merged.items():
    a_key = "base_model.model." + key[:-len(".weight")] + ".lora_A.weight"
    if a_key in adapters:
      b = adapters[a_key.replace("lora_A", "lora_B")]
      want = original[key].astype(np.float32) + (ALPHA / RANK) * (b @ adapters[a_key])
      np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-6, err_msg=key)
      changed += 1
    else:
      np.testing.assert_array_equal(w, original[key].astype(np.float32), err_msg=key)
  assert changed == 7 * 2 * model.cfg.num_layers
  # ... and the merged directory loads as a plain BAGEL model computing the adapted function.
  reloaded = load_bagel(str(tmp_path / "merged"), image_size=32,
                        vision_start_id=model.cfg.vision_start_id,
                        vision_end_id=model.cfg.vision_end_id)
  inputs = _inputs(model.cfg)
  for got, want in zip(_call(reloaded, inputs), _call(model, inputs)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scan", [False, True])
def test_saved_adapters_load_back(bagel, tmp_path, scan):
  """save_lora -> load_lora over a fresh base (either layer layout) continues the same model."""
  path, _, model = bagel
  lora_io.save_lora(model, str(tmp_path))
  cfg = model.cfg.replace(scan_layers=scan)
  base = load_bagel(path, image_size=32, scan_layers=scan)
  graphdef, fresh = lora_io.with_adapters(nnx.split(base), cfg, seed=0)
  loaded = nnx.merge(graphdef, lora_io.load_lora(str(tmp_path), fresh, cfg))
  inputs = _inputs(model.cfg)
  for got, want in zip(_call(loaded, inputs), _call(model, inputs)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_load_lora_refuses_another_rank(bagel, tmp_path):
  path, _, model = bagel
  lora_io.save_lora(model, str(tmp_path))
  other = model.cfg.replace(lora_rank=RANK * 2)
  base = load_bagel(path, image_size=32)
  _, fresh = lora_io.with_adapters(nnx.split(base), other, seed=0)
  with pytest.raises(CheckpointFormatError, match="r=4"):
    lora_io.load_lora(str(tmp_path), fresh, other)
