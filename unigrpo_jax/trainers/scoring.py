"""Scoring a rollout on the host: the reward on this process's rows, failures named by prompt,
and the per-row statistics every process shares so that all compute the same advantages."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from unigrpo_jax import distributed
from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.rewards.remote.http import RemoteRewardError


class RewardError(RuntimeError):
  """A reward function raised: the run stops (a silent 0 would poison the advantages)."""


def score_rollout(reward_fn: Callable, images: np.ndarray, specs: Sequence[sw.Spec],
                  reasoning: Sequence[str], prompts: Sequence[str],
                  metadata: Sequence[str] | None = None, first_row: int = 0) -> dict:
  """Calls the reward on this process's rows; on failure names the process and the first
  prompt whose rows make it raise (``first_row``: global index of the first row given). A
  remote reward's error already names its chunk and prompts: it is not re-run row by row (that
  would send B more requests to a server that just failed)."""
  meta = lambda a, b: None if metadata is None else metadata[a:b]
  who = f"process {jax.process_index()}: " if distributed.is_multiprocess() else ""
  try:
    return reward_fn(images, specs, reasoning, prompts=prompts, metadata=meta(0, len(specs)))
  except RemoteRewardError as e:
    raise RewardError(str(e)) from e
  except Exception as batch_error:  # find the culprit row to make the report useful
    for i in range(len(specs)):
      try:
        reward_fn(images[i:i + 1], specs[i:i + 1], reasoning[i:i + 1],
                  prompts=prompts[i:i + 1], metadata=meta(i, i + 1))
      except Exception as row_error:
        raise RewardError(f"{who}reward failed on prompt {prompts[i]!r} (row "
                          f"{first_row + i}): {type(row_error).__name__}: "
                          f"{row_error}") from row_error
    raise RewardError(f"{who}reward failed on the batch: {type(batch_error).__name__}: "
                      f"{batch_error}") from batch_error


# Per-row statistics every process computes for its own rows and shares (host data, tiny):
# the run's reward, advantages and metrics are then computed from the whole batch, identically
# on every process and identically to a one-process run.
ROW_STATS = ("reward", "strict", "reasoning_ok", "reasoning_len", "truncated", "trace_id")
