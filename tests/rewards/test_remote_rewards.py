"""Reward-server protocol, client and server against local servers with injected faults."""
import asyncio
import json
import math
import time

import numpy as np
import pytest
from aiohttp import web

from local_server import refused_url, serve
from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.rewards import protocol, registry
from unigrpo_jax.rewards.remote import client as remote
from unigrpo_jax.rewards import serve as serve_lib
from unigrpo_jax.rewards.shapeworld import score as sw_score
from unigrpo_jax.data.shapeworld.render import render
from unigrpo_jax import config_defaults
from unigrpo_jax.rewards.remote import http as remote_http

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
PROMPTS = [f"prompt {i}" for i in range(10)]
META = [{"i": i} for i in range(10)]


def truth(images):
  """The fault server's reward: mean pixel / 255, computed from the decoded PNGs."""
  return np.asarray(images, np.float32).mean(axis=(1, 2, 3)) / 255.0


def fault_app(mode: str, state: dict) -> web.Application:
  """A protocol server that misbehaves as ``mode`` says; ``state["calls"]`` counts requests."""
  state.setdefault("calls", 0)

  async def score(request):
    state["calls"] += 1
    obj = json.loads(await request.read())
    images, prompts, metadata, _ = protocol.parse_request(obj)
    state.setdefault("prompts", []).extend(prompts)
    state.setdefault("metadata", []).extend(metadata)
    state["auth"] = request.headers.get("Authorization")
    s = truth(np.stack(images)).tolist()
    if mode == "slow":
      await asyncio.sleep(2.0)
    if mode == "flaky" and state["calls"] <= 2:
      return web.json_response({"error": "overloaded"}, status=503)
    if mode == "always500":
      return web.json_response({"error": "boom"}, status=500)
    if mode == "garbage":
      return web.Response(text="<html>not json", content_type="application/json")
    if mode == "wrong_count":
      s = s[:-1]
    if mode == "nan":
      return web.Response(text=json.dumps({"scores": [math.nan] + s[1:]}),
                          content_type="application/json")
    if mode == "big":
      return web.json_response({"scores": s, "details": {"pad": [0.0] * 100_000}})
    if mode == "redirect":
      raise web.HTTPFound("http://127.0.0.1:9/elsewhere")
    if mode == "bad_request":
      return web.json_response({"error": "no"}, status=400)
    return web.json_response({"scores": s, "details": {"pixel_mean": s}})

  app = web.Application()
  app.router.add_post("/score", score)
  return app


def client(url, **kw):
  t = remote_http.Transport(url=url, name="test", timeout_s=kw.pop("timeout_s", 5.0),
                       retries=kw.pop("retries", 2), backoff_s=0.01,
                       max_response_bytes=kw.pop("max_response_bytes", 1 << 20),
                       token=kw.pop("token", None),
                       total_timeout_s=kw.pop("total_timeout_s", 600.0))
  return remote.ProtocolClient(t, chunk_size=kw.pop("chunk_size", 3),
                               max_in_flight=kw.pop("max_in_flight", 2))


def test_png_roundtrip_and_strict_response_parsing():
  np.testing.assert_array_equal(protocol.decode_png(protocol.encode_png(IMAGES[0])), IMAGES[0])
  scores, details = protocol.parse_response(b'{"scores": [1, 0.5], "details": {"a": [0, 1]}}', 2)
  np.testing.assert_allclose(scores, [1, 0.5])
  np.testing.assert_allclose(details["a"], [0, 1])
  for body, match in [(b'{"scores": [1]}', "1 entries for 2"),
                      (b'{"scores": [1, NaN]}', "non-finite"),
                      (b'{"scores": [1, "x"]}', "not a finite number"),
                      (b'{"scores": [1, true]}', "not a finite number"),
                      (b'[1, 2]', "JSON object"),
                      (b'{"scores": [1, 2], "details": {"a": [1]}}', "details"),
                      (b"\x80\x81", "not JSON")]:
    with pytest.raises(protocol.ProtocolError, match=match):
      protocol.parse_response(body, 2)


def test_chunked_concurrent_scores_in_order_with_token():
  state = {}
  with serve(fault_app("ok", state)) as base:
    out = client(base + "/score", token="s3cret").score(IMAGES, PROMPTS, META)
  np.testing.assert_allclose(out["reward"], truth(IMAGES), atol=1e-6)
  np.testing.assert_allclose(out["pixel_mean"], truth(IMAGES), atol=1e-6)
  assert state["calls"] == 4  # 10 images in chunks of 3
  assert sorted(state["prompts"]) == sorted(PROMPTS) and state["auth"] == "Bearer s3cret"
  assert sorted(m["i"] for m in state["metadata"]) == list(range(10))


def test_500s_that_succeed_on_retry():
  state = {}
  with serve(fault_app("flaky", state)) as base:
    out = client(base + "/score", chunk_size=10).score(IMAGES, PROMPTS, META)
  np.testing.assert_allclose(out["reward"], truth(IMAGES), atol=1e-6)
  assert state["calls"] == 3  # two 503s, then the answer


@pytest.mark.parametrize("mode, kw, match, calls", [
    ("slow", {"timeout_s": 0.3, "retries": 1}, r"gave up after 2 attempts; last error: "
     r"(timeout|TimeoutError|SocketTimeout)", 2),
    ("always500", {"retries": 2}, "gave up after 3 attempts; last error: HTTP 500", 3),
    ("garbage", {}, "not JSON", 1),  # a server bug: not retried
    ("wrong_count", {}, "scores has 9 entries for 10 images", 1),
    ("nan", {}, "non-finite number NaN", 1),
    ("big", {"max_response_bytes": 10_000}, "exceeds max_response_bytes=10000", 1),
    ("redirect", {}, "HTTP 302", 1),  # only configured URLs: redirects are not followed
    ("bad_request", {}, "HTTP 400", 1),
])
def test_faults_give_one_clear_error(mode, kw, match, calls):
  state = {}
  with serve(fault_app(mode, state)) as base:
    url = base + "/score"
    with pytest.raises(remote_http.RemoteRewardError, match=match) as e:
      client(url, chunk_size=10, **kw).score(IMAGES, PROMPTS, META)
  msg = str(e.value)
  assert url in msg and "chunk rows 0..9" in msg and "'prompt 0'" in msg and "7 more" in msg
  assert "\n" not in msg
  assert state["calls"] == calls


def test_total_timeout_bounds_all_attempts_of_a_chunk():
  """A server slower than every attempt: 10 retries allowed, but the 1 s budget stops them."""
  state = {}
  with serve(fault_app("slow", state)) as base:
    t0 = time.monotonic()
    with pytest.raises(remote_http.RemoteRewardError,
                       match=r"gave up after [23] attempts \(total_timeout_s=1 spent\); last "
                       r"error: .*(timeout|TimeoutError|SocketTimeout)"):
      client(base + "/score", chunk_size=10, timeout_s=0.4, retries=10,
             total_timeout_s=1.0).score(IMAGES, PROMPTS, META)
    elapsed = time.monotonic() - t0
  assert elapsed < 1.6, elapsed  # the budget, plus one last short attempt's slack
  assert state["calls"] in (2, 3)


def test_connection_refused_retries_then_names_url():
  url = refused_url()
  t0 = time.time()
  with pytest.raises(remote_http.RemoteRewardError, match=r"gave up after 3 attempts.*"
                     r"ConnectionRefusedError") as e:
    client(url, retries=2).score(IMAGES[:2], PROMPTS[:2], META[:2])
  assert url in str(e.value) and time.time() - t0 < 5


def test_server_serves_registered_reward_like_in_process():
  tasks = sw.sample_tasks(12, seed=3)
  images = np.stack([render(t.spec, seed=i) for i, t in enumerate(tasks)])
  images[::3] = 0  # some wrong images
  specs = [t.spec for t in tasks]
  prompts = [t.prompt for t in tasks]
  expected = sw_score(images, specs)
  with serve(serve_lib.make_app("shapeworld")) as base:
    import urllib.request
    health = json.loads(urllib.request.urlopen(base + "/health", timeout=5).read())
    assert health == {"status": "ok", "reward": "shapeworld"}
    reward = registry.combined_reward({"sw": 1.0}, extra=remote.build_reward_fns(
        {"sw": _entry(base + "/score")}, ["sw"]))
    out = reward(images, specs, None, prompts=prompts, metadata=[""] * 12)
  np.testing.assert_allclose(out["reward"], expected["score"], atol=1e-6)
  np.testing.assert_allclose(out["sw/strict"], expected["strict"], atol=1e-6)


def _entry(url, kind="protocol", **kw):
  e = config_defaults.remote_reward_defaults(kind)
  e.url, e.backoff_s, e.timeout_s, e.chunk_size = url, 0.01, 10.0, 5
  e.update(kw)
  return e


def test_server_rejects_bad_requests_with_reasons():
  import urllib.error
  import urllib.request
  with serve(serve_lib.make_app("shapeworld", max_body_bytes=50_000)) as base:
    def post(body: bytes):
      req = urllib.request.Request(base + "/score", data=body, method="POST",
                                   headers={"Content-Type": "application/json"})
      try:
        urllib.request.urlopen(req, timeout=5)
      except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
      return 200, ""
    code, text = post(b"{nope")
    assert code == 400 and "not JSON" in text
    req = protocol.make_request(IMAGES[:2], PROMPTS[:2], [{}, {}])
    code, text = post(json.dumps(req).encode())  # no metadata.spec: shapeworld cannot score
    assert code == 400 and "metadata[0] has no 'spec'" in text
    req["images"][1] = "AAAA"
    code, text = post(json.dumps(req).encode())
    assert code == 400 and "images[1]" in text
    code, _ = post(b"x" * 60_000)
    assert code == 413  # body over the limit


def test_build_reward_fns_validates_before_any_request(monkeypatch):
  with pytest.raises(ValueError, match=r"config.remote_rewards.x.url: empty"):
    remote.build_reward_fns({"x": _entry("")}, ["x"])
  with pytest.raises(ValueError, match=r"config.remote_rewards.x.url: 'ftp://h/s' is not"):
    remote.build_reward_fns({"x": _entry("ftp://h/s")}, ["x"])
  monkeypatch.delenv("UNIGRPO_TEST_TOKEN", raising=False)
  with pytest.raises(ValueError, match=r"token_env: environment variable 'UNIGRPO_TEST_TOKEN'"):
    remote.build_reward_fns({"x": _entry("http://h/s", token_env="UNIGRPO_TEST_TOKEN")}, ["x"])
  with pytest.raises(ValueError, match=r"config.remote_rewards.j.model: empty"):
    remote.build_reward_fns({"j": _entry("http://h/v1/chat/completions", "vlm_judge")}, ["j"])


def test_serve_command_line(tmp_path):
  import subprocess
  import sys
  import urllib.request
  from local_server import refused_url
  port = int(refused_url().rsplit(":", 1)[1].split("/")[0])
  cmd = [sys.executable, "-m", "unigrpo_jax.rewards.serve", "--reward=shapeworld_strict",
         f"--port={port}"]
  bad = subprocess.run(cmd[:-2] + ["--reward=nope", "--port=1"], capture_output=True, text=True,
                       timeout=60)
  assert bad.returncode == 2 and "--reward: unknown reward 'nope'" in bad.stderr
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    for _ in range(300):
      try:
        health = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/health", timeout=1).read())
        break
      except OSError:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.1)
    assert health == {"status": "ok", "reward": "shapeworld_strict"}
    spec = sw.Spec((sw.Obj("circle", "red"),))
    out = client(f"http://127.0.0.1:{port}/score").score(
        np.stack([render(spec), np.zeros((32, 32, 3), np.uint8)]), ["a red circle"] * 2,
        [{"spec": spec.to_dict()}] * 2)
    np.testing.assert_array_equal(out["reward"], [1.0, 0.0])
  finally:
    proc.terminate()
    proc.wait(10)
