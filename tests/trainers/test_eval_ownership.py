"""Evaluation scores each image once, on the process that owns its row, and every process gets
every row's results (the multi-process run itself: tests/integration/test_multihost_eval.py)."""
import contextlib

import jax
import numpy as np
import pytest

from unigrpo_jax import distributed
from unigrpo_jax.trainers import evaluate, scoring


@pytest.mark.parametrize("num_rows", [0, 1, 3, 4, 7, 64, 513])
@pytest.mark.parametrize("processes", [1, 2, 3, 4, 8])
def test_every_row_has_exactly_one_owner(num_rows, processes):
  blocks = [evaluate.owned_rows(num_rows, processes, p) for p in range(processes)]
  rows = [r for lo, hi in blocks for r in range(lo, hi)]
  assert rows == list(range(num_rows))  # disjoint, contiguous, in process order
  sizes = [hi - lo for lo, hi in blocks]
  assert max(sizes) - min(sizes) <= 1


def test_owned_rows_defaults_to_this_process():
  assert evaluate.owned_rows(10) == (0, 10)  # one process owns every row


class _Processes:
  """``processes`` processes in one: ``run(p, fn)`` calls fn as process p (jax.process_index /
  count and distributed.is_multiprocess patched). Each ``distributed.exchange`` of a round
  returns what every process posted to it, so the processes run one after the other in two
  passes: the first records what each posts (and stops it there), the second returns all."""

  def __init__(self, monkeypatch, processes):
    self.n, self.posted, self.me = processes, {}, 0
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    monkeypatch.setattr(jax, "process_index", lambda: self.me)
    monkeypatch.setattr(distributed, "is_multiprocess", lambda: processes > 1)
    monkeypatch.setattr(distributed, "exchange", self._exchange)

  class _Posted(Exception):
    pass

  def _exchange(self, name, value, timeout_s=None):
    self.posted.setdefault(name, {})[self.me] = value
    if len(self.posted[name]) < self.n:
      raise self._Posted()
    return [self.posted[name][p] for p in range(self.n)]

  def run(self, p, fn):
    self.me = p
    try:
      return fn()
    except self._Posted:
      return None


def _counting_reward(calls):
  def reward(lo, hi):
    calls.extend(range(lo, hi))
    rows = np.arange(lo, hi)
    return {"reward": (rows / 10).astype(np.float32), "x/correct": (rows % 2).astype(np.float32),
            "x/label": np.array([f"row{r}" for r in rows]), "x/latency_s": 0.5}
  return reward


@pytest.mark.parametrize("processes, num_rows", [(2, 5), (3, 7), (4, 2)])
def test_each_row_is_scored_once_and_everyone_gets_every_row(monkeypatch, processes, num_rows):
  calls = []
  sim = _Processes(monkeypatch, processes)
  reward = _counting_reward(calls)
  for p in range(processes):  # pass 1: each process scores its own rows and posts them
    sim.run(p, lambda: evaluate.score_by_owner(reward, num_rows, "eval"))
  assert sorted(calls) == list(range(num_rows))  # every row scored exactly once
  # Pass 2: every process's exchange now returns all posts (each rescored its rows, the same).
  outs = [sim.run(p, lambda: evaluate.score_by_owner(reward, num_rows, "eval"))
          for p in range(processes)]
  rows = np.arange(num_rows)
  for out in outs:
    np.testing.assert_array_equal(out["reward"], (rows / 10).astype(np.float32))
    assert out["reward"].dtype == np.float32
    np.testing.assert_array_equal(out["x/correct"], rows % 2)
    assert list(out["x/label"]) == [f"row{r}" for r in rows]
    assert "x/latency_s" not in out  # not a per-row value


def test_a_failure_on_one_process_stops_every_process(monkeypatch):
  sim = _Processes(monkeypatch, 2)

  def reward(lo, hi):
    if lo == 0:
      raise RuntimeError("server said 503")
    return {"reward": np.zeros(hi - lo, np.float32)}

  for p in range(2):  # pass 1: both post (process 0 its error); the last one already raises
    with contextlib.suppress(scoring.RewardError):
      sim.run(p, lambda: evaluate.score_by_owner(reward, 4, "eval"))
  for p in range(2):  # no process waits for a peer that failed: each raises, naming it
    with pytest.raises(scoring.RewardError, match="process 0: RuntimeError: server said 503"):
      sim.run(p, lambda: evaluate.score_by_owner(reward, 4, "eval"))


def test_one_process_raises_the_rewards_own_error():
  def reward(lo, hi):
    raise KeyError("no reward key")
  with pytest.raises(KeyError):
    evaluate.score_by_owner(reward, 3, "eval")
