"""Multi-process (multi-host) SPMD plumbing: start-up, host data <-> global arrays, bounded
synchronisation, preemption, and process-0-only side effects.

One Python process runs per host and owns that host's devices; every process runs the same
program on the same global arrays (JAX multi-controller). What this module guarantees:

* ``initialize`` calls ``jax.distributed.initialize`` before any device is touched, with a
  bounded start-up (``distributed.init_timeout_s``); multi-process CPU uses gloo collectives.
* Host data only ever moves between processes through the coordination service's key-value
  store with a timeout (``exchange``), never through an unbounded device collective, so a dead
  or hung peer surfaces as a ``PeerError`` naming the process and the exchange instead of a
  hang. ``barrier`` is a coordination-service barrier with a timeout (``sync_global_devices``
  has none).
* ``preemption_reached`` is the single check the trainer calls at every sync point; it is true
  on ALL processes at the same sync point after a SIGTERM to any one of them.

With one process (no coordinator) every function degrades to the obvious local behaviour, so the
trainer has a single code path.
"""
from __future__ import annotations

import dataclasses
import io
import json
import signal
from typing import Any, Optional, Sequence

import jax
import numpy as np

_ADDRESS_HELP = "must be '' (one process), 'auto' (Cloud TPU / SLURM detection) or 'host:port'"


class DistributedError(RuntimeError):
  """Start-up failed (bad process count/id, unreachable coordinator)."""


class PeerError(RuntimeError):
  """Another process did not arrive at a barrier or exchange within the timeout."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """``config.distributed``. coordinator_address: '' = single process; 'auto' = let JAX detect
  the cluster (Cloud TPU VM, SLURM, ...); 'host:port' = explicit (then num_processes and
  process_id are required). Timeouts are seconds."""
  coordinator_address: str = ""
  num_processes: int = 1
  process_id: int = 0
  init_timeout_s: int = 300
  heartbeat_timeout_s: int = 100
  barrier_timeout_s: int = 600

  @classmethod
  def from_config(cls, c) -> "DistributedConfig":
    return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls) if f.name in c})

  def validate(self) -> None:
    """Static checks (before any connection): raises DistributedError naming the key."""
    addr = self.coordinator_address
    if not isinstance(addr, str) or (addr not in ("", "auto") and (
        ":" not in addr or not addr.rsplit(":", 1)[1].isdigit())):
      raise DistributedError(f"distributed.coordinator_address={addr!r}: {_ADDRESS_HELP}")
    n, pid = self.num_processes, self.process_id
    if not isinstance(n, int) or n < 1:
      raise DistributedError(f"distributed.num_processes={n!r}: must be an integer >= 1")
    if not isinstance(pid, int) or not 0 <= pid < n:
      raise DistributedError(f"distributed.process_id={pid!r}: must be in [0, num_processes="
                             f"{n})")
    if addr == "" and n > 1:
      raise DistributedError(f"distributed.num_processes={n} needs "
                             "distributed.coordinator_address ('host:port' of process 0)")
    for key in ("init_timeout_s", "heartbeat_timeout_s", "barrier_timeout_s"):
      value = getattr(self, key)
      if not isinstance(value, int) or value < 1:
        raise DistributedError(f"distributed.{key}={value!r}: must be an integer >= 1 "
                               "(seconds)")


_STATE: dict[str, Any] = {"barrier_timeout_s": 600, "counters": {}}


def initialize(cfg: DistributedConfig) -> None:
  """Connects this process to the others (no-op for a single process); prints one line.

  Must run before anything creates a JAX backend (``jax.devices()``, any array). Raises
  DistributedError with one line naming the failing value.
  """
  cfg.validate()
  _STATE["barrier_timeout_s"] = cfg.barrier_timeout_s
  if cfg.coordinator_address:
    # gloo is JAX's default CPU collective implementation; set it explicitly so a changed
    # default cannot make multi-process CPU runs fail (it only affects the CPU backend).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = cfg.coordinator_address != "auto"
    if explicit and cfg.process_id != 0:
      # JAX's client aborts the whole process (C++ LOG(FATAL)) when it cannot register: probe
      # the coordinator first so an unreachable address is one clear line instead.
      _wait_for_coordinator(cfg)
    try:
      jax.distributed.initialize(
          coordinator_address=cfg.coordinator_address if explicit else None,
          num_processes=cfg.num_processes if explicit else None,
          process_id=cfg.process_id if explicit else None,
          initialization_timeout=cfg.init_timeout_s,
          heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
    except Exception as e:  # XlaRuntimeError (DEADLINE_EXCEEDED, bind failure), ValueError
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise DistributedError(
          f"distributed.coordinator_address={cfg.coordinator_address!r}: process "
          f"{cfg.process_id} of {cfg.num_processes} could not start within init_timeout_s="
          f"{cfg.init_timeout_s}: {first[:300]}") from None
    if explicit and (jax.process_count() != cfg.num_processes
                     or jax.process_index() != cfg.process_id):
      raise DistributedError(
          f"distributed.num_processes={cfg.num_processes}, process_id={cfg.process_id}: the "
          f"coordinator reports process {jax.process_index()} of {jax.process_count()}")
  local, total = jax.local_device_count(), jax.device_count()
  print(f"process {jax.process_index()}/{jax.process_count()}: {local} local "
        f"{jax.default_backend()} devices, {total} global", flush=True)
  if jax.process_index() != 0:
    _quiet_logging()


def _wait_for_coordinator(cfg: DistributedConfig) -> None:
  import socket
  import time
  host, port = cfg.coordinator_address.rsplit(":", 1)
  host = host.strip("[]")
  deadline = time.monotonic() + cfg.init_timeout_s
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=5).close()
      return
    except OSError as e:
      if time.monotonic() > deadline:
        raise DistributedError(
            f"distributed.coordinator_address={cfg.coordinator_address!r}: process "
            f"{cfg.process_id} of {cfg.num_processes} cannot reach the coordinator (process 0) "
            f"within init_timeout_s={cfg.init_timeout_s}: {e}") from None
      time.sleep(0.5)


def _quiet_logging() -> None:
  """Processes other than 0 log errors only (their INFO/WARNING lines duplicate process 0's)."""
  import logging
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
  logging.getLogger("jax").setLevel(logging.ERROR)


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def is_main() -> bool:
  """True on the process that writes files and prints (process 0)."""
  return jax.process_index() == 0


def main_print(*args, **kwargs) -> None:
  if is_main():
    print(*args, **kwargs, flush=True)


def _client():
  from jax._src import distributed as jax_distributed  # the coordination-service client
  return jax_distributed.global_state.client


def _unique(name: str) -> str:
  """Barrier/exchange ids must be fresh; every process issues the same sequence of calls."""
  n = _STATE["counters"].get(name, 0)
  _STATE["counters"][name] = n + 1
  return f"unigrpo/{name}/{n}"


def barrier(name: str, timeout_s: Optional[int] = None) -> None:
  """All processes wait here; PeerError if one does not arrive within the timeout."""
  if not is_multiprocess():
    return
  timeout_s = timeout_s or _STATE["barrier_timeout_s"]
  try:
    _client().wait_at_barrier(_unique(name), timeout_s * 1000)
  except Exception as e:
    raise PeerError(f"process {jax.process_index()}: barrier {name!r} timed out after "
                    f"{timeout_s}s (a peer process died or hangs): "
                    f"{str(e).strip()[:200]}") from None


def exchange(name: str, value: Any, timeout_s: Optional[int] = None) -> list:
  """Every process contributes ``value`` (JSON, or a numpy array); returns all processes'
  values, index = process index. Bounded: PeerError names the missing process."""
  if not is_multiprocess():
    return [value]
  timeout_s = timeout_s or _STATE["barrier_timeout_s"]
  client, me, n = _client(), jax.process_index(), jax.process_count()
  key = _unique(name)
  client.key_value_set_bytes(f"{key}/{me}", _encode(value))
  out = []
  for p in range(n):
    try:
      out.append(_decode(client.blocking_key_value_get_bytes(f"{key}/{p}", timeout_s * 1000)))
    except Exception as e:
      raise PeerError(f"process {me}: process {p} did not send {name!r} within {timeout_s}s "
                      f"(it died or hangs): {str(e).strip()[:200]}") from None
  # Everyone has read the previous exchange of this name before posting this one: drop ours.
  previous = _STATE.setdefault("previous_keys", {}).get(name)
  if previous is not None:
    client.key_value_delete(f"{previous}/{me}")
  _STATE["previous_keys"][name] = key
  return out


def _encode(value: Any) -> bytes:
  if isinstance(value, np.ndarray):
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=False)
    return b"N" + buf.getvalue()
  return b"J" + json.dumps(value, sort_keys=True).encode()


def _decode(data: bytes) -> Any:
  if data[:1] == b"N":
    return np.load(io.BytesIO(data[1:]), allow_pickle=False)
  return json.loads(data[1:].decode())


def allgather_rows(local: np.ndarray, name: str) -> np.ndarray:
  """Concatenates every process's [r, ...] rows in process order (small host arrays only)."""
  return np.concatenate(exchange(name, np.ascontiguousarray(local)), axis=0)


def check_same_everywhere(name: str, value: Any) -> None:
  """Raises (on every process) if processes disagree on ``value`` (e.g. the config)."""
  values = exchange(f"check/{name}", value)
  for p, v in enumerate(values):
    if v != values[0]:
      raise DistributedError(f"{name} differs between process 0 and process {p}: every "
                             "process must run the same command")


# ---------------------------------------------------------------- rows of the global batch
def process_block(num_rows: int, what: str = "batch") -> tuple[int, int]:
  """[start, stop) of the rows this process loads and scores: the p-th of n equal blocks."""
  n, p = jax.process_count(), jax.process_index()
  if num_rows % n:
    raise ValueError(f"{what} of {num_rows} rows cannot be split evenly over {n} processes")
  size = num_rows // n
  return p * size, (p + 1) * size


def global_array(sharding: jax.sharding.Sharding, full: np.ndarray) -> jax.Array:
  """A global array from a host array every process holds in full (tiny: keys, advantages).

  Each process places only the pieces its devices hold; works for any sharding.
  """
  full = np.asarray(full)
  return jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])


def from_process_rows(sharding: jax.sharding.Sharding, local: np.ndarray) -> jax.Array:
  """A global [B, ...] array from this process's block of rows (``process_block`` order)."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def local_rows(arr: jax.Array, start: int, stop: int) -> np.ndarray:
  """Rows [start, stop) of a global [B, ...] array, read from this process's own shards.

  Raises ValueError if this process's devices do not hold all of those rows (the batch layout
  must give every process its own block, as ``parallel.batch_sharding`` on a process-ordered
  mesh does).
  """
  if arr.is_fully_addressable:
    return np.asarray(jax.device_get(arr))[start:stop]
  out = np.empty((stop - start,) + arr.shape[1:], arr.dtype)
  have = np.zeros(stop - start, bool)
  for shard in arr.addressable_shards:
    rows = shard.index[0] if shard.index else slice(None)
    lo, hi, _ = rows.indices(arr.shape[0])
    a, b = max(lo, start), min(hi, stop)
    if a >= b or have[a - start:b - start].all():
      continue
    data = np.asarray(shard.data)
    rest = tuple(shard.index[1:])
    if any(s != slice(None) and s.indices(d) != (0, d, 1) for s, d in zip(rest, arr.shape[1:])):
      raise ValueError("local_rows needs arrays sharded along the batch axis only")
    out[a - start:b - start] = data[a - lo:b - lo]
    have[a - start:b - start] = True
  if not have.all():
    raise ValueError(f"process {jax.process_index()} does not hold rows [{start}, {stop}) of "
                     f"an array sharded as {arr.sharding}")
  return out


def to_host(tree):
  """numpy copies of (small) global arrays on every process: a local read when this process
  holds all of an array, else an all-gather (a collective: every process must call it)."""
  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(jax.device_get(x) if isinstance(x, jax.Array) else x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def assert_global(tree, what: str) -> None:
  """Every leaf must be a jax.Array over all devices (orbax cannot save host-local arrays)."""
  n = jax.device_count()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not isinstance(leaf, jax.Array) or len(leaf.sharding.device_set) != n:
      raise ValueError(f"{what}{jax.tree_util.keystr(path)} is not a global array over all "
                       f"{n} devices (sharding {getattr(leaf, 'sharding', type(leaf))})")


# ---------------------------------------------------------------- preemption
class PreemptionWatch:
  """SIGTERM -> stop at a sync point that is the same on every process.

  Multi-process: JAX's preemption sync manager (it handles SIGTERM itself and agrees on the
  first sync id every process reaches after the notice). One process: a SIGTERM flag. Sync ids
  must increase and every process must call ``reached`` with the same ids.
  """

  def __init__(self):
    self._flag = False
    self._multi = is_multiprocess()
    self._previous = None if self._multi else signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self._flag = True

  def reached(self, sync_id: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(sync_id))
    return self._flag

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
