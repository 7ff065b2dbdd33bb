"""Reading and writing safetensors checkpoints one tensor at a time (no torch).

``TensorIndex`` validates the headers of one or several files (a single ``*.safetensors`` or an HF
sharded ``*.safetensors.index.json``) before anything is read: a missing shard, a malformed or
truncated file, or a key in two shards fails with one line naming the file. Tensors are then read
lazily through ``safetensors.safe_open(framework="numpy")``, whole or as a slice, so a 29 GB file
never sits in host memory and no tensor is read twice.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Optional, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open

from unigrpo_jax import paths

# safetensors dtype names -> numpy dtypes (bf16 through ml_dtypes, as safe_open returns it).
_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_DTYPE_NAMES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_ST_NAMES = {np.dtype(v): k for k, v in _NP_DTYPES.items()}


class CheckpointFormatError(ValueError):
  """A foreign checkpoint that cannot be read: the message names the file and the key."""


def numpy_dtype(name: str):
  """'float32' | 'bfloat16' | 'float16' -> numpy dtype (bf16 from ml_dtypes)."""
  if name not in _DTYPE_NAMES:
    raise ValueError(f"dtype={name!r} is not one of {sorted(_DTYPE_NAMES)}")
  return np.dtype(_DTYPE_NAMES[name])


def read_header(path: str) -> dict:
  """Parses and checks a safetensors header: {key: (dtype name, shape)} (metadata dropped).

  Raises CheckpointFormatError on a missing, malformed or truncated file (data shorter than the
  header's offsets say). ``path`` may be local or ``gs://`` (read through ``unigrpo_jax.paths``).
  """
  entries, _ = _read_layout(path)
  return {key: (dtype, shape) for key, (dtype, shape, _) in entries.items()}


def _read_layout(path: str) -> tuple[dict, int]:
  """-> ({key: (dtype name, shape, start byte of its data)}, header end); checked as above."""
  if not paths.isfile(path):
    raise CheckpointFormatError(f"{path}: file not found")
  size = paths.getsize(path)
  with paths.open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointFormatError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise CheckpointFormatError(f"{path}: truncated or not a safetensors file (header of {n} "
                                  f"bytes, file of {size})")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise CheckpointFormatError(f"{path}: unreadable safetensors header: {e}") from None
  out, end, last = {}, 0, None
  for key, info in header.items():
    if key == "__metadata__":
      continue
    try:
      dtype, shape, (start, stop) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise CheckpointFormatError(f"{path}: malformed header entry for key {key!r}") from None
    if dtype not in _NP_DTYPES:
      raise CheckpointFormatError(f"{path}: key {key!r} has unsupported dtype {dtype}")
    want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_NP_DTYPES[dtype]).itemsize
    if stop - start != want:
      raise CheckpointFormatError(f"{path}: key {key!r} holds {stop - start} bytes, its shape "
                                  f"{list(shape)} x {dtype} needs {want}")
    if stop > end:
      end, last = stop, key
    out[key] = (dtype, shape, 8 + n + start)
  if 8 + n + end > size:
    raise CheckpointFormatError(f"{path}: truncated: tensor {last!r} ends at byte {8 + n + end} "
                                f"but the file has {size} bytes")
  return out, 8 + n


class TensorIndex:
  """Where each tensor of a (possibly sharded) checkpoint lives; reads them one at a time.

  Args:
    files: the safetensors files, local or ``gs://`` (all of them are header-checked now).
  Attributes:
    shapes: {key: shape}; dtypes: {key: safetensors dtype name}; file_of: {key: path};
    bytes_read: tensor bytes fetched from remote files so far (what a host downloaded).

  Local files are read through ``safe_open`` (memory-mapped). A ``gs://`` file is read in place
  with ranged reads, never copied to local disk: a slice fetches only the rows of the tensor's
  first axis that it spans (so a host loading an FSDP-sharded weight reads about its share).
  """

  def __init__(self, files: Sequence[str]):
    self.shapes, self.dtypes, self.file_of, self._offset = {}, {}, {}, {}
    self.bytes_read = 0
    self._handles = {}  # remote path -> open binary file (one per shard, closed by close())
    for path in files:
      entries, _ = _read_layout(path)
      for key, (dtype, shape, offset) in entries.items():
        if key in self.file_of:
          raise CheckpointFormatError(f"{path}: key {key!r} is also in {self.file_of[key]}")
        self.shapes[key], self.dtypes[key], self.file_of[key] = shape, dtype, path
        self._offset[key] = offset

  @classmethod
  def from_path(cls, directory: str, single: str, index: Optional[str] = None) -> "TensorIndex":
    """``directory/single`` or, if absent, the shards named by ``directory/index`` (HF layout)."""
    path = paths.join(directory, single)
    if paths.isfile(path) or index is None:
      return cls([path])
    index_path = paths.join(directory, index)
    if not paths.isfile(index_path):
      raise CheckpointFormatError(f"{directory}: neither {single} nor {index} found")
    try:
      weight_map = json.loads(paths.read_text(index_path))["weight_map"]
    except (ValueError, KeyError) as e:
      raise CheckpointFormatError(f"{index_path}: not an HF safetensors index ({e})") from None
    shards = sorted(set(weight_map.values()))
    idx = cls([paths.join(directory, s) for s in shards])
    for key, shard in weight_map.items():
      if idx.file_of.get(key) != paths.join(directory, shard):
        raise CheckpointFormatError(f"{index_path}: key {key!r} is not in shard {shard}")
    return idx

  def nbytes(self, keys: Iterable[str]) -> int:
    return sum(int(np.prod(self.shapes[k], dtype=np.int64))
               * np.dtype(_NP_DTYPES[self.dtypes[k]]).itemsize for k in keys)

  def read(self, key: str, index: Optional[tuple] = None) -> np.ndarray:
    """The tensor ``key`` (or ``index``, a tuple of slices, of it) as a numpy array.

    A local file is mapped for this one read only: pages of tensors already read do not stay in
    the process's resident memory (on a 29 GB file they would add up to the whole file).
    """
    path = self.file_of[key]
    if paths.is_remote(path):
      return self._read_remote(key, index)
    with safe_open(path, framework="numpy") as handle:
      if index is None:
        return handle.get_tensor(key)
      return handle.get_slice(key)[index]

  def _read_remote(self, key: str, index: Optional[tuple]) -> np.ndarray:
    """One ranged read: the rows of axis 0 that ``index`` spans; the other axes sliced here."""
    shape, dtype = self.shapes[key], np.dtype(_NP_DTYPES[self.dtypes[key]])
    index = tuple(index or ())
    index += (slice(None),) * (len(shape) - len(index))
    if not shape:  # a scalar
      first, rows, row_bytes = 0, 1, dtype.itemsize
    else:
      first, stop, step = index[0].indices(shape[0])
      if step != 1:
        raise ValueError(f"{key}: strided slices are not supported ({index[0]})")
      rows = max(stop - first, 0)
      row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    path = self.file_of[key]
    if path not in self._handles:
      self._handles[path] = paths.open(path, "rb")
    f = self._handles[path]
    f.seek(self._offset[key] + first * row_bytes)
    data = f.read(rows * row_bytes)
    if len(data) != rows * row_bytes:
      raise CheckpointFormatError(f"{path}: short read of tensor {key!r} ({len(data)} of "
                                  f"{rows * row_bytes} bytes)")
    self.bytes_read += len(data)
    block = np.frombuffer(data, dtype).reshape((rows,) + tuple(shape[1:]) if shape else ())
    return block[(slice(None),) + index[1:]].copy() if shape else block.copy()

  def close(self):
    """Closes the remote files' handles (local reads keep nothing open)."""
    for f in self._handles.values():
      f.close()
    self._handles = {}


def write_file(path: str, tensors: dict, metadata: Optional[dict] = None) -> None:
  """Writes {key: numpy array} to ``path`` (via a temporary file: never a half-written file)."""
  from safetensors.numpy import save_file  # local: only writers need it
  tmp = path + ".tmp"
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)  # an ordinary file for the user (the writer makes it 0600)
  os.replace(tmp, path)


def write_streaming(path: str, specs: Sequence[tuple], metadata: Optional[dict] = None) -> None:
  """Writes a safetensors file one tensor at a time (host memory: one tensor).

  Args:
    specs: ``(key, numpy dtype, shape, produce)`` per tensor; ``produce()`` returns the array
      (called once, in order, after the header is written).
  The header is laid out from the specs first (contiguous offsets in the given order, padded to
  8 bytes); a produced array of the wrong shape or dtype raises before anything is renamed into
  place (the file is written to ``path + ".tmp"``).
  """
  header, offset = {}, 0
  for key, dtype, shape, _ in specs:
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[key] = {"dtype": _ST_NAMES[dtype], "shape": [int(d) for d in shape],
                   "data_offsets": [offset, offset + n]}
    offset += n
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  tmp = path + ".tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(raw)))
      f.write(raw)
      for key, dtype, shape, produce in specs:
        arr = np.ascontiguousarray(produce())
        if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
          raise ValueError(f"{path}: tensor {key!r} produced {arr.dtype}{list(arr.shape)}, "
                           f"declared {np.dtype(dtype)}{list(shape)}")
        f.write(arr.tobytes())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
