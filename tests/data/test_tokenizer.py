"""Word-level ShapeWorld tokenizer."""
import pytest

from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer, split_words
from unigrpo_jax.data.shapeworld.world import shapeworld_tokenizer


@pytest.fixture(scope="module")
def tok():
  return shapeworld_tokenizer()


def test_special_ids_and_size(tok):
  assert tok.pad_id == 0
  ids = [tok.pad_id, tok.bos_id, tok.eos_id, tok.think_start_id, tok.think_end_id,
         tok.vision_start_id, tok.vision_end_id]
  assert ids == list(range(len(SPECIAL_TOKENS)))
  assert tok.vocab_size < 200
  assert "<unk>" not in tok.words
  assert shapeworld_tokenizer() == tok  # deterministic


def test_all_sampled_text_roundtrips(tok):
  for t in sw.sample_tasks(2000, seed=99):
    for text in (t.prompt, t.reasoning):
      ids = tok.encode(text)
      assert all(0 < i < tok.vocab_size for i in ids)
      assert tok.decode(ids) == text


def test_split_and_specials(tok):
  assert split_words("Two circles, one Square.") == ["two", "circles", ",", "one", "square", "."]
  ids = tok.encode("<think> one circle . </think>")
  assert ids[0] == tok.think_start_id and ids[-1] == tok.think_end_id
  assert tok.decode(ids) == "one circle ."
  assert tok.decode(ids, skip_special=False) == "<think> one circle . </think>"
  with pytest.raises(ValueError):
    tok.decode([tok.vocab_size])


def test_unknown_word_raises_naming_it(tok):
  with pytest.raises(ValueError, match="hexagon"):
    tok.encode("a red hexagon")
  with pytest.raises(ValueError, match="<unk>"):
    tok.encode("<unk>")


def test_json_save_load(tok, tmp_path):
  assert Tokenizer.from_json(tok.to_json()) == tok
  p = tmp_path / "tok.json"
  tok.save(p)
  t2 = Tokenizer.load(p)
  assert t2 == tok and t2.words == tok.words
  assert t2.encode("two red circles above one square") == tok.encode(
      "two red circles above one square")


def test_bad_vocabularies_rejected():
  with pytest.raises(ValueError):
    Tokenizer(["a", "a"])
  with pytest.raises(ValueError):
    Tokenizer(["<pad>"])
  with pytest.raises(ValueError):
    Tokenizer(["two words"])
