"""The Qwen2 / BAGEL tokenizer from a checkpoint's ``tokenizer.json`` (``tokenizers`` only, no
transformers at run time), and BAGEL's text-to-image-with-thinking layout.

BAGEL's chunks (``Bagel:inferencer.py``, ``bagel.py::prepare_prompts``) are
``<|im_start|> text <|im_end|>`` with no role names or chat template. A thinking T2I sample is::

    [<|im_start|> SYSTEM <|im_end|>] [<|im_start|> prompt <|im_end|>] [<|im_start|> reasoning
    <|im_end|>] [<|vision_start|> latents <|vision_end|>]

The prompt we feed ends with the third ``<|im_start|>``; the reasoning is sampled until
``<|im_end|>`` (the stop token, kept in the trajectory); the model itself wraps the image block
in its markers (``ModelConfig.vision_start_id``). Sampled ids are used as they are: nothing is
decoded and re-encoded on the way to the image (BAGEL re-encodes its decoded thinking text; the
policy-gradient needs the ids that were actually sampled).

This class offers the members the trainer reads from the ShapeWorld ``Tokenizer`` (``pad_id``,
``think_start_id`` / ``think_end_id`` = ``<|im_start|>`` / ``<|im_end|>``, ``vision_*_id``,
``vocab_size``, ``encode``, ``decode``) plus ``prompt_ids`` / ``reasoning_ids`` in BAGEL's layout.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer

from unigrpo_jax import paths

# Verbatim from ByteDance-Seed/Bagel inferencer.py (note the space before the newline).
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. "
    "\nThe planning process is enclosed within <think> </think> tags, i.e. <think> planning "
    "process here </think> image here")
SPECIAL_TOKENS = {"pad": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
                  "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}
# Qwen2's pre-tokenisation regex (transformers' Qwen2Converter / tokenization_qwen2.py).
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
                           r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class QwenTokenizer:
  """A ``tokenizer.json`` with BAGEL's special tokens; ids as in the file."""

  def __init__(self, tok: HFTokenizer, source: str = "tokenizer.json",
               system_prompt: str = GEN_THINK_SYSTEM_PROMPT):
    self._tok, self.source, self.system_prompt = tok, source, system_prompt
    self._ids = {}
    for name, token in SPECIAL_TOKENS.items():
      i = tok.token_to_id(token)
      if i is None:
        raise ValueError(f"{source}: special token {token!r} is missing (not a Qwen2/BAGEL "
                         "tokenizer?)")
      self._ids[name] = i
    self._special = frozenset(self._ids.values())

  @classmethod
  def from_file(cls, path: str | os.PathLike, **kw) -> "QwenTokenizer":
    """``path`` is a tokenizer.json or a directory holding one."""
    path = str(path)
    if paths.isdir(path):
      path = paths.join(path, "tokenizer.json")
    if not paths.isfile(path):
      raise ValueError(f"{path}: tokenizer file not found")
    try:
      tok = HFTokenizer.from_str(paths.read_text(path))  # local or gs://
    except Exception as e:  # tokenizers raises its own exception type on bad JSON
      raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
    return cls(tok, path, **kw)

  # -- ids (names shared with the ShapeWorld Tokenizer so the trainer reads either)
  pad_id = property(lambda self: self._ids["pad"])
  bos_id = property(lambda self: self._ids["im_start"])
  eos_id = property(lambda self: self._ids["im_end"])
  think_start_id = property(lambda self: self._ids["im_start"])  # reasoning starts after it
  think_end_id = property(lambda self: self._ids["im_end"])  # the stop token
  vision_start_id = property(lambda self: self._ids["vision_start"])
  vision_end_id = property(lambda self: self._ids["vision_end"])

  @property
  def vocab_size(self) -> int:
    """Ids the tokenizer can produce (may be < the model's embedding rows: 151665 vs 152064)."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise ValueError(f"{self.source}: unknown token {token!r}")
    return i

  def encode(self, text: str) -> list[int]:
    """text -> ids (no BOS/EOS added; special tokens written in the text map to their ids)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token id {bad[0]} out of range [0, {self.vocab_size})")
    return self._tok.decode(ids, skip_special_tokens=skip_special)

  # -- BAGEL's layout
  def chunk(self, text: str) -> list[int]:
    """One text chunk: ``<|im_start|> text <|im_end|>``."""
    return [self.bos_id] + self.encode(text) + [self.eos_id]

  def prompt_ids(self, prompt: str) -> list[int]:
    """[system chunk] [prompt chunk] <|im_start|>: the reasoning is sampled next."""
    system = self.chunk(self.system_prompt) if self.system_prompt else []
    return system + self.chunk(prompt) + [self.think_start_id]

  def reasoning_ids(self, reasoning: str) -> list[int]:
    """Reasoning text (for SFT targets) -> ids ending with the stop token ``<|im_end|>``."""
    return self.encode(reasoning) + [self.think_end_id]

  def __repr__(self) -> str:
    return f"QwenTokenizer({self.source!r}, vocab_size={self.vocab_size})"


def build_qwen2_style_tokenizer(corpus: Iterable[str], vocab_size: int = 300) -> HFTokenizer:
  """A small BPE ``tokenizers.Tokenizer`` in Qwen2's pipeline shape, for tests and tiny dirs.

  NFC normaliser, Qwen2's regex split then byte-level (no prefix space), byte-level decoder,
  a post-processor that inserts nothing; the special tokens appended after the BPE vocabulary
  (as in Qwen2.5, where they start at 151643).
  """
  from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
  from tokenizers import trainers
  tok = HFTokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(corpus), trainer)
  tok.add_special_tokens([SPECIAL_TOKENS["pad"], SPECIAL_TOKENS["im_start"],
                          SPECIAL_TOKENS["im_end"], "<|object_ref_start|>",
                          "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                          "<|quad_start|>", "<|quad_end|>", SPECIAL_TOKENS["vision_start"],
                          SPECIAL_TOKENS["vision_end"]])
  return tok
