"""Reward-server throughput through the protocol, and what each injected fault does.

  python -m benchmarks.reward_server [--sizes 256 1024] [--images 64] [--out FILE.json]

The server (``rewards.serve.make_app`` with a trivial reward: mean pixel) runs in a separate
process on 127.0.0.1, as a real deployment would; the client is ``rewards.remote``'s, with its
defaults (16 images a request, 4 in flight). Images are random noise (PNG's worst case) and a
smooth gradient (closer to real images). The time covers PNG encoding, JSON, HTTP, decoding on
the server, the reward and the checked response.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import time

import numpy as np


def _trivial(images, specs, reasoning_texts=None):
  del specs, reasoning_texts
  return {"reward": np.asarray(images, np.float32).mean(axis=(1, 2, 3)) / 255.0}


def _serve(port: int) -> None:
  from aiohttp import web
  from unigrpo_jax.rewards import serve
  web.run_app(serve.make_app(_trivial), host="127.0.0.1", port=port, print=None)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _images(kind: str, n: int, size: int) -> np.ndarray:
  if kind == "noise":
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  y, x = np.mgrid[0:size, 0:size] / size
  base = np.stack([x, y, (x + y) / 2], -1)
  return np.stack([(255 * ((base + i / n) % 1.0)).astype(np.uint8) for i in range(n)])


def measure(url: str, sizes, n: int, repeats: int = 2) -> list[dict]:
  from unigrpo_jax.rewards import protocol, remote
  client = remote.ProtocolClient(remote.Transport(url=url, name="bench",
                                                  max_response_bytes=1 << 20), 16, 4)
  rows = []
  for size in sizes:
    for kind in ("noise", "smooth"):
      images = _images(kind, n, size)
      prompts, meta = ["p"] * n, [{}] * n
      out = client.score(images[:4], prompts[:4], meta[:4])  # warm up
      t0 = time.perf_counter()
      enc = [protocol.encode_png(im) for im in images[:16]]
      t_enc = (time.perf_counter() - t0) / 16
      best = float("inf")
      for _ in range(repeats):
        t0 = time.perf_counter()
        out = client.score(images, prompts, meta)
        best = min(best, time.perf_counter() - t0)
      np.testing.assert_allclose(out["reward"], _trivial(images, None)["reward"], atol=1e-5)
      rows.append({"size": size, "images": kind, "n": n, "images_per_s": n / best,
                   "png_kb_per_image": np.mean([len(e) * 3 / 4 / 1024 for e in enc]),
                   "client_png_encode_ms": 1000 * t_enc})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
  p.add_argument("--images", type=int, default=64)
  p.add_argument("--out", default="")
  a = p.parse_args()
  port = _free_port()
  proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(port,), daemon=True)
  proc.start()
  try:
    url = f"http://127.0.0.1:{port}"
    import urllib.request
    for _ in range(200):
      try:
        urllib.request.urlopen(url + "/health", timeout=1).read()
        break
      except OSError:
        time.sleep(0.1)
    rows = measure(url + "/score", a.sizes, a.images)
  finally:
    proc.terminate()
    proc.join(10)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
