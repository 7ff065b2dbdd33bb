"""CLIP in JAX vs transformers' CLIPModel / CLIPProcessor (committed fixtures, no torch here),
the pickscore / clip_score rewards, and the loader's bad-input errors.

Fixtures: tests/fixtures/make_clip_fixture.py wrote clip_tiny/ (a random CLIPModel with odd sizes,
quick_gelu vision / gelu text, eps 1e-5 / 1e-6, logit_scale 3.1) and clip_tiny_ref.npz.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from unigrpo_jax import config_defaults, parallel
from unigrpo_jax.models.clip import (model as clip, weights as clip_loading, processor as clip_processor)
from unigrpo_jax.models.clip.weights import CLIPLoadError
from unigrpo_jax.rewards import clip as clip_rewards
from unigrpo_jax.rewards import registry
from unigrpo_jax.trainers.metrics import CompileCounter

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures")
CLIP_DIR = os.path.join(FIXTURES, "clip_tiny")
PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(os.path.join(FIXTURES, "clip_tiny_ref.npz")))


@pytest.fixture(scope="module")
def model():
  return clip_loading.load_clip(CLIP_DIR)


def _images(ref):
  return [ref[f"image_{i}"] for i in range(5)]


# ----------------------------------------------------------------------------- model parity
def test_image_and_text_embeddings_match_transformers(model, ref):
  image = model.image_features(jnp.asarray(ref["pixel_values"]))
  text = model.text_features(jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"]))
  np.testing.assert_allclose(image, ref["image_embeds"], atol=PARITY_ATOL, rtol=0)
  np.testing.assert_allclose(text, ref["text_embeds"], atol=PARITY_ATOL, rtol=0)
  logits = clip.logits_per_image(model, image[:4], text)
  np.testing.assert_allclose(logits, ref["logits_per_image"], atol=PARITY_ATOL, rtol=0)
  assert np.abs(ref["logits_per_image"]).max() > 1  # a real signal, not all ~0


def test_legacy_eos_token_id_2_pools_at_argmax(model, ref):
  """Configs written before transformers PR #24773 (eos_token_id == 2) pool at argmax(ids)."""
  ids, mask = jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"])
  model.text_model.eos_token_id = 2
  try:
    legacy = model.text_features(ids, mask)
  finally:
    model.text_model.eos_token_id = model.config.text.eos_token_id
  np.testing.assert_allclose(legacy, ref["text_embeds_legacy"], atol=PARITY_ATOL, rtol=0)
  # The fixture's EOS is the largest id, so both rules pick the same token here; the pad rows
  # (pad = EOS) make "first EOS" and "argmax" agree only because argmax returns the first max.
  np.testing.assert_allclose(legacy, ref["text_embeds"], atol=PARITY_ATOL, rtol=0)


def test_eos_position_rules():
  ids = jnp.asarray([[5, 7, 3, 9, 7], [1, 2, 7, 7, 7]])
  np.testing.assert_array_equal(clip.eos_positions(ids, 7), [1, 2])  # first eos_token_id
  np.testing.assert_array_equal(clip.eos_positions(ids, 2), [3, 2])  # legacy: argmax(ids)


def test_tokenizer_matches_transformers(ref):
  tok = clip_processor.CLIPTokenizer(CLIP_DIR, eos_token_id=381)
  ids, mask = tok(list(ref["prompts"]))
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])
  assert ids.shape == (4, 77) and ids[3, -1] == 381  # truncated row keeps its EOS last
  with pytest.raises(TypeError):
    tok("one string")


def test_preprocessing_matches_pil_within_one_grey_level(ref):
  """jax (two rounded passes, like PIL) vs CLIPProcessor's PIL bicubic, in 0..255 levels."""
  cfg = clip_processor.ImageProcessorConfig.from_directory(CLIP_DIR, 32)
  std = np.asarray(cfg.std)
  for i, image in enumerate(_images(ref)):
    ours = np.asarray(clip_processor.preprocess_images(jnp.asarray(image[None]), cfg))[0]
    levels = np.abs(ours - ref["pixel_values"][i]) * std * 255
    assert ours.shape == (32, 32, 3)
    assert levels.max() <= 1.0 + 1e-3, (image.shape, levels.max())
    assert (levels > 0.5).mean() < 0.01, (image.shape, (levels > 0.5).mean())
  identity = np.asarray(clip_processor.preprocess_images(jnp.asarray(ref["image_2"][None]), cfg))
  np.testing.assert_allclose(identity[0], ref["pixel_values"][2], atol=1e-5)  # 32x32: no resize


def test_preprocessing_of_generator_sized_images_matches_pil(ref):
  """1024^2 and 768x1024 -> CLIP's default 224 (bicubic 4.6x / 3.4x down, crop) vs PIL."""
  cfg = clip_processor.ImageProcessorConfig()  # CLIP defaults: 224, OpenAI mean / std
  for i in range(2):
    seed = ref[f"large_{i}_seed"]
    image = np.repeat(np.repeat(seed, 8, 0), 8, 1)  # as make_clip_fixture.upscale
    ours = np.asarray(clip_processor.preprocess_images(jnp.asarray(image[None]), cfg))[0]
    levels = (ours * np.asarray(cfg.std) + np.asarray(cfg.mean)) * 255
    diff = np.abs(levels - ref[f"large_{i}_224_levels"])
    assert ours.shape == (224, 224, 3)
    assert diff.max() <= 1.0 + 1e-3 and (diff > 0.5).mean() < 0.01, (i, diff.max())


def test_square_size_resizes_without_keeping_aspect(ref, tmp_path):
  """preprocessor size {"height": s, "width": s} (not shortest_edge) vs HF on the same images."""
  d = _copy(tmp_path)
  pp = json.loads((d / "preprocessor_config.json").read_text())
  pp["size"] = {"height": 32, "width": 32}
  (d / "preprocessor_config.json").write_text(json.dumps(pp))
  cfg = clip_processor.ImageProcessorConfig.from_directory(str(d), 32)
  assert cfg.square
  std = np.asarray(cfg.std)
  for i, image in enumerate(_images(ref)):
    ours = np.asarray(clip_processor.preprocess_images(jnp.asarray(image[None]), cfg))[0]
    levels = np.abs(ours - ref["pixel_values_square"][i]) * std * 255
    assert levels.max() <= 1.0 + 1e-3 and (levels > 0.5).mean() < 0.01, image.shape


def test_resized_shape_is_hf_rule():
  assert clip_processor.resized_shape(1024, 1024, 224) == (224, 224)
  assert clip_processor.resized_shape(48, 64, 32) == (32, 42)  # int(32 * 64 / 48) = 42
  assert clip_processor.resized_shape(70, 45, 32) == (49, 32)


# ----------------------------------------------------------------------------- rewards
def _config(**reward_models):
  c = config_defaults.base()
  c.reward_models.update(reward_models)
  return c


def test_scorer_on_raw_images_matches_reference_pipeline(ref):
  """images of 5 sizes -> preprocess -> embed on an 8-device mesh (chunks of 8, padded) vs
  HF's processor + model."""
  mesh = parallel.make_mesh(-1, 1, 1)
  scorer = clip_rewards.CLIPScorer(CLIP_DIR, mesh=mesh, batch_size=3)
  assert scorer.batch_size == 8
  prompts = list(ref["prompts"])
  emb = np.concatenate([scorer.image_embeddings(im[None]) for im in _images(ref)])  # 5 sizes
  want = ref["image_embeds"] / np.linalg.norm(ref["image_embeds"], axis=-1, keepdims=True)
  # preprocessing differs from PIL by <= 1 grey level on < 1% of pixels: tolerance 1e-3.
  np.testing.assert_allclose(emb, want, atol=1e-3, rtol=0)
  text = scorer.text_embeddings(prompts + prompts[:1])  # dedup'd, order kept
  want_t = ref["text_embeds"] / np.linalg.norm(ref["text_embeds"], axis=-1, keepdims=True)
  np.testing.assert_allclose(text, np.concatenate([want_t, want_t[:1]]), atol=PARITY_ATOL)


def test_pickscore_and_clip_score_rewards(ref):
  config = _config(pickscore_dir=CLIP_DIR, clip_dir=CLIP_DIR, batch_size=4)
  prompts = list(ref["prompts"])
  # The reference images differ in size; the 32x32 one is scored 4 times (one batch, 4 prompts).
  images = np.stack([ref["image_2"]] * 4)
  fn = registry.combined_reward({"pickscore": 1.0, "clip_score": 0.5}, config)
  out = fn(images, [None] * 4, reasoning_texts=None, prompts=prompts)
  ie = ref["image_embeds"][2] / np.linalg.norm(ref["image_embeds"][2])
  te = ref["text_embeds"] / np.linalg.norm(ref["text_embeds"], axis=-1, keepdims=True)
  cos = te @ ie
  np.testing.assert_allclose(out["pickscore/cosine"], cos, atol=PARITY_ATOL)
  np.testing.assert_allclose(out["pickscore/raw"], np.exp(3.1) * cos, atol=1e-3)
  np.testing.assert_allclose(out["pickscore/reward"], np.exp(3.1) * cos / 26, atol=1e-4)
  np.testing.assert_allclose(out["clip_score/reward"], 2.5 * np.maximum(cos, 0), atol=1e-4)
  np.testing.assert_allclose(out["reward"], out["pickscore/reward"]
                             + 0.5 * out["clip_score/reward"], rtol=1e-6)
  assert (cos < 0).any() and (cos > 0).any()  # the max(cos, 0) clip is exercised
  # The fixture's own flow_grpo-formula references (image i with prompt i, HF preprocessing).
  fixture_images = [ref[f"image_{i}"] for i in range(4)]
  got = [fn(im[None], [None], prompts=[p])["pickscore/reward"][0]
         for im, p in zip(fixture_images, prompts)]
  np.testing.assert_allclose(got, ref["pickscore"], atol=1e-3)


def test_trainer_passes_prompts_to_the_reward(ref):
  from unigrpo_jax.trainers.scoring import score_rollout
  fn = registry.combined_reward({"pickscore": 1.0}, _config(pickscore_dir=CLIP_DIR))
  images = np.stack([ref["image_2"]] * 2)
  prompts = list(ref["prompts"][:2])
  out = score_rollout(fn, images, [None, None], ["", ""], prompts)
  direct = fn(images, [None, None], prompts=prompts)
  np.testing.assert_array_equal(out["reward"], direct["reward"])
  with pytest.raises(ValueError, match="needs the prompts"):
    fn(images, [None, None])


def test_fsdp_params_give_the_same_scores(ref):
  """data=2 x fsdp=4: weights split over fsdp (where the last axis divides), batch over both."""
  images = np.stack([ref["image_0"]] * 3)
  prompts = [str(p) for p in ref["prompts"][:3]]
  mesh = parallel.make_mesh(2, 4, 1)
  scorer = clip_rewards.CLIPScorer(CLIP_DIR, mesh=mesh, batch_size=8)
  w = scorer._state["vision_model"]["encoder"]["layers"][0]["mlp"]["fc1"]["weight"][...]
  assert tuple(w.sharding.spec) == (None, "fsdp") and len(w.addressable_shards) == 8
  assert w.addressable_shards[0].data.shape == (80, 12)
  plain = clip_rewards.CLIPScorer(CLIP_DIR, batch_size=8).cosine(images, prompts)
  np.testing.assert_allclose(scorer.cosine(images, prompts), plain, atol=1e-5)


def test_non_finite_similarity_is_an_error(ref, monkeypatch):
  fn = registry.combined_reward({"clip_score": 1.0}, _config(clip_dir=CLIP_DIR))
  monkeypatch.setattr(clip_rewards.CLIPScorer, "cosine",
                      lambda self, images, prompts: np.array([0.3, np.nan], np.float32))
  with pytest.raises(ValueError, match=r"clip_score: non-finite similarity for prompt 'b' "
                                       r"\(row 1"):
    fn(np.zeros((2, 8, 8, 3), np.uint8), [None, None], prompts=["a", "b"])


def test_chunking_does_not_change_scores(ref):
  images = np.stack([ref["image_2"]] * 5)
  prompts = [str(p) for p in ref["prompts"]] + [str(ref["prompts"][0])]
  a = clip_rewards.CLIPScorer(CLIP_DIR, batch_size=2).cosine(images, prompts)
  b = clip_rewards.CLIPScorer(CLIP_DIR, batch_size=32).cosine(images, prompts)
  np.testing.assert_allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- bad input
def _copy(tmp_path):
  d = tmp_path / "clip"
  shutil.copytree(CLIP_DIR, d)
  return d


def _edit_config(d, **text_config):
  cfg = json.loads((d / "config.json").read_text())
  cfg["text_config"].update(text_config)
  (d / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor_is_named(tmp_path):
  d = _copy(tmp_path)
  tensors = load_file(str(d / "model.safetensors"))
  del tensors["text_model.encoder.layers.1.mlp.fc2.bias"]
  save_file(tensors, str(d / "model.safetensors"))
  with pytest.raises(CLIPLoadError, match=r"missing tensor 'text_model.encoder.layers.1.mlp"
                                          r".fc2.bias' \(1 missing"):
    clip_loading.load_clip_state(str(d))


def test_shape_mismatch_names_key_expected_found(tmp_path):
  d = _copy(tmp_path)
  _edit_config(d, intermediate_size=64)
  with pytest.raises(CLIPLoadError, match=r"'text_model.encoder.layers.0.mlp.fc1.bias' has "
                                          r"shape \(72,\), but config.json implies \(64,\)"):
    clip_loading.load_clip_state(str(d))


def test_layer_count_mismatch(tmp_path):
  d = _copy(tmp_path)
  _edit_config(d, num_hidden_layers=3)
  with pytest.raises(CLIPLoadError, match="missing tensor 'text_model.encoder.layers.2"):
    clip_loading.load_clip_state(str(d))
  _edit_config(d, num_hidden_layers=1)
  with pytest.raises(CLIPLoadError, match="unexpected tensor 'text_model.encoder.layers.1"):
    clip_loading.load_clip_state(str(d))


@pytest.mark.parametrize("remove,match", [
    ("config.json", r"config.json: file not found"),
    ("model.safetensors", r"no model.safetensors or model.safetensors.index.json"),
    ("tokenizer.json", r"tokenizer.json: file not found"),
])
def test_missing_files_are_named(tmp_path, remove, match):
  d = _copy(tmp_path)
  os.remove(d / remove)
  with pytest.raises(CLIPLoadError, match=match):
    clip_rewards.CLIPScorer(str(d))


def test_bad_config_fields_are_named(tmp_path):
  d = _copy(tmp_path)
  _edit_config(d, hidden_act="swish")
  with pytest.raises(CLIPLoadError, match=r"text_config: hidden_act 'swish' is not one of"):
    clip_loading.read_config(str(d))
  _edit_config(d, hidden_act="gelu", num_attention_heads=3)
  with pytest.raises(CLIPLoadError, match="hidden_size 40 is not a multiple of num_attention"):
    clip_loading.read_config(str(d))
  (d / "config.json").write_text("{not json")
  with pytest.raises(CLIPLoadError, match="config.json: not valid JSON"):
    clip_loading.read_config(str(d))


def test_processor_config_checked(tmp_path):
  d = _copy(tmp_path)
  pp = json.loads((d / "preprocessor_config.json").read_text())
  pp["crop_size"] = {"height": 48, "width": 48}
  (d / "preprocessor_config.json").write_text(json.dumps(pp))
  with pytest.raises(CLIPLoadError, match="crop_size 48 != the model's vision image_size 32"):
    clip_rewards.CLIPScorer(str(d))


def test_sharded_index_loads_the_same(tmp_path, model):
  d = _copy(tmp_path)
  tensors = load_file(str(d / "model.safetensors"))
  os.remove(d / "model.safetensors")
  keys = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2]}
  for name, ks in shards.items():
    save_file({k: tensors[k] for k in ks}, str(d / name))
  (d / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
  loaded = clip_loading.load_clip(str(d))
  for a, b in zip(jax.tree.leaves(nnx_state(loaded)), jax.tree.leaves(nnx_state(model))):
    np.testing.assert_array_equal(a, b)
  os.remove(d / "model-00002-of-00002.safetensors")
  with pytest.raises(CLIPLoadError, match="shard 'model-00002-of-00002.safetensors'"):
    clip_loading.load_clip_state(str(d))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_load(tmp_path, model, dtype):
  import ml_dtypes
  d = _copy(tmp_path)
  np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
  tensors = load_file(str(d / "model.safetensors"))
  save_file({k: v.astype(np_dtype) for k, v in tensors.items()}, str(d / "model.safetensors"))
  loaded = clip_loading.load_clip(str(d))
  for a, b in zip(jax.tree.leaves(nnx_state(loaded)), jax.tree.leaves(nnx_state(model))):
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(a, np.asarray(b).astype(np_dtype).astype(np.float32))


def nnx_state(m):
  from flax import nnx
  return nnx.state(m)


def test_reward_config_errors_before_any_compile(tmp_path):
  counter = CompileCounter.install()
  before = counter.count
  with pytest.raises(ValueError, match=r"config.reward_models.pickscore_dir: reward 'pickscore'"):
    registry.combined_reward({"pickscore": 1.0}, _config())
  with pytest.raises(CLIPLoadError, match="directory '/nonexistent/clip' not found"):
    registry.combined_reward({"clip_score": 1.0}, _config(clip_dir="/nonexistent/clip"))
  d = _copy(tmp_path)
  _edit_config(d, num_hidden_layers=3)
  with pytest.raises(CLIPLoadError, match="missing tensor"):
    registry.combined_reward({"pickscore": 1.0}, _config(pickscore_dir=str(d)))
  assert counter.count == before
  with pytest.raises(ValueError, match="built from the run config"):
    registry.get("pickscore")


@pytest.mark.slow
def test_training_run_with_pickscore(tmp_path, monkeypatch):
  """Two UniGRPO steps of the tiny model rewarded by shapeworld + 0.5 * pickscore: the reward
  gets each rollout row's own prompt (a group's rows share it) and the run finishes."""
  monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "trainers"))
  from test_trainer import tiny_config

  from unigrpo_jax.trainers.metrics import read_metrics
  from unigrpo_jax.trainers.unigrpo import run_train
  seen = []
  original = clip_rewards.CLIPScorer.cosine

  def spy(self, images, prompts):
    seen.append((images.shape, list(prompts)))
    return original(self, images, prompts)

  monkeypatch.setattr(clip_rewards.CLIPScorer, "cosine", spy)
  c = tiny_config(2)
  c.rewards = {"shapeworld": 1.0, "pickscore": 0.5}
  c.reward_models.pickscore_dir = CLIP_DIR
  run_train(c, str(tmp_path / "work"))
  rows = read_metrics(str(tmp_path / "work"))
  assert [r["step"] for r in rows] == [0, 1, 2]
  assert len(seen) == 2 and all(shape[0] == 4 for shape, _ in seen)
  for _, prompts in seen:  # group_size 2: rows (0, 1) and (2, 3) share a prompt
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3] and prompts[0] != prompts[2]
  assert all(np.isfinite(r["train/reward_mean"]) for r in rows[1:])


def test_no_torch_at_run_time(model):
  """The loader, tokenizer, preprocessing and rewards never import torch / transformers."""
  import sys
  assert "torch" not in sys.modules and "transformers" not in sys.modules
