"""Text -> fixed-shape token arrays in the chat layout the model is trained and sampled with.

    prompt    = <bos> prompt words <think>           (left-padded to P slots)
    reasoning = reasoning words </think>             (right-padded to T slots; </think> stops)
    then the rollout appends <vision_start> and the image block follows.

Too-long text raises ``ValueError`` naming the text and the limit: truncating a prompt silently
would train on a different task than the reward scores.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from unigrpo_jax.data.tokenizer import Tokenizer


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
  if hasattr(tokenizer, "prompt_ids"):  # a tokenizer with its own layout (QwenTokenizer: BAGEL)
    return tokenizer.prompt_ids(prompt)
  return [tokenizer.bos_id] + tokenizer.encode(prompt) + [tokenizer.think_start_id]


def reasoning_ids(tokenizer: Tokenizer, reasoning: str) -> list[int]:
  if hasattr(tokenizer, "reasoning_ids"):
    return tokenizer.reasoning_ids(reasoning)
  return tokenizer.encode(reasoning) + [tokenizer.think_end_id]


def _pack(rows: Sequence[list[int]], texts: Sequence[str], max_len: int, pad_id: int,
          left: bool, what: str):
  """Token id lists -> (int32 [B, max_len], bool [B, max_len]), padded on the left or right."""
  tokens = np.full((len(rows), max_len), pad_id, np.int32)
  mask = np.zeros((len(rows), max_len), bool)
  for i, (ids, text) in enumerate(zip(rows, texts)):
    if len(ids) > max_len:
      raise ValueError(f"{what} {text!r} needs {len(ids)} tokens, more than "
                       f"max_{what}_len={max_len}")
    cols = slice(max_len - len(ids), max_len) if left else slice(0, len(ids))
    tokens[i, cols], mask[i, cols] = ids, True
  return tokens, mask


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], max_len: int):
  """-> tokens int32 [B, max_len] left-padded with <pad>, mask bool [B, max_len]."""
  return _pack([prompt_ids(tokenizer, p) for p in prompts], prompts, max_len, tokenizer.pad_id,
               left=True, what="prompt")


def encode_reasoning(tokenizer: Tokenizer, texts: Sequence[str], max_len: int):
  """-> tokens int32 [B, max_len] right-padded, mask bool [B, max_len] (incl. </think>)."""
  return _pack([reasoning_ids(tokenizer, t) for t in texts], texts, max_len, tokenizer.pad_id,
               left=False, what="reasoning")


def decode_reasoning(tokenizer: Tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  """Sampled reasoning ids [B, T] with validity [B, T] -> text per row (specials dropped).

  A model whose vocabulary is larger than the tokenizer's can sample ids no word has; they
  show as ``<id:N>`` (the reasoning is then simply wrong) instead of stopping the run.
  """
  texts = []
  for row, valid in zip(np.asarray(tokens), np.asarray(mask)):
    ids = [int(t) for t, m in zip(row, valid) if m]
    if all(i < tokenizer.vocab_size for i in ids):
      texts.append(tokenizer.decode(ids))
    else:
      texts.append(" ".join(tokenizer.decode([i]) if i < tokenizer.vocab_size else f"<id:{i}>"
                            for i in ids).strip())
  return texts
