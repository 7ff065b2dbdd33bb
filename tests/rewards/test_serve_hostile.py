"""Hostile clients against the reward server (``rewards.serve``, ``rewards.request_budget``).

Each case gets its 4xx/5xx with a reason naming the limit and the value, and the server stays
up, within memory and scoring correctly. Servers listen on 127.0.0.1 on free ports: the real
command line as a subprocess (its peak resident memory is read from /proc), or an app in a
thread of this process where a test needs a reward that blocks or sleeps.
"""
import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import http.client
import io
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.data.shapeworld.render import render
from unigrpo_jax.rewards import protocol, registry, request_budget
from unigrpo_jax.rewards import serve as serve_lib

TOKEN = "hostile-suite-token"
SERVED = "shapeworld"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PEAK_MEMORY_LIMIT_MB = 1536


# ------------------------------------------------------------------ building hostile bodies
def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, idat: bytes, colour_type: int = 2, bit_depth: int = 8) -> bytes:
  ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
          + _png_chunk(b"IEND", b""))


def claims_png(width: int, height: int) -> str:
  """A PNG whose header claims width x height, with a few bytes of truncated data."""
  return base64.b64encode(png(width, height, zlib.compress(b"\0" * 64)[:20])).decode()


@functools.lru_cache(None)
def bomb_png(side: int = 20000) -> str:
  """A complete, valid PNG of side x side zero pixels (1-bit grey): ~50 kB that decodes to
  side**2 pixels (1.2 GB as uint8 RGB for 20000)."""
  z = zlib.compressobj(9)
  row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
  block = 1000
  idat = b"".join(z.compress(row * block) for _ in range(side // block))
  idat += z.compress(row * (side % block)) + z.flush()
  return base64.b64encode(png(side, side, idat, colour_type=0, bit_depth=1)).decode()


def jpeg_b64() -> str:
  buf = io.BytesIO()
  Image.new("RGB", (8, 8)).save(buf, format="JPEG")
  return base64.b64encode(buf.getvalue()).decode()


SPEC = sw.Spec((sw.Obj("circle", "red"),))


def request_body(images, n_text: int = None, **override) -> bytes:
  """A protocol request around ``images`` (whatever they are), each with a ShapeWorld scene, so
  that nothing but the images stops it."""
  n = len(images) if n_text is None else n_text
  obj = {"protocol": 1, "images": images, "prompts": ["a red circle"] * n,
         "metadata": [{"spec": SPEC.to_dict()}] * n, "reasoning": None}
  obj.update(override)
  return json.dumps(obj).encode()


def good_request() -> tuple[bytes, list]:
  """A ShapeWorld request (a right and a wrong image) and the scores the served reward gives
  them in process."""
  images = np.stack([render(SPEC), np.zeros((32, 32, 3), np.uint8)])
  req = protocol.make_request(images, ["a red circle"] * 2, [{"spec": SPEC.to_dict()}] * 2)
  expected = registry.get(SERVED)(images, [SPEC] * 2)["reward"]
  return json.dumps(req).encode(), np.asarray(expected, np.float64).tolist()


def nested(depth: int) -> list:
  return functools.reduce(lambda inner, _: [inner], range(depth - 1), [])


def small_png(value: int = 7, side: int = 8) -> str:
  return protocol.encode_png(np.full((side, side, 3), value, np.uint8))


# name -> (body maker, status, regex the error must match): what each hostile request gets.
HOSTILE = {
    "garbage": (lambda: b"\x00\xff{nope", 400, r"not JSON"),
    "html": (lambda: b"<html>502 Bad Gateway</html>", 400, r"not JSON \(Expecting value"),
    # json.loads would take UTF-16; the server takes UTF-8 only (its depth scan reads bytes).
    "utf16": (lambda: request_body([small_png()]).decode().encode("utf-16"), 400,
              r"not JSON: the body is not UTF-8"),
    "nan": (lambda: b'{"protocol": 1, "images": [NaN]}', 400, r"non-finite number NaN"),
    "infinity": (lambda: b'{"protocol": -Infinity}', 400, r"non-finite number -Infinity"),
    "wrong_type": (lambda: request_body(5, n_text=1), 400, r"'images' must be a non-empty list"),
    "image_not_string": (lambda: request_body([1]), 400, r"images\[0\] is not a string"),
    "wrong_count": (lambda: request_body([small_png()] * 2, n_text=1), 400,
                    r"'prompts' must be a list of 2 strings"),
    "not_png": (lambda: request_body([jpeg_b64()]), 400, r"images\[0\]: not a PNG"),
    "not_base64": (lambda: request_body(["@@not base64@@"]), 400, r"images\[0\]: not base64"),
    "deep_nesting": (lambda: b"[" * 100_000 + b"]" * 100_000, 400,
                     r"JSON nesting depth reaches 100,000; the limit is 32 \(--max_json_depth\)"),
    # request > metadata > item > 40 lists: 43 levels, in an otherwise valid request.
    "deep_in_metadata": (lambda: request_body([small_png()], metadata=[{"x": nested(40)}]), 400,
                         r"nesting depth reaches 43; the limit is 32"),
    "header_claims_8000px": (lambda: request_body([claims_png(8000, 8000)] * 16), 413,
                             r"images\[0\] is 8000x8000 px .*limit is 4096 px a side"),
    "too_many_pixels": (lambda: request_body([claims_png(4096, 4096)] * 5), 413,
                        r"83,886,080 px in all .*limit is 67,108,864 \(--max_request_pixels\)"),
    "decompression_bomb": (lambda: request_body([bomb_png()]), 413,
                           r"images\[0\] is 20000x20000 px"),
    "too_many_images": (lambda: request_body([small_png(side=1)] * 1025), 413,
                        r"1,025 images in one request; the limit is 1,024 \(--max_images\)"),
    "mixed_shapes": (lambda: request_body([small_png(side=8), small_png(side=16)]), 400,
                     r"share one shape"),
    # Within the budget (4 x 16.8 Mpx = the per-request limit) but cut short: PIL fails on it.
    "truncated_at_the_budget": (lambda: request_body([claims_png(4096, 4096)] * 4), 400,
                                r"images\[0\]: image is not a base64 PNG"),
}


# ------------------------------------------------------------------ talking to a server
def post(port: int, body: bytes, headers: dict = AUTH, path: str = "/score", timeout: float = 30,
         method: str = "POST") -> tuple[int, str, dict]:
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  try:
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
    resp = conn.getresponse()
    return resp.status, resp.read().decode("utf-8", "replace"), dict(resp.headers)
  finally:
    conn.close()


def error_of(text: str) -> str:
  return json.loads(text)["error"]


def start_cli(*flags: str, env: dict = None) -> tuple[subprocess.Popen, int]:
  """The real command line on 127.0.0.1, any free port; returns (process, port)."""
  base_env = {k: v for k, v in os.environ.items() if k != "UNIGRPO_REWARD_TOKEN"}
  proc = subprocess.Popen(
      [sys.executable, "-m", "unigrpo_jax.rewards.serve", f"--reward={SERVED}", "--port=0",
       *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**base_env, **(env or {})})
  watchdog = threading.Timer(60, proc.kill)  # a server that never says it is up
  watchdog.start()
  line = proc.stdout.readline()
  watchdog.cancel()
  match = re.match(r"serving on http://127\.0\.0\.1:(\d+)", line)
  if not match:
    proc.kill()
    raise RuntimeError(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
  return proc, int(match.group(1))


def stop(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    proc.kill()
  proc.wait(10)


def peak_memory_mb(pid: int) -> float:
  with open(f"/proc/{pid}/status") as f:
    kb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
  return kb / 1024


@pytest.fixture(scope="module")
def cli():
  """The command-line server with a token and a 1 s read timeout (for the slow-loris case)."""
  proc, port = start_cli("--read_timeout_s=1", env={"UNIGRPO_REWARD_TOKEN": TOKEN})
  yield proc, port
  stop(proc)


@contextlib.contextmanager
def in_process(app: web.Application):
  """Serves ``app`` on 127.0.0.1 from a thread of this process; yields the port."""
  loop = asyncio.new_event_loop()
  ready, state = threading.Event(), {}

  async def start():
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state["runner"], state["port"] = runner, runner.addresses[0][1]
    ready.set()

  def run():
    loop.run_until_complete(start())
    stopper = loop.call_later(120, loop.stop)  # a hung test cannot leave it running
    loop.run_forever()
    stopper.cancel()
    loop.run_until_complete(state["runner"].cleanup())
    loop.close()

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  assert ready.wait(30), "in-process server did not start"
  try:
    yield state["port"]
  finally:
    with contextlib.suppress(RuntimeError):
      loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def mean_reward(images, specs, reasoning_texts=None):
  del specs, reasoning_texts
  return {"reward": np.asarray(images, np.float32).mean(axis=(1, 2, 3))}


# ------------------------------------------------------------------ the request budget
def _depth(obj) -> int:
  if isinstance(obj, (list, dict)):
    return 1 + max(map(_depth, obj.values() if isinstance(obj, dict) else obj), default=0)
  return 0


def _random_json(rng: random.Random, level: int = 0):
  tricky = ["a [red] circle", '\\"[', "\\\\", '"]}{', "é{[", '\\\\\\"[', "", 1.5, None]
  r = rng.random()
  if level > 6 or r < 0.3:
    return rng.choice(tricky)
  if r < 0.65:
    return [_random_json(rng, level + 1) for _ in range(rng.randint(0, 3))]
  return {rng.choice(tricky[:6]): _random_json(rng, level + 1) for _ in range(rng.randint(0, 3))}


@pytest.mark.parametrize("chunk", [1 << 18, 7, 2, 1])
def test_json_depth_scan_matches_the_parse_tree(monkeypatch, chunk):
  """Brackets inside strings, escaped quotes and backslash runs across chunk edges."""
  monkeypatch.setattr(request_budget, "_CHUNK", chunk)
  rng = random.Random(chunk)
  for _ in range(150):
    obj = _random_json(rng)
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode()
    assert request_budget.json_depth(text) == _depth(obj), text


def test_json_depth_stops_early_and_loads_strict_never_recurses_out():
  assert request_budget.json_depth(b"[" * 10_000_000, stop_above=32) <= 1 << 18
  with pytest.raises(protocol.ProtocolError, match="nested too deeply"):
    protocol.loads_strict(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize("raw, match", [
    (b"GIF89a" + b"\0" * 40, "not a PNG"),
    (base64.b64decode(claims_png(5, 5))[:20], "cut short"),
    (png(5, 5, b"")[:29] + b"\0\0\0\0", "CRC"),
    (png(0, 5, b""), "invalid size 0x5"),
    (png(5, 5, b"", colour_type=2, bit_depth=4), "colour type 2 / bit depth 4"),
    (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"tEXt", b"x" * 13), "not a 13-byte IHDR"),
])
def test_png_header_parser_rejects_malformed_headers(raw, match):
  with pytest.raises(request_budget.BudgetError, match=match) as e:
    request_budget.png_size(raw)
  assert e.value.status == 400


def test_pil_guards_catch_a_bomb_the_header_check_let_through():
  """The second guards: decode_png's max_pixels, and PIL's own MAX_IMAGE_PIXELS."""
  assert request_budget.png_size(base64.b64decode(bomb_png())) == (20000, 20000)
  with pytest.raises(protocol.ProtocolError, match=r"5000x5000 px, over the 16,777,216 px"):
    protocol.decode_png(bomb_png(5000), max_pixels=4096 ** 2)  # under PIL's default guard
  with pytest.raises(protocol.ProtocolError, match="DecompressionBomb"):
    protocol.decode_png(bomb_png())  # 4e8 px: over twice PIL's default 8.9e7


# ------------------------------------------------------------------ the real server
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_request_gets_a_clear_refusal(cli, case):
  make, status, match = HOSTILE[case]
  got, text, _ = post(cli[1], make())
  assert got == status, text
  assert re.search(match, error_of(text)), text


def test_oversized_body_is_refused_before_it_is_read(cli):
  conn = http.client.HTTPConnection("127.0.0.1", cli[1], timeout=10)
  conn.putrequest("POST", "/score")
  for k, v in {**AUTH, "Content-Length": str(300 << 20)}.items():
    conn.putheader(k, v)
  conn.endheaders()  # 300 MiB announced, none sent
  resp = conn.getresponse()
  assert resp.status == 413
  assert "314,572,800 bytes; the limit is 268,435,456 (--max_body_mb=256)" in resp.read().decode()
  conn.close()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": f"Bearer {TOKEN}x"},
                                     {"Authorization": "Bearer \xff\xfe"}])  # not UTF-8
def test_score_needs_the_token_and_health_does_not(cli, headers):
  body, _ = good_request()
  status, text, got_headers = post(cli[1], body, headers=headers)
  assert status == 401 and "Authorization: Bearer" in error_of(text)
  assert got_headers.get("WWW-Authenticate") == "Bearer"
  assert post(cli[1], b"", headers={}, path="/health", method="GET")[0] == 200


def test_slow_loris_upload_times_out_while_others_are_served(cli):
  body, expected = good_request()
  with socket.create_connection(("127.0.0.1", cli[1]), timeout=10) as loris:
    loris.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode())
    t0, done = time.monotonic(), threading.Event()

    def trickle():  # a byte every 0.05 s: never all there within the 1 s read timeout
      for i in range(100):
        if done.wait(0.05):
          return
        try:
          loris.sendall(body[i:i + 1])
        except OSError:  # the server closed the connection
          return

    threading.Thread(target=trickle, daemon=True).start()
    status, text, _ = post(cli[1], body)  # someone else, meanwhile
    assert status == 200 and json.loads(text)["scores"] == expected
    reply = b""
    while b"}" not in reply and (chunk := loris.recv(4096)):
      reply += chunk
    done.set()
  assert reply.startswith(b"HTTP/1.1 408"), reply
  assert b"within 1 s (--read_timeout_s)" in reply
  assert time.monotonic() - t0 < 5


def test_slow_request_head_gets_the_connection_closed(cli):
  with socket.create_connection(("127.0.0.1", cli[1]), timeout=10) as s:
    t0, closed = time.monotonic(), False
    for i in range(60):  # a header byte every 0.05 s: the head never completes
      try:
        s.sendall(b"X" if i else b"POST /score HTTP/1.1\r\nX-Slow: ")
        s.setblocking(False)
        closed = s.recv(1) == b""
      except BlockingIOError:
        pass
      except OSError:  # reset
        closed = True
      s.setblocking(True)
      if closed:
        break
      time.sleep(0.05)
  assert closed and time.monotonic() - t0 < 2.5  # 1 s read timeout, aiohttp rounds up to 1 s


def test_server_survives_every_hostile_case_within_memory(cli):
  """All the cases above on one server: its peak resident memory stays under 1.5 GB, /health
  answers and a good request is still scored right."""
  proc, port = cli
  for name, (make, status, _) in HOSTILE.items():
    assert post(port, make())[0] == status, name
  peak = peak_memory_mb(proc.pid)
  assert peak < PEAK_MEMORY_LIMIT_MB, f"server peak memory {peak:.0f} MB"
  assert json.loads(post(port, b"", headers={}, path="/health", method="GET")[1]) == {
      "status": "ok", "reward": SERVED}
  body, expected = good_request()
  status, text, _ = post(port, body)
  assert status == 200 and json.loads(text)["scores"] == expected
  assert proc.poll() is None


# ------------------------------------------------------------------ load
def test_requests_over_the_in_flight_cap_get_503_with_retry_after():
  entered, release = threading.Semaphore(0), threading.Event()

  def blocking(images, specs, reasoning_texts=None):
    entered.release()
    release.wait(30)
    return mean_reward(images, specs)

  app = serve_lib.make_app(blocking, limits=serve_lib.Limits(max_in_flight=2, workers=2))
  body = request_body([small_png(7)])
  with in_process(app) as port:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      first = [pool.submit(post, port, body, {}) for _ in range(2)]
      assert entered.acquire(timeout=10) and entered.acquire(timeout=10)  # both in the reward
      over = [f.result() for f in [pool.submit(post, port, body, {}) for _ in range(6)]]
      release.set()
      done = [f.result() for f in first]
    for status, text, headers in over:
      assert status == 503 and headers.get("Retry-After") == "1"
      assert "2 requests in flight, the limit is 2 (--max_in_flight)" in error_of(text)
    assert [(s, json.loads(t)["scores"]) for s, t, _ in done] == [(200, [7.0])] * 2
    assert post(port, body, {})[0] == 200  # the slots are free again


def test_deadline_gives_504_and_the_slot_is_held_until_the_work_ends():
  calls = []

  def slow_once(images, specs, reasoning_texts=None):
    calls.append(time.monotonic())
    if len(calls) == 1:
      time.sleep(1.0)
    return mean_reward(images, specs)

  app = serve_lib.make_app(slow_once, limits=serve_lib.Limits(max_in_flight=1, deadline_s=0.3))
  body = request_body([small_png(3)])
  with in_process(app) as port:
    status, text, _ = post(port, body, {})
    assert status == 504 and "deadline of 0.3 s (--deadline_s)" in error_of(text)
    assert post(port, body, {})[0] == 503  # its worker still runs: the cap still counts it
    time.sleep(1.0)
    status, text, _ = post(port, body, {})
    assert status == 200 and json.loads(text)["scores"] == [3.0]


def test_chunked_body_over_the_limit_is_413():
  app = serve_lib.make_app(mean_reward, max_body_bytes=10_000)
  with in_process(app) as port:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/score", body=iter([b"[" + b" " * 1000] * 30), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and "exceeds 10,000 bytes" in resp.read().decode()
    conn.close()


def test_sigterm_finishes_the_request_in_flight_then_exits_0():
  proc, port = start_cli()
  try:
    body, expected = good_request()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
      s.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
                .encode() + body[:100])
      time.sleep(0.5)  # admitted: it is reading the body
      proc.send_signal(signal.SIGTERM)
      time.sleep(0.5)
      with pytest.raises(OSError):  # no longer listening
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
      s.sendall(body[100:])
      reply = b""
      while b"}}" not in reply and (chunk := s.recv(65536)):
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["scores"] == expected
    assert proc.wait(10) == 0
  finally:
    stop(proc)


# ------------------------------------------------------------------ the command line
@pytest.mark.parametrize("flags, match", [
    (["--host=0.0.0.0"], r"--host=0.0.0.0 would expose /score to the network without a token: "
     r"set \$UNIGRPO_REWARD_TOKEN .* or pass --insecure"),
    (["--token_env=UNIGRPO_TEST_NO_SUCH_VAR"], r"--token_env: environment variable "
     r"'UNIGRPO_TEST_NO_SUCH_VAR' is not set"),
])
def test_refuses_to_start_insecurely(flags, match):
  env = {k: v for k, v in os.environ.items() if k != "UNIGRPO_REWARD_TOKEN"}
  out = subprocess.run([sys.executable, "-m", "unigrpo_jax.rewards.serve", "--reward=shapeworld",
                        "--port=0", *flags], capture_output=True, text=True, timeout=60, env=env)
  assert out.returncode == 2 and re.search(match, out.stderr), out.stderr
  assert "serving on" not in out.stdout  # it never bound


def test_main_wires_flags_token_and_pil_guard(monkeypatch):
  seen = {}
  monkeypatch.setattr(serve_lib, "serve_forever", lambda app, host, port, grace, **kw: seen.update(
      app=app, host=host, port=port, grace=grace, **kw))
  monkeypatch.setattr(serve_lib, "make_app", lambda reward, **kw: kw)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
  monkeypatch.setattr(serve_lib.logging, "basicConfig", lambda **kw: None)
  monkeypatch.setenv("MY_REWARD_TOKEN", "t0k")
  serve_lib.main(["--reward=shapeworld", "--port=0", "--host=0.0.0.0", "--token_env",
                  "MY_REWARD_TOKEN", "--max_image_side=2048", "--max_in_flight=3"])
  kw = seen["app"]
  assert kw["token"] == "t0k" and kw["budget"].max_image_side == 2048
  assert kw["limits"].max_in_flight == 3 and seen["host"] == "0.0.0.0"
  assert seen["idle_timeout_s"] == kw["limits"].read_timeout_s == 30
  assert Image.MAX_IMAGE_PIXELS == 2048 ** 2
