"""Word-level tokenizer for ShapeWorld (closed vocabulary, no <unk>).

Text is lowercased, split on whitespace, and the punctuation marks . , : ; ! ? become
their own tokens. Special tokens written literally in text (e.g. "<think>") encode to
their ids. Unknown words raise ValueError: silently mapping them to <unk> would let a
typo in a prompt file train on garbage.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>", "<bos>", "<eos>", "<think>", "</think>", "<vision_start>", "<vision_end>")
PUNCTUATION = ".,:;!?"


def split_words(text: str) -> list[str]:
  """Lowercase, whitespace split, punctuation marks as separate tokens."""
  out = []
  for chunk in text.lower().split():
    if chunk in SPECIAL_TOKENS:
      out.append(chunk)
      continue
    cur = ""
    for ch in chunk:
      if ch in PUNCTUATION:
        if cur:
          out.append(cur)
        out += [ch]
        cur = ""
      else:
        cur += ch
    if cur:
      out.append(cur)
  return out


class Tokenizer:
  """ids: special tokens first (<pad> = 0), then words in the given order."""

  def __init__(self, words: Iterable[str]):
    words = list(words)
    dup = [w for w in words if w in SPECIAL_TOKENS]
    if dup:
      raise ValueError(f"words must not include special tokens: {dup}")
    if len(set(words)) != len(words):
      raise ValueError("duplicate words in vocabulary")
    bad = [w for w in words if split_words(w) != [w]]
    if bad:
      raise ValueError(f"vocabulary entries must be single lowercase tokens: {bad}")
    self._itos = list(SPECIAL_TOKENS) + words
    self._stoi = {w: i for i, w in enumerate(self._itos)}
    self._special_ids = frozenset(range(len(SPECIAL_TOKENS)))

  # -- ids
  pad_id = property(lambda self: self._stoi["<pad>"])
  bos_id = property(lambda self: self._stoi["<bos>"])
  eos_id = property(lambda self: self._stoi["<eos>"])
  think_start_id = property(lambda self: self._stoi["<think>"])
  think_end_id = property(lambda self: self._stoi["</think>"])
  vision_start_id = property(lambda self: self._stoi["<vision_start>"])
  vision_end_id = property(lambda self: self._stoi["<vision_end>"])

  @property
  def vocab_size(self) -> int:
    return len(self._itos)

  @property
  def words(self) -> list[str]:
    return list(self._itos)

  def token_to_id(self, token: str) -> int:
    if token not in self._stoi:
      raise ValueError(f"unknown word {token!r} (not in the {self.vocab_size}-token vocabulary)")
    return self._stoi[token]

  def encode(self, text: str) -> list[int]:
    """text -> ids; raises ValueError naming the first unknown word."""
    return [self.token_to_id(w) for w in split_words(text)]

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    """ids -> space-joined words (special tokens dropped when skip_special)."""
    out = []
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
      if skip_special and i in self._special_ids:
        continue
      out.append(self._itos[i])
    return " ".join(out)

  # -- serialisation
  def to_json(self) -> str:
    return json.dumps({"special_tokens": list(SPECIAL_TOKENS),
                       "words": self._itos[len(SPECIAL_TOKENS):]})

  @classmethod
  def from_json(cls, s: str) -> "Tokenizer":
    d = json.loads(s)
    if tuple(d.get("special_tokens", ())) != SPECIAL_TOKENS:
      raise ValueError(f"special tokens differ from {SPECIAL_TOKENS}")
    return cls(d["words"])

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
      f.write(self.to_json())

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    with open(path) as f:
      return cls.from_json(f.read())

  def __eq__(self, other) -> bool:
    return isinstance(other, Tokenizer) and self._itos == other._itos

  def __hash__(self):
    return hash(tuple(self._itos))

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size})"
