"""Load time and peak host memory of ``load_bagel`` on a BAGEL-format directory.

    python -m unigrpo_jax.testing.tiny_bagel /tmp/bagel_1b --size 1b
    python benchmarks/bagel_load.py /tmp/bagel_1b --dtype bfloat16 [--image_size 64] [--mesh]

Prints one JSON line: seconds to load (config + headers + every tensor, placed), the bytes read,
the peak resident set size of the process (``ru_maxrss``) and the RSS right before loading (the
Python + JAX baseline), so ``peak - baseline`` is what loading itself cost. Run each
measurement in a fresh process.
"""
import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("path")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--mesh", action="store_true", help="load into an fsdp mesh of all devices")
  args = p.parse_args()
  import jax
  from flax import nnx
  from unigrpo_jax import parallel
  from unigrpo_jax.models.unified.loading import load_bagel
  from unigrpo_jax.models.unified.model import count_params
  mesh = parallel.make_mesh(data=1, fsdp=-1, tensor=1) if args.mesh else None
  jax.numpy.zeros(1).block_until_ready()  # backend up before the baseline
  base = rss_mb()
  start = time.perf_counter()
  model = load_bagel(args.path, dtype=args.dtype, image_size=args.image_size, mesh=mesh)
  jax.block_until_ready(nnx.state(model))
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  size = os.path.getsize(os.path.join(args.path, "ema.safetensors"))
  print(json.dumps({"path": args.path, "params": count_params(model), "dtype": args.dtype,
                    "mesh": dict(mesh.shape) if mesh else None, "file_gb": round(size / 1e9, 3),
                    "load_s": round(seconds, 2), "rss_before_mb": round(base),
                    "peak_rss_mb": round(peak), "rss_after_mb": round(rss_mb())}))


if __name__ == "__main__":
  main()
