"""Prompt / reasoning encoding into the fixed-shape chat layout, and the SFT examples."""
import numpy as np
import pytest

from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.data.encoding import decode_reasoning, encode_prompts, encode_reasoning
from unigrpo_jax.data.shapeworld.sft_examples import corrupt_spec, sample_sft_batch, with_scene
from unigrpo_jax.data.tokenizer import Tokenizer
from unigrpo_jax.data.shapeworld.world import shapeworld_tokenizer
from unigrpo_jax.data.shapeworld.render import render

TOK = shapeworld_tokenizer()


def test_prompts_left_padded_with_turn_markers():
  tokens, mask = encode_prompts(TOK, ["a red circle"], 8)
  ids = [TOK.bos_id] + TOK.encode("a red circle") + [TOK.think_start_id]
  assert tokens[0, -len(ids):].tolist() == ids and mask[0].sum() == len(ids)
  assert not mask[0, :8 - len(ids)].any() and (tokens[0, :8 - len(ids)] == TOK.pad_id).all()


def test_reasoning_right_padded_ending_with_stop():
  tokens, mask = encode_reasoning(TOK, ["the image shows one red circle"], 12)
  n = int(mask[0].sum())
  assert mask[0, :n].all() and tokens[0, n - 1] == TOK.think_end_id
  assert decode_reasoning(TOK, tokens, mask) == ["the image shows one red circle"]


def test_too_long_text_is_an_error_not_a_truncation():
  with pytest.raises(ValueError, match="max_prompt_len=4"):
    encode_prompts(TOK, ["draw two blue squares"], 4)


def test_out_of_vocabulary_ids_decode_visibly():
  text = decode_reasoning(TOK, np.array([[TOK.encode("one")[0], 150]]), np.array([[True, True]]))
  assert text == ["one <id:150>"]


def test_sft_batches_corrupt_some_traces_consistently():
  batch = sample_sft_batch(np.random.default_rng(0), 64, 32, wrong_reasoning_prob=0.5,
                           layout_seed=0)
  assert 0.2 < batch.correct.mean() < 0.8
  for trace, image in zip(batch.reasoning, batch.images):
    spec = sw.parse_reasoning(trace)  # the image is drawn from what the trace says
    np.testing.assert_array_equal(image, render(spec, seed=0, size=32))
  spec = sw.sample_tasks(1, 3)[0].spec
  assert corrupt_spec(spec, np.random.default_rng(1)) != spec
  assert with_scene("x is y . the image shows one circle", spec).endswith(sw.describe(spec))


def test_wrong_image_prob_draws_images_of_another_scene_than_the_trace():
  """``wrong_image_prob``: the trace is kept and the image comes from a nearby wrong scene, at
  about the asked rate; with 0 every image follows its trace (the shipped warm start's data)."""
  batch = sample_sft_batch(np.random.default_rng(1), 400, 32, wrong_reasoning_prob=0.0,
                           layout_seed=0, wrong_image_prob=0.3)
  assert batch.correct.all()  # traces untouched
  rate = 1 - batch.image_follows_trace.mean()
  assert 0.22 < rate < 0.38, rate
  for prompt, trace, image, follows in zip(batch.prompts, batch.reasoning, batch.images,
                                           batch.image_follows_trace):
    spec = sw.parse_reasoning(trace)
    assert np.array_equal(image, render(spec, seed=0, size=32)) == bool(follows)
  plain = sample_sft_batch(np.random.default_rng(1), 50, 32, wrong_reasoning_prob=0.0,
                           layout_seed=0)
  assert plain.image_follows_trace.all()


def test_sft_probabilities_are_validated():
  from unigrpo_jax import config_defaults, config_validation
  c = config_defaults.base()
  c.sft.wrong_image_prob = 1.5
  with pytest.raises(config_validation.ConfigError, match="sft.wrong_image_prob"):
    config_validation.validate(c)
