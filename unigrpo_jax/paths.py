"""Paths: the one place that reads and writes files a run names (its workdir, model directories,
prompt files), whether local or in a bucket.

* ``package://NAME`` names an asset shipped in this package (e.g. ``package://shapes_sft``, the
  SFT warm start); ``resolve_path`` turns it into the local file.
* ``gs://bucket/...`` (any ``scheme://``) is a remote path: every helper here goes through
  ``etils.epath`` (orbax's own path library), which uses ``tf.io.gfile`` for gs:// when TensorFlow
  is installed and fsspec/gcsfs otherwise (``EPATH_USE_TF=false``; that is how the tests reach a
  local GCS emulator, see ``tests/integration/test_gcs_workdir.py``). A remote path is never
  passed to ``os``: ``os.makedirs("gs://b/run")`` would create a local folder named ``gs:``.
* Local paths are used as given (``~`` expanded, made absolute by ``resolve_path``).

Object stores cannot append, so ``AppendFile`` (metrics.jsonl, log.txt) keeps a remote file's
text in memory and rewrites the object on ``flush`` (at most every ``min_interval_s``) and on
``close``; locally it is an ordinary append-mode file.
"""
from __future__ import annotations

import builtins
import os
import posixpath
import threading
import time
from typing import IO, Optional

PACKAGE_PREFIX = "package://"
ASSETS_DIR = os.path.join(os.path.dirname(__file__), "assets")


class PathError(OSError):
  """A path cannot be read or written (e.g. a missing or unreachable bucket)."""


def is_remote(path) -> bool:
  """``gs://...`` (any ``scheme://`` but ``package://``) -> True."""
  p = os.fspath(path)
  return "://" in p and not p.startswith(PACKAGE_PREFIX)


def resolve_path(path: str) -> str:
  """``package://NAME`` -> the asset shipped inside this package; ``gs://...`` unchanged; local
  paths made absolute."""
  path = os.fspath(path)
  if path.startswith(PACKAGE_PREFIX):
    return os.path.join(ASSETS_DIR, path[len(PACKAGE_PREFIX):])
  if is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def join(base, *parts: str) -> str:
  """``os.path.join`` for local paths, ``/``-joining for remote ones."""
  base = os.fspath(base)
  if is_remote(base):
    return posixpath.join(base, *parts)
  return os.path.join(base, *parts)


def _epath(path):
  from etils import epath  # imported lazily: TensorFlow is only imported for remote paths
  return epath.Path(os.fspath(path))


def open(path, mode: str = "r") -> IO:  # pylint: disable=redefined-builtin
  """Opens a local or remote file (text modes are UTF-8)."""
  if not is_remote(path):
    return builtins.open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))  # local-path: not remote
  return _epath(path).open(mode)


def exists(path) -> bool:
  if not is_remote(path):
    return os.path.exists(path)  # local-path: not remote
  return _epath(path).exists()


def isdir(path) -> bool:
  if not is_remote(path):
    return os.path.isdir(path)  # local-path: not remote
  return _epath(path).is_dir()


def isfile(path) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)  # local-path: not remote
  return _epath(path).is_file()


def getsize(path) -> int:
  """Size in bytes of a local file or a bucket object."""
  if not is_remote(path):
    return os.path.getsize(path)  # local-path: not remote
  return int(_epath(path).stat().length)


def makedirs(path) -> None:
  """``mkdir -p`` (a no-op for a bucket prefix that has no marker objects)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)  # local-path: not remote
    return
  _epath(path).mkdir(parents=True, exist_ok=True)


def listdir(path) -> list[str]:
  """Names (not paths) in a directory; [] for a missing one."""
  if not is_remote(path):
    return os.listdir(path) if os.path.isdir(path) else []  # local-path: not remote
  p = _epath(path)
  if not p.exists():
    return []
  return sorted(c.name for c in p.iterdir())


def rename(src, dst) -> None:
  """Moves the file ``src`` to ``dst``, replacing ``dst`` (atomic locally; remotely a read, a
  write and a delete: object stores have no rename, and the files moved here are small)."""
  if not is_remote(src) and not is_remote(dst):
    os.replace(src, dst)  # local-path: not remote
    return
  write_bytes(dst, read_bytes(src))
  remove(src)


def remove(path) -> None:
  if not is_remote(path):
    os.remove(path)  # local-path: not remote
    return
  _epath(path).unlink()


def read_bytes(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def read_text(path) -> str:
  with open(path, "r") as f:
    return f.read()


def write_bytes(path, data: bytes) -> None:
  """Writes a whole file: via ``path.tmp`` and a rename locally, one object upload remotely."""
  if is_remote(path):
    with open(path, "wb") as f:
      f.write(data)
    return
  with open(os.fspath(path) + ".tmp", "wb") as f:
    f.write(data)
  rename(os.fspath(path) + ".tmp", path)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def check_writable(directory: str, tag: str = "") -> None:
  """Start-up check of a workdir: creates it and writes, reads back and removes a probe file
  (``tag``, e.g. the process index, keeps the processes of a multi-host run off each other's
  probe). Raises PathError naming the path (a bad or unreachable bucket fails here, before any
  compile). A remote workdir leaves nothing on local disk."""
  probe = join(directory, f".unigrpo_write_probe{tag}")
  try:
    makedirs(directory)
    write_bytes(probe, b"ok")
    if read_bytes(probe) != b"ok":
      raise PathError(f"read back a different probe from {probe}")
    remove(probe)
  except Exception as e:  # gfile / gcsfs / os raise many types
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise PathError(f"workdir {directory} is not writable: {type(e).__name__}: {msg}") from e


class AppendFile:
  """A text file opened for appending, local or remote.

  Local: an ordinary line-buffered append-mode file (``fileno()`` works). Remote: the existing
  text is read once, writes go to memory and ``flush()`` rewrites the whole object (at most once
  every ``min_interval_s`` seconds; ``flush(force=True)`` and ``close()`` always do).
  ``fileno()`` of a remote file is the write end of a pipe whose bytes are appended too (native
  stderr of ``console.route_logs``).
  """

  def __init__(self, path: str, min_interval_s: float = 0.0):
    self.path = path
    self.remote = is_remote(path)
    self._min_interval = min_interval_s
    self._lock = threading.Lock()
    self._pipe: Optional[tuple[int, int]] = None
    self._reader: Optional[threading.Thread] = None
    if not self.remote:
      self._file = builtins.open(path, "a", buffering=1, encoding="utf-8")  # local-path: not remote
      return
    self._file = None
    self._text = read_text(path) if exists(path) else ""
    self._dirty = True
    self._last_upload = 0.0
    self.flush(force=True)  # creates the object now: a run whose bucket breaks later fails early

  def write(self, s: str) -> int:
    if self._file is not None:
      return self._file.write(s)
    with self._lock:
      self._text += s
      self._dirty = True
    return len(s)

  def fileno(self) -> int:
    if self._file is not None:
      return self._file.fileno()
    if self._pipe is None:
      self._pipe = os.pipe()
      self._reader = threading.Thread(target=self._drain, args=(self._pipe[0],), daemon=True)
      self._reader.start()
    return self._pipe[1]

  def _drain(self, fd: int) -> None:
    while True:
      data = os.read(fd, 65536)
      if not data:
        break
      self.write(data.decode("utf-8", errors="replace"))
    os.close(fd)

  def flush(self, force: bool = False) -> None:
    if self._file is not None:
      self._file.flush()
      return
    now = time.monotonic()
    with self._lock:
      if not self._dirty or (not force and now - self._last_upload < self._min_interval):
        return
      text, self._dirty, self._last_upload = self._text, False, now
    with open(self.path, "w") as f:
      f.write(text)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      return
    if self._pipe is not None:
      os.close(self._pipe[1])
      self._reader.join(timeout=10)
      self._pipe = None
    self.flush(force=True)

  def __enter__(self) -> "AppendFile":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
