"""Where a run's messages go: the console gets the progress line, evaluation summaries, warnings
and errors; library INFO chatter goes to ``<workdir>/log.txt``.

The chatter has two sources, both handled by ``route_logs``:

* Python logging (absl INFO from orbax's checkpoint manager, clu's metric writer, JAX's backend
  probing, TensorFlow): every record goes to ``log.txt``; the console only shows WARNING and
  above (everything with ``verbose=True``, i.e. ``--config.verbose_logs=True``).
* Native libraries (XLA, libtpu, TensorFlow's C++ start-up lines) write to file descriptor 2
  directly. Unless verbose, fd 2 is pointed at ``log.txt`` for the duration of the run while
  Python's ``sys.stderr`` keeps writing to the real console, so Python warnings, tracebacks and
  error messages still appear there. A process killed inside native code (no Python exception)
  leaves its last words in ``log.txt``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from typing import Iterator

from unigrpo_jax import paths

LOG_FILE = "log.txt"


def _formatter() -> logging.Formatter:
  from absl import logging as absl_logging  # the familiar "I1123 20:02:15 file.py:12] ..." lines
  return absl_logging.PythonFormatter()


@contextlib.contextmanager
def _native_stderr_to(log_file) -> Iterator:
  """Points fd 2 at ``log_file``; yields (and installs as ``sys.stderr``) a text stream on a
  copy of the original fd 2, i.e. the console."""
  sys.stderr.flush()
  console_fd = os.dup(2)
  console = os.fdopen(console_fd, "w", buffering=1, encoding="utf-8", errors="replace")
  saved_stderr = sys.stderr
  os.dup2(log_file.fileno(), 2)
  sys.stderr = console
  try:
    yield console
  finally:
    console.flush()
    os.dup2(console_fd, 2)
    sys.stderr = saved_stderr
    console.close()


@contextlib.contextmanager
def route_logs(workdir: str, verbose: bool = False, process_index: int = 0) -> Iterator[str]:
  """Routes logging (and, unless ``verbose``, native stderr) as the module docstring says.

  Yields the log file's path. Everything is restored on exit, so it nests in tests. An
  exception leaving the block is also written, with its traceback, to the log file. In a
  gs:// workdir, process i > 0 writes ``log.process_<i>.txt`` (an object has one writer; local
  files are appended to by every process of the host).
  """
  paths.makedirs(workdir)
  name = LOG_FILE if process_index == 0 or not paths.is_remote(workdir) \
      else f"log.process_{process_index}.txt"
  path = paths.join(workdir, name)
  root = logging.getLogger()
  saved_level, saved_handlers = root.level, list(root.handlers)
  # gs://: the text is kept in memory and the object rewritten every 30 s and at exit; native
  # stderr reaches it through a pipe (paths.AppendFile.fileno).
  with paths.AppendFile(path, min_interval_s=30.0) as log_file, \
      contextlib.ExitStack() as stack:
    console = sys.stderr if verbose else stack.enter_context(_native_stderr_to(log_file))
    to_file = logging.StreamHandler(log_file)
    to_console = logging.StreamHandler(console)
    to_console.setLevel(logging.INFO if verbose else logging.WARNING)
    for h in (to_file, to_console):
      h.setFormatter(_formatter())
    for h in saved_handlers:
      root.removeHandler(h)
    root.addHandler(to_file)
    root.addHandler(to_console)
    root.setLevel(logging.INFO)
    try:
      yield path
    except BaseException:
      log_file.write(traceback.format_exc())
      raise
    finally:
      root.removeHandler(to_file)
      root.removeHandler(to_console)
      for h in saved_handlers:
        root.addHandler(h)
      root.setLevel(saved_level)
