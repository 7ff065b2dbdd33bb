"""Observability of a run: metric writers (TensorBoard + metrics.jsonl), compile counter, progress.

Only process 0 writes files; every process may call the writer.
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from typing import Mapping, Optional

import jax
import numpy as np


class CompileCounter:
  """Counts XLA backend compilations since it was installed (process-wide, cumulative)."""

  _lock = threading.Lock()
  _count = 0
  _installed = False

  @classmethod
  def install(cls) -> "CompileCounter":
    with cls._lock:
      if not cls._installed:
        jax.monitoring.register_event_duration_secs_listener(cls._on_event)
        cls._installed = True
    return cls()

  @classmethod
  def _on_event(cls, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      with cls._lock:
        cls._count += 1

  @property
  def count(self) -> int:
    return CompileCounter._count


def _to_python(value):
  arr = np.asarray(value)
  if arr.ndim == 0:
    scalar = arr.item()
    return scalar if not isinstance(scalar, float) or math.isfinite(scalar) else str(scalar)
  return arr.tolist()


class MetricsLogger:
  """Writes scalars to clu's default writer (TensorBoard in ``workdir``) and to metrics.jsonl.

  ``metrics.jsonl`` holds one JSON object per line: ``{"step": int, "<name>": value, ...}``.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self._writer = None
    if tensorboard:
      from clu import metric_writers  # imports TensorFlow: only when asked for
      self._writer = metric_writers.create_default_writer(workdir, just_logging=not self.is_main)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.is_main else None

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    if self._writer is not None:
      self._writer.write_scalars(step, scalars)
    if self._jsonl is not None:
      row = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
      self._jsonl.write(json.dumps(row, sort_keys=True) + "\n")
      self._jsonl.flush()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: name -> uint8 [H, W, 3] (one picture each)."""
    if self._writer is not None:
      self._writer.write_images(step, {k: np.asarray(v)[None] for k, v in images.items()})

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    self.flush()
    if self._writer is not None:
      self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None


def read_metrics(workdir: str) -> list[dict]:
  """All rows of ``workdir/metrics.jsonl``."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir: str, last_step: int) -> None:
  """Drops metrics rows after ``last_step`` (a resumed run rewrites them identically)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return
  rows = read_metrics(workdir)
  kept = [r for r in rows if r["step"] <= last_step]
  if len(kept) != len(rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      for r in kept:
        f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, path)


class Progress:
  """A one-line progress report with rate and ETA, printed every ``every`` steps."""

  def __init__(self, total_steps: int, first_step: int = 0, every: int = 1,
               stream=sys.stdout):
    self.total, self.first, self.every, self.stream = total_steps, first_step, every, stream
    self.start = time.time()

  def update(self, step: int, extra: Optional[Mapping[str, float]] = None) -> None:
    if jax.process_index() != 0 or (step % self.every and step != self.total):
      return
    done = step - self.first
    elapsed = time.time() - self.start
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    parts = [f"step {step}/{self.total}", f"{elapsed:.0f}s elapsed", f"ETA {eta:.0f}s"]
    for k, v in (extra or {}).items():
      parts.append(f"{k} {float(v):.4g}")
    print(" | ".join(parts), file=self.stream, flush=True)


EVAL_SUMMARY_KEYS = (("reward", "eval/reward_mean"), ("strict", "eval/strict_accuracy"),
                     ("reasoning", "eval/reasoning_accuracy"), ("time_s", "perf/eval_time_s"))


def eval_summary(step: int, metrics: Mapping[str, float]) -> str:
  """The console line of an evaluation, e.g. ``eval @ step 20 | reward 0.222 | strict 0.148 |
  reasoning 0.87 | time_s 12``."""
  parts = [f"eval @ step {step}"]
  parts += [f"{label} {float(metrics[key]):.4g}" for label, key in EVAL_SUMMARY_KEYS
            if key in metrics]
  return " | ".join(parts)
