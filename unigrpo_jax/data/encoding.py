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
  return [tokenizer.bos_id] + tokenizer.encode(prompt) + [tokenizer.think_start_id]


def reasoning_ids(tokenizer: Tokenizer, reasoning: str) -> list[int]:
  return tokenizer.encode(reasoning) + [tokenizer.think_end_id]


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], max_len: int):
  """-> tokens int32 [B, max_len] left-padded with <pad>, mask bool [B, max_len]."""
  tokens = np.full((len(prompts), max_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(prompts), max_len), bool)
  for i, prompt in enumerate(prompts):
    ids = prompt_ids(tokenizer, prompt)
    if len(ids) > max_len:
      raise ValueError(f"prompt {prompt!r} needs {len(ids)} tokens, more than "
                       f"max_prompt_len={max_len}")
    tokens[i, max_len - len(ids):] = ids
    mask[i, max_len - len(ids):] = True
  return tokens, mask


def encode_reasoning(tokenizer: Tokenizer, texts: Sequence[str], max_len: int):
  """-> tokens int32 [B, max_len] right-padded, mask bool [B, max_len] (incl. </think>)."""
  tokens = np.full((len(texts), max_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(texts), max_len), bool)
  for i, text in enumerate(texts):
    ids = reasoning_ids(tokenizer, text)
    if len(ids) > max_len:
      raise ValueError(f"reasoning {text!r} needs {len(ids)} tokens, more than "
                       f"max_reasoning_len={max_len}")
    tokens[i, :len(ids)] = ids
    mask[i, :len(ids)] = True
  return tokens, mask


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
