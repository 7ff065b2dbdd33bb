"""Load time, peak host memory and CPU/accelerator encode/decode time of a FLUX-size VAE.

    python -m benchmarks.flux_vae write /tmp/flux_ae       # random full-size BFL ae.safetensors
    python -m benchmarks.flux_vae measure /tmp/flux_ae --size 256

Run the two steps as separate processes so the writer's memory does not count in the load's
peak RSS (``ru_maxrss`` is a per-process high-water mark).
"""
from __future__ import annotations

import argparse
import os
import resource
import time
from unigrpo_jax.models.flux_vae import autoencoder as flux_autoencoder, weights as flux_weights
from unigrpo_jax.testing.flux_vae_fixture import write_random_flux_ae


def _rss_mb() -> float:
  with open("/proc/self/status") as fh:
    for line in fh:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("mode", choices=["write", "measure"])
  ap.add_argument("path")
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--dtype", default="float32")
  args = ap.parse_args()

  import jax
  import numpy as np
  from unigrpo_jax.models.flux_vae import model as fv

  if args.mode == "write":
    t0 = time.perf_counter()
    path = write_random_flux_ae(args.path.rstrip("/") + "/")
    print(f"wrote {path}: {os.path.getsize(path) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")
    return
  jax.numpy.zeros(1).block_until_ready()     # backend up before the baseline
  base = _rss_mb()
  t0 = time.perf_counter()
  ae = flux_weights.load_flux_vae(args.path, dtype=args.dtype)
  jax.block_until_ready(ae.state)
  load_s = time.perf_counter() - t0
  n = sum(x.size for x in jax.tree.leaves(ae.state))
  print(f"{ae.cfg}: {n / 1e6:.1f}M params")
  print(f"load: {load_s:.2f}s; RSS before {base:.0f} MB, after {_rss_mb():.0f} MB, "
        f"peak {_peak_mb():.0f} MB (weights {n * np.dtype(args.dtype).itemsize / 1e6:.0f} MB)")
  x = np.random.default_rng(0).uniform(-1, 1, (args.batch, args.size, args.size, 3))
  x = x.astype(np.float32)

  def timed(name, fn, arg):
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(arg))
      times.append(time.perf_counter() - t0)
    print(f"{name} {tuple(arg.shape)} -> {tuple(out.shape)} on {jax.devices()[0].platform}: "
          f"first call {times[0]:.2f}s (with compile), then {min(times[1:]):.2f}s")
    return out

  z = timed("encode", ae.encode, x)
  timed("decode", ae.decode, z)
  print(f"peak RSS at the end: {_peak_mb():.0f} MB")


if __name__ == "__main__":
  main()
