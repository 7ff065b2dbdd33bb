"""Observability of a run: metric writers (TensorBoard + metrics.jsonl), compile counter, progress.

Only process 0 writes files; every process may call the writer.
"""
from __future__ import annotations

import itertools
import json
import math
import struct
import sys
import threading
import time
from typing import Mapping, Optional

import jax
import numpy as np

from unigrpo_jax import paths


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
    # Local: an append-mode file; gs://: rewritten on flush (at most every 30 s) and on close.
    self._jsonl = paths.AppendFile(paths.join(workdir, "metrics.jsonl"),
                                   min_interval_s=30.0) if self.is_main else None

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
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def truncate_metrics(workdir: str, last_step: int) -> list[int]:
  """Drops metrics rows after ``last_step`` (a resumed run rewrites them identically); -1 drops
  every row. A torn last line (a run killed mid-write) is dropped too. -> the dropped steps."""
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    return []
  lines = [line for line in paths.read_text(path).splitlines() if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise ValueError(f"{path}, line {i + 1}: not JSON: {line[:200]!r}") from None
  kept = [r for r in rows if r["step"] <= last_step]
  if len(kept) != len(lines):
    paths.write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
  return [r["step"] for r in rows if r["step"] > last_step]


EVENTS_PREFIX = "events.out.tfevents."  # TensorBoard event files (clu's writer, in the workdir)


def _event_records(path: str):
  """(step, framed record bytes) of each whole record of a TensorBoard event file (TFRecord
  framing: u64 length, u32 crc, data, u32 crc). A torn last record (a killed writer) is left
  out."""
  from tensorboard.compat.proto import event_pb2  # protobuf only: no TensorFlow import
  data = paths.read_bytes(path)
  pos = 0
  while pos + 12 <= len(data):
    (n,) = struct.unpack_from("<Q", data, pos)
    end = pos + 12 + n + 4
    if end > len(data):
      break
    yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]).step, data[pos:end]
    pos = end


def restart_metrics(workdir: str, last_step: Optional[int]) -> Optional[str]:
  """Before a (re)started run writes its first step: every step after ``last_step`` (the
  checkpoint it resumes from; None: no checkpoint, the run starts at step 0 and rewrites it)
  leaves the live metrics, so that no step is ever written twice.

  ``metrics.jsonl`` keeps the rows up to ``last_step`` (none without a checkpoint). TensorBoard
  event files that hold a later step are moved to ``abandoned_<UTC time>/`` in the workdir; with a
  checkpoint each is replaced by a copy of its records up to ``last_step``. Returns what was
  done as one line for the console, or None when the workdir held nothing after ``last_step``.
  Called by process 0 only.
  """
  keep = -1 if last_step is None else last_step
  dropped = truncate_metrics(workdir, keep)
  moved = []
  names = sorted(n for n in paths.listdir(workdir) if n.startswith(EVENTS_PREFIX))
  abandoned = None
  for name in names:
    path = paths.join(workdir, name)
    records = list(_event_records(path))
    if last_step is not None and all(step <= keep for step, _ in records):
      continue
    if abandoned is None:
      stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
      abandoned = paths.join(workdir, f"abandoned_{stamp}")
      for i in itertools.count(1):
        if not paths.exists(abandoned):
          break
        abandoned = paths.join(workdir, f"abandoned_{stamp}_{i}")
      paths.makedirs(abandoned)
    paths.rename(path, paths.join(abandoned, name))
    moved.append(name)
    if last_step is not None:  # the file's records up to the checkpoint stay live
      paths.write_bytes(path, b"".join(raw for step, raw in records if step <= keep))
  if not dropped and not moved:
    return None
  what = []
  if dropped:
    what.append(f"{len(dropped)} metrics.jsonl row(s) (steps {min(dropped)}..{max(dropped)}) "
                "dropped")
  if moved:
    what.append(f"{len(moved)} TensorBoard event file(s) moved to {abandoned}"
                + ("" if last_step is None else f" (a copy up to step {last_step} stays)"))
  head = ("no checkpoint: starting afresh at step 0" if last_step is None
          else f"resuming after step {last_step}")
  return f"{head}, replacing an earlier attempt's metrics: {'; '.join(what)}"


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
