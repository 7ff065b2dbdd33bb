"""The Qwen2/BAGEL tokenizer on a tiny tokenizer.json built here in Qwen2's pipeline shape."""
import numpy as np
import pytest

from unigrpo_jax.data import encoding
from unigrpo_jax.data.qwen_tokenizer import (GEN_THINK_SYSTEM_PROMPT, QwenTokenizer, build_qwen2_style_tokenizer)

CORPUS = ["a red circle above a blue square", "draw two green triangles, then 3 stars!",
          GEN_THINK_SYSTEM_PROMPT, "The planning process: think first."] * 3


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  build_qwen2_style_tokenizer(CORPUS, vocab_size=320).save(str(path))
  return QwenTokenizer.from_file(path.parent)


def test_special_tokens_and_plain_encoding(tok):
  n = tok.vocab_size
  # Specials appended after the BPE vocabulary, in Qwen2.5's relative order.
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (n - 11, n - 10, n - 9)
  assert (tok.vision_start_id, tok.vision_end_id) == (n - 2, n - 1)
  ids = tok.encode("a red circle")
  assert tok.decode(ids) == "a red circle"  # byte-level round trip, nothing inserted
  assert bos_free(ids, tok)
  # A special token written in text is one id; decode keeps it only when asked.
  ids = tok.encode("hi<|im_end|>there")
  assert tok.eos_id in ids
  assert "<|im_end|>" in tok.decode(ids, skip_special=False)
  assert "<|im_end|>" not in tok.decode(ids)
  with pytest.raises(ValueError, match="out of range"):
    tok.decode([n + 5])


def bos_free(ids, tok):
  return tok.bos_id not in ids and tok.eos_id not in ids


def test_bagel_thinking_layout(tok):
  ids = encoding.prompt_ids(tok, "a red circle")
  sys_ids = tok.encode(GEN_THINK_SYSTEM_PROMPT)
  want = ([tok.bos_id] + sys_ids + [tok.eos_id] + [tok.bos_id] + tok.encode("a red circle")
          + [tok.eos_id] + [tok.bos_id])
  assert ids == want
  # The system prompt is BAGEL's, verbatim (space before the newline).
  assert tok.decode(sys_ids) == GEN_THINK_SYSTEM_PROMPT
  assert "image. \nThe planning" in GEN_THINK_SYSTEM_PROMPT
  r = encoding.reasoning_ids(tok, "think first.")
  assert r[-1] == tok.think_end_id == tok.eos_id
  tokens, mask = encoding.encode_prompts(tok, ["a red circle", "two"], 120)
  assert tokens.shape == (2, 120) and tokens[0, -1] == tok.bos_id and not mask[1, 0]
  assert np.all(tokens[~mask] == tok.pad_id)


def test_sampled_ids_decode_without_retokenising(tok):
  # Ids that no string round trip would produce (e.g. a split word) decode as they are.
  sampled = tok.encode("red") + tok.encode("circle") + [tok.eos_id]
  text = encoding.decode_reasoning(tok, np.asarray([sampled + [tok.pad_id]]),
                                   np.asarray([[True] * len(sampled) + [False]]))
  assert text == ["redcircle"]
  # Ids beyond the tokenizer (padding rows of a larger embedding table) do not crash.
  text = encoding.decode_reasoning(tok, np.asarray([[3, tok.vocab_size + 7]]),
                                   np.asarray([[True, True]]))
  assert text[0].endswith(f"<id:{tok.vocab_size + 7}>")


def test_bad_tokenizer_files(tmp_path):
  with pytest.raises(ValueError, match="tokenizer file not found"):
    QwenTokenizer.from_file(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="not a valid tokenizer.json"):
    QwenTokenizer.from_file(tmp_path)
  from tokenizers import Tokenizer, models
  bare = Tokenizer(models.BPE())
  bare.add_special_tokens(["<|endoftext|>"])
  bare.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="'<\\|im_start\\|>' is missing"):
    QwenTokenizer.from_file(tmp_path)
