"""Reward-server benchmarks: throughput, hostile requests, and load at the in-flight cap.

  python -m benchmarks.reward_server [--sizes 256 1024] [--images 64] [--out FILE.json]
  python -m benchmarks.reward_server --hostile [--out FILE.md]   # + FILE.json beside it
  python -m benchmarks.reward_server --load [--cap 8] [--requests 1000] [--out FILE.md]

Every server runs in its own process on 127.0.0.1, as a real deployment would.

Throughput: ``rewards.serve.make_app`` with a trivial reward (mean pixel) and the client of
``rewards.remote`` with its defaults (16 images a request, 4 in flight). Images are random noise
(PNG's worst case) and a smooth gradient (closer to real images). The time covers PNG encoding,
JSON, HTTP, decoding on the server, the reward and the checked response.

Hostile: the real command line (``--reward=shapeworld``, default limits, a token, 2 s read
timeout, 4 in flight) gets each hostile request of ``HOSTILE``; the table records the status,
the error message and the server's peak resident memory (VmHWM) after each.

Load: ``max_in_flight=cap`` and a reward that counts each request id it scores; clients keep
exactly ``cap`` requests in flight, then ``2 * cap`` (a 503 is retried after 50 ms, not the 1 s of
Retry-After, so that the server stays at its cap); every id must be scored exactly once.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import functools
import io
import json
import multiprocessing
import os
import platform
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _trivial(images, specs, reasoning_texts=None):
  del specs, reasoning_texts
  return {"reward": np.asarray(images, np.float32).mean(axis=(1, 2, 3)) / 255.0}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_healthy(url: str) -> None:
  for _ in range(300):
    try:
      urllib.request.urlopen(url + "/health", timeout=1).read()
      return
    except OSError:
      time.sleep(0.1)
  raise RuntimeError(f"{url} did not come up")


def _peak_memory_mb(pid: int) -> float:
  with open(f"/proc/{pid}/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024


def _machine() -> str:
  load = os.getloadavg()[0]
  return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, load average {load:.1f} at start")


# ------------------------------------------------------------------ throughput
def _serve(port: int) -> None:
  from aiohttp import web
  from unigrpo_jax.rewards import serve
  web.run_app(serve.make_app(_trivial), host="127.0.0.1", port=port, print=None)


def _images(kind: str, n: int, size: int) -> np.ndarray:
  if kind == "noise":
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  y, x = np.mgrid[0:size, 0:size] / size
  base = np.stack([x, y, (x + y) / 2], -1)
  return np.stack([(255 * ((base + i / n) % 1.0)).astype(np.uint8) for i in range(n)])


def measure(url: str, sizes, n: int, repeats: int = 2) -> list[dict]:
  from unigrpo_jax.rewards import protocol
  from unigrpo_jax.rewards.remote.client import ProtocolClient
  from unigrpo_jax.rewards.remote.http import Transport
  client = ProtocolClient(Transport(url=url, name="bench", max_response_bytes=1 << 20), 16, 4)
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


def run_throughput(a) -> None:
  port = _free_port()
  proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(port,), daemon=True)
  proc.start()
  try:
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url)
    rows = measure(url + "/score", a.sizes, a.images)
  finally:
    proc.terminate()
    proc.join(10)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(rows, f, indent=1)


# ------------------------------------------------------------------ hostile requests
TOKEN = "benchmark-token"


def _png(width: int, height: int, idat: bytes, colour_type: int = 2, depth: int = 8) -> str:
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
  raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
         + chunk(b"IEND", b""))
  return base64.b64encode(raw).decode()


def _claims(side: int) -> str:
  """Header says side x side; the data is 20 truncated bytes."""
  return _png(side, side, zlib.compress(b"\0" * 64)[:20])


@functools.lru_cache(None)
def _bomb(side: int = 20000) -> str:
  """A complete PNG of side x side zeros, 1-bit grey: ~50 kB, 1.2 GB as uint8 RGB."""
  z, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)
  idat = b"".join(z.compress(row * 1000) for _ in range(side // 1000)) + z.flush()
  return _png(side, side, idat, colour_type=0, depth=1)


def _jpeg() -> str:
  from PIL import Image
  buf = io.BytesIO()
  Image.new("RGB", (8, 8)).save(buf, format="JPEG")
  return base64.b64encode(buf.getvalue()).decode()


def _good(n: int = 2, size: int = 32):
  """A ShapeWorld request of n images (right ones) and its body."""
  from unigrpo_jax.data.shapeworld import world as sw
  from unigrpo_jax.data.shapeworld.render import render
  from unigrpo_jax.rewards import protocol
  spec = sw.Spec((sw.Obj("circle", "red"),))
  image = render(spec)
  if size != image.shape[0]:
    image = np.kron(image, np.ones((size // image.shape[0], size // image.shape[1], 1), np.uint8))
  req = protocol.make_request(np.stack([image] * n), ["a red circle"] * n,
                              [{"spec": spec.to_dict()}] * n)
  return json.dumps(req).encode()


def _body(images, **override) -> bytes:
  spec = {"objects": [{"shape": "circle", "color": "red", "count": 1}], "relation": None}
  n = len(images) if isinstance(images, list) else 1
  obj = {"protocol": 1, "images": images, "prompts": ["p"] * n,
         "metadata": [{"spec": spec}] * n, "reasoning": None}
  obj.update(override)
  return json.dumps(obj).encode()


def _post(port: int, body: bytes, headers=None, timeout: float = 60) -> tuple[int, str, dict]:
  import http.client
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  try:
    conn.request("POST", "/score", body=body, headers=headers if headers is not None else
                 {"Authorization": f"Bearer {TOKEN}"})
    resp = conn.getresponse()
    text = resp.read().decode("utf-8", "replace")
    return resp.status, text, dict(resp.headers)
  finally:
    conn.close()


def _error(text: str) -> str:
  """The error message of a refusal, or the scores of an answer."""
  try:
    obj = json.loads(text)
  except ValueError:
    return text[:100]
  if "error" in obj:
    return obj["error"]
  scores = obj.get("scores") or []
  return f"scores {scores}" if len(scores) <= 4 else (
      f"{len(scores)} scores, mean {np.mean(scores):.3g}")


def _oversized(port: int):
  import http.client
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
  conn.putrequest("POST", "/score")
  conn.putheader("Authorization", f"Bearer {TOKEN}")
  conn.putheader("Content-Length", str(300 << 20))
  conn.endheaders()
  resp = conn.getresponse()
  out = resp.status, resp.read().decode(), {}
  conn.close()
  return out


def _slow_loris(port: int):
  """Headers, then a byte every 0.1 s; meanwhile another client's request must be scored."""
  body = _good()
  with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
    s.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode())
    stop = threading.Event()

    def trickle():
      for i in range(100):
        if stop.wait(0.1):
          return
        try:
          s.sendall(body[i:i + 1])
        except OSError:
          return
    threading.Thread(target=trickle, daemon=True).start()
    other = _post(port, body)[0]
    reply = b""
    while b"}" not in reply and (chunk := s.recv(4096)):
      reply += chunk
    stop.set()
  head, _, text = reply.partition(b"\r\n\r\n")
  return int(head.split()[1]), text.decode(), {"meanwhile": f"another client got {other}"}


def _over_cap(port: int, n: int = 24):
  """n concurrent requests of 16 images of 256 px against --max_in_flight=4."""
  import concurrent.futures
  body = _good(16, 256)
  with concurrent.futures.ThreadPoolExecutor(n) as pool:
    results = list(pool.map(lambda _: _post(port, body), range(n)))
  counts = collections.Counter(s for s, _, _ in results)
  busy = next((r for r in results if r[0] == 503), results[0])
  summary = ", ".join(f"{c} x {s}" for s, c in sorted(counts.items()))
  return busy[0], busy[1], {"all": summary, "Retry-After": busy[2].get("Retry-After")}


# name -> (what is sent, how): the hostile cases of the table, in order.
HOSTILE = {
    "garbage body": ("`<html>502 Bad Gateway</html>`",
                     lambda p: _post(p, b"<html>502 Bad Gateway</html>")),
    "binary body": ("bytes `00 ff 7b`", lambda p: _post(p, b"\x00\xff{")),
    "UTF-16 body": ("a valid request in UTF-16",
                    lambda p: _post(p, _good().decode().encode("utf-16"))),
    "NaN": ("`{\"protocol\": 1, \"images\": [NaN]}`",
            lambda p: _post(p, b'{"protocol": 1, "images": [NaN]}')),
    "Infinity": ("`{\"protocol\": -Infinity}`", lambda p: _post(p, b'{"protocol": -Infinity}')),
    "wrong type": ("`\"images\": 5`", lambda p: _post(p, _body(5))),
    "wrong count": ("2 images, 1 prompt",
                    lambda p: _post(p, _body([_claims(8)] * 2, prompts=["p"]))),
    "not PNG": ("a JPEG", lambda p: _post(p, _body([_jpeg()]))),
    "not base64": ("`@@@@`", lambda p: _post(p, _body(["@@@@"]))),
    "deep nesting": ("100,000 `[` then `]`",
                     lambda p: _post(p, b"[" * 100_000 + b"]" * 100_000)),
    "header-claimed huge": ("16 PNGs claiming 8000x8000, truncated (~100 B each)",
                            lambda p: _post(p, _body([_claims(8000)] * 16))),
    "too many pixels": ("5 PNGs claiming 4096x4096",
                        lambda p: _post(p, _body([_claims(4096)] * 5))),
    "decompression bomb": ("a complete 20000x20000 PNG of zeros (~50 kB)",
                           lambda p: _post(p, _body([_bomb()]))),
    "truncated, within budget": ("4 PNGs claiming 4096x4096 (= the pixel budget), truncated",
                                 lambda p: _post(p, _body([_claims(4096)] * 4))),
    "too many images": ("1,025 PNGs of 1x1",
                        lambda p: _post(p, _body([_png(1, 1, zlib.compress(b"\0" * 4))] * 1025))),
    "oversized body": ("Content-Length: 300 MiB, nothing sent", _oversized),
    "slow-loris upload": ("headers, then 1 byte / 0.1 s", _slow_loris),
    "over the in-flight cap": ("24 concurrent requests of 16 x 256 px", _over_cap),
    "no token": ("no Authorization header", lambda p: _post(p, _good(), headers={})),
    "wrong token": ("`Bearer wrong`",
                    lambda p: _post(p, _good(), headers={"Authorization": "Bearer wrong"})),
    "good request, after all the above": ("2 ShapeWorld images", lambda p: _post(p, _good())),
    "largest request the budget admits": ("64 ShapeWorld images of 1024 px (the 64 Mpx budget)",
                                          lambda p: _post(p, _good(64, 1024))),
}


def run_hostile(out_md: str) -> list[dict]:
  cmd = [sys.executable, "-m", "unigrpo_jax.rewards.serve", "--reward=shapeworld", "--port=0",
         "--read_timeout_s=2", "--max_in_flight=4"]
  env = {**os.environ, "UNIGRPO_REWARD_TOKEN": TOKEN}
  machine = _machine()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=env)
  try:
    port = int(re.search(r":(\d+)$", proc.stdout.readline().strip()).group(1))
    _wait_healthy(f"http://127.0.0.1:{port}")
    rows = [{"case": "(started, idle)", "sent": "", "status": "", "message": "",
             "peak_mb": _peak_memory_mb(proc.pid), "seconds": 0.0}]
    for name, (sent, fn) in HOSTILE.items():
      t0 = time.perf_counter()
      status, text, headers = fn(port)
      message = _error(text)
      extra = {k: v for k, v in headers.items()
               if k in ("WWW-Authenticate", "Retry-After", "meanwhile", "all")}
      if extra:
        message += " (" + "; ".join(f"{k}: {v}" for k, v in extra.items()) + ")"
      rows.append({"case": name, "sent": sent, "status": status, "message": message,
                   "peak_mb": _peak_memory_mb(proc.pid), "seconds": time.perf_counter() - t0})
      print(json.dumps(rows[-1])[:300], flush=True)
    health = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
    assert proc.poll() is None and json.loads(health)["status"] == "ok"
  finally:
    proc.terminate()
    rc = proc.wait(30)
  _write_hostile(out_md, rows, " ".join(cmd[1:]), machine, rc)
  return rows


def _write_hostile(out_md: str, rows: list[dict], cmd: str, machine: str, rc: int) -> None:
  with open(os.path.splitext(out_md)[0] + ".json", "w") as f:
    json.dump({"command": cmd, "machine": machine, "exit_code_after_sigterm": rc, "rows": rows},
              f, indent=1)
  lines = [f"`{cmd}` (token set), {time.strftime('%Y-%m-%d')}, {machine}. Peak memory: the "
           "server's VmHWM after the case. Written by `python -m benchmarks.reward_server "
           f"--hostile`. Exit code after SIGTERM: {rc}.", "",
           "| case | sent | status | message | server peak memory |", "|---|---|---|---|---|"]
  for r in rows:
    message = r["message"].replace("|", "\\|")
    lines.append(f"| {r['case']} | {r['sent']} | {r['status']} | {message} | "
                 f"{r['peak_mb']:.0f} MB |")
  with open(out_md, "w") as f:
    f.write("\n".join(lines) + "\n")


# ------------------------------------------------------------------ load at the cap
def _serve_counting(port: int, cap: int, workers: int) -> None:
  """make_app around a reward that counts the request ids it scores, plus GET /ids."""
  from aiohttp import web
  from unigrpo_jax.rewards import serve
  scored = collections.Counter()
  lock = threading.Lock()

  def counting(images, specs, reasoning_texts=None, metadata=None):
    with lock:
      scored[metadata[0]["id"]] += 1
    return _trivial(images, specs)

  async def ids(request):
    del request
    return web.json_response(dict(scored))

  app = serve.make_app(counting, limits=serve.Limits(max_in_flight=cap, workers=workers))
  app.router.add_get("/ids", ids)
  serve.serve_forever(app, "127.0.0.1", port, grace_s=10)


async def _drive(url: str, bodies: list[tuple[int, bytes]], concurrency: int) -> dict:
  import aiohttp
  queue = collections.deque(bodies)
  latencies, rejected, failed = [], 0, []

  async def worker(session):
    nonlocal rejected
    while queue:
      rid, body = queue.popleft()
      while True:
        t0 = time.perf_counter()
        async with session.post(url, data=body,
                                headers={"Content-Type": "application/json"}) as resp:
          text = await resp.read()
          if resp.status == 503:
            rejected += 1
            await asyncio.sleep(0.05)
            continue
          if resp.status != 200:
            failed.append((rid, resp.status, text[:200]))
          latencies.append(time.perf_counter() - t0)
          break

  t0 = time.perf_counter()
  async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
    await asyncio.wait_for(asyncio.gather(*[worker(session) for _ in range(concurrency)]), 300)
  wall = time.perf_counter() - t0
  lat = np.asarray(latencies) * 1000
  return {"concurrency": concurrency, "requests": len(bodies), "seconds": wall,
          "requests_per_s": len(bodies) / wall, "p50_ms": float(np.percentile(lat, 50)),
          "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
          "503s_retried": rejected, "failed": failed}


def run_load(a) -> dict:
  from unigrpo_jax.rewards import protocol
  machine = _machine()
  port = _free_port()
  proc = multiprocessing.get_context("spawn").Process(
      target=_serve_counting, args=(port, a.cap, a.workers), daemon=True)
  proc.start()
  url = f"http://127.0.0.1:{port}"
  try:
    _wait_healthy(url)
    images = _images("smooth", a.images_per_request, a.size)
    template = protocol.make_request(images, ["p"] * len(images), [{}] * len(images))

    def bodies(first: int) -> list[tuple[int, bytes]]:
      out = []
      for rid in range(first, first + a.requests):
        template["metadata"] = [{"id": rid}] * len(images)
        out.append((rid, json.dumps(template).encode()))
      return out

    phases = [asyncio.run(_drive(url + "/score", bodies(0), a.cap)),
              asyncio.run(_drive(url + "/score", bodies(a.requests), 2 * a.cap))]
    scored = {int(k): v for k, v in json.loads(urllib.request.urlopen(url + "/ids").read()).items()}
    peak = _peak_memory_mb(proc.pid)
  finally:
    proc.terminate()
    proc.join(30)
  sent = set(range(2 * a.requests))
  result = {"machine": machine, "cap": a.cap, "workers": a.workers,
            "request": f"{a.images_per_request} PNGs of {a.size} px", "phases": phases,
            "ids_sent": len(sent), "ids_lost": sorted(sent - set(scored))[:20],
            "ids_scored_twice": sorted(k for k, v in scored.items() if v > 1)[:20],
            "server_peak_mb": peak, "server_exit_code": proc.exitcode}
  _write_load(a.out, result)
  return result


def _write_load(out_md: str, r: dict) -> None:
  with open(os.path.splitext(out_md)[0] + ".json", "w") as f:
    json.dump(r, f, indent=1)
  lines = [f"`python -m benchmarks.reward_server --load`, {time.strftime('%Y-%m-%d')}, "
           f"{r['machine']}. Server: `--max_in_flight={r['cap']} --workers={r['workers']}`, "
           f"a trivial reward that counts the ids it scores; each request {r['request']}.", "",
           "| clients in flight | requests | requests/s | p50 | p99 | max | 503s (retried) |"
           " failed |", "|---|---|---|---|---|---|---|---|"]
  for p in r["phases"]:
    lines.append(f"| {p['concurrency']} | {p['requests']} | {p['requests_per_s']:.0f} | "
                 f"{p['p50_ms']:.0f} ms | {p['p99_ms']:.0f} ms | {p['max_ms']:.0f} ms | "
                 f"{p['503s_retried']} | {len(p['failed'])} |")
  lines += ["", f"{r['ids_sent']} request ids sent; lost: {len(r['ids_lost'])}; scored twice: "
            f"{len(r['ids_scored_twice'])}; server peak memory {r['server_peak_mb']:.0f} MB; "
            f"server exit code after SIGTERM: {r['server_exit_code']}."]
  with open(out_md, "w") as f:
    f.write("\n".join(lines) + "\n")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--hostile", action="store_true", help="the hostile-request table")
  p.add_argument("--load", action="store_true", help="load at the in-flight cap")
  p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
  p.add_argument("--images", type=int, default=64)
  p.add_argument("--cap", type=int, default=8, help="--load: the server's max_in_flight")
  p.add_argument("--workers", type=int, default=2, help="--load: the server's workers")
  p.add_argument("--requests", type=int, default=1000, help="--load: requests per phase")
  p.add_argument("--images_per_request", type=int, default=16)
  p.add_argument("--size", type=int, default=128, help="--load: image side")
  p.add_argument("--out", default="")
  a = p.parse_args()
  if a.hostile:
    run_hostile(a.out or os.path.join(RESULTS, "reward_server_hostile.md"))
  elif a.load:
    a.out = a.out or os.path.join(RESULTS, "reward_server_load.md")
    print(json.dumps(run_load(a), indent=1))
  else:
    run_throughput(a)


if __name__ == "__main__":
  main()
