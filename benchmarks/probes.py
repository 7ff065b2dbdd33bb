"""Timing helpers and the machine-limit probes (matmul rate, memory bandwidth), host memory."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp


def block(tree):
  """Waits for every array of ``tree`` (outputs of an async dispatch)."""
  return jax.block_until_ready(tree)


def compile_timed(jitted, *args):
  """``jitted.lower(*args).compile()`` -> (compiled executable, seconds spent)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def median_time(fn, *, warmup: int, repeats: int, slow_s: float | None = None):
  """Runs ``fn()`` (which must block on its result) ``warmup`` times, then times ``repeats``
  runs. With ``slow_s``, a call whose first warm-up run took longer than that gets one warm-up
  and 3 timed runs only (the full set on a CPU would otherwise take half an hour).
  Returns (median seconds, list of seconds, the last result)."""
  start = time.perf_counter()
  out = fn()
  if slow_s is not None and time.perf_counter() - start > slow_s:
    warmup, repeats = 1, min(repeats, 3)
  for _ in range(warmup - 1):
    out = fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times, out


def on_accelerator() -> bool:
  return jax.devices()[0].platform in ("gpu", "tpu")


def peak_matmul(dtype, *, warmup: int = 2, repeats: int = 5, size: int | None = None) -> dict:
  """The machine's dense matmul rate: ``2 n^3 / t`` for a jitted ``[n, n] @ [n, n]`` in ``dtype``
  (n = 8192 on an accelerator, 2048 on a CPU), median of ``repeats`` timed runs."""
  n = size or (8192 if on_accelerator() else 2048)
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  mm = jax.jit(lambda x, y: x @ y)
  sec, times, _ = median_time(lambda: block(mm(a, b)), warmup=warmup, repeats=repeats)
  return {"flops_per_s": 2.0 * n ** 3 / sec, "n": n, "dtype": jnp.dtype(dtype).name,
          "seconds": sec, "times": times}


def peak_membw(*, warmup: int = 2, repeats: int = 5, num_bytes: int | None = None) -> dict:
  """Memory bandwidth: a jitted ``x <- 2 x + 1`` over a float32 array far larger than any cache
  (1 GiB on an accelerator, 256 MiB on a CPU); rate = (bytes read + bytes written) / time.

  The input is donated so the update runs in place: a fresh 256 MiB output per call would time
  the host's page faults (5-10x slower on a CPU), not the memory.
  """
  num_bytes = num_bytes or ((1 << 30) if on_accelerator() else (256 << 20))
  axpy = jax.jit(lambda v: 2.0 * v + 1.0, donate_argnums=0)
  holder = [jnp.ones((num_bytes // 4,), jnp.float32)]

  def run():
    holder[0] = block(axpy(holder[0]))

  sec, times, _ = median_time(run, warmup=warmup, repeats=repeats)
  nbytes = holder[0].nbytes
  return {"bytes_per_s": 2.0 * nbytes / sec, "array_bytes": nbytes, "seconds": sec,
          "times": times}


def peak_host_memory_bytes() -> int:
  """Peak resident set size of this process (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024)


def machine_info() -> dict:
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
          "jax_version": jax.__version__, "python": platform.python_version(),
          "machine": platform.machine()}
