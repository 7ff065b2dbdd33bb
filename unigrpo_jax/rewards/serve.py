"""Serves any registered reward over ``rewards.protocol`` (aiohttp), bounded against hostile,
broken or too many clients: a trainer hours into a pod run depends on it staying up.

  [UNIGRPO_REWARD_TOKEN=...] python -m unigrpo_jax.rewards.serve --reward=shapeworld --port=8000

Endpoints: ``GET /health`` (``{"status": "ok", "reward": NAME}``, open to all) and
``POST /score`` (the protocol). A ``/score`` request passes these steps, cheapest first; a
refusal is ``{"error": reason}`` naming the limit, its flag and the value seen:

1. 401 without ``Authorization: Bearer <token>`` when the server has a token (read from the
   environment variable ``--token_env`` names, never from a flag value, which ``ps`` shows).
2. 503 with ``Retry-After`` when ``--max_in_flight`` requests are in flight or the server is
   shutting down (the client retries 5xx).
3. 413 for a body over ``--max_body_mb`` (from Content-Length, before reading it); 408 when the
   body has not arrived within ``--read_timeout_s`` (a slow-loris upload). A connection that
   has not sent a whole request head within that time (or sits idle that long) is closed.
4. In one of ``--workers`` threads, within ``--deadline_s`` (504 past it): the JSON depth
   (before parsing), UTF-8 JSON without NaN, the protocol's fields, the image count, each
   image's size from its PNG header, the total pixels (``rewards.request_budget``; 400/413),
   and only then decoding and the reward (500 with the reason if it raises). A ShapeWorld
   reward reads each item's scene from ``metadata.spec``.

A request holds its in-flight slot until its worker thread is done, even after its 504: a
thread cannot be interrupted, so counting it keeps the work in progress within the cap.

SIGTERM or SIGINT: stop listening, answer 503 on connections still open, let requests in
flight finish (up to ``--shutdown_grace_s``), exit 0. The server refuses to bind beyond
localhost without a token unless ``--insecure``.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from typing import Callable, Optional

import numpy as np
from aiohttp import web
from PIL import Image

from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.rewards import protocol, registry
from unigrpo_jax.rewards import request_budget
from unigrpo_jax.rewards.request_budget import Budget, BudgetError

log = logging.getLogger(__name__)
TOKEN_ENV = "UNIGRPO_REWARD_TOKEN"


@dataclasses.dataclass(frozen=True)
class Limits:
  """Load limits of one server process (the per-request ones are ``request_budget.Budget``)."""
  max_in_flight: int = 16  # >= the clients' max_in_flight summed (4 per trainer by default)
  workers: int = min(4, os.cpu_count() or 1)  # threads decoding and scoring at once
  read_timeout_s: float = 30.0  # to receive a body: 256 MiB at ~70 Mbit/s
  deadline_s: float = 100.0  # under the client's timeout_s (120 s): it sees the 504's reason
  retry_after_s: int = 1


class DeadlineExceeded(RuntimeError):
  """The worker found the request past its deadline before starting an expensive stage."""


# ------------------------------------------------------------------ scoring (worker threads)
def _specs(metadata: list[dict]) -> list:
  out = []
  for i, m in enumerate(metadata):
    try:
      out.append(sw.Spec.from_dict(m["spec"]) if "spec" in m else None)
    except (KeyError, TypeError, ValueError) as e:
      raise protocol.ProtocolError(f"metadata[{i}].spec: {e}") from None
  return out


def _check_deadline(deadline: Optional[float], stage: str) -> None:
  if deadline is not None and time.monotonic() > deadline:
    raise DeadlineExceeded(f"past the deadline before {stage}")


def _decode_batch(images: list[str], size: tuple[int, int], max_pixels: int) -> np.ndarray:
  """Decodes into one preallocated uint8 [N, H, W, 3] (no second copy from np.stack)."""
  width, height = size
  batch = np.empty((len(images), height, width, 3), np.uint8)
  for i, data in enumerate(images):
    try:
      image = protocol.decode_png(data, max_pixels)
    except protocol.ProtocolError as e:
      raise protocol.ProtocolError(f"images[{i}]: {e}") from None
    if image.shape != batch.shape[1:]:  # PIL read another size than the header said
      raise protocol.ProtocolError(f"images[{i}] decodes to {image.shape}, its header says "
                                   f"{batch.shape[1:]}")
    batch[i] = image
  return batch


def score_request(reward_fn: Callable, obj, budget: Optional[Budget] = None,
                  deadline: Optional[float] = None) -> dict:
  """Protocol request dict -> response dict. BudgetError / ProtocolError for bad requests (the
  budget is checked before any image is decoded); ``deadline`` (time.monotonic()) is checked
  before decoding and before the reward. The reward's own exceptions propagate."""
  budget = budget or Budget()
  images, prompts, metadata, reasoning = protocol.parse_fields(obj)
  sizes = request_budget.check_images(images, budget)
  if len(set(sizes)) != 1:
    shapes = sorted({(h, w, 3) for w, h in sizes})
    raise protocol.ProtocolError(f"images must share one shape, got {shapes}")
  specs = _specs(metadata)
  if "spec" in getattr(reward_fn, "requires", ()) and None in specs:
    raise protocol.ProtocolError(f"metadata[{specs.index(None)}] has no 'spec' (a ShapeWorld "
                                 "scene), which this reward needs")
  _check_deadline(deadline, "decoding")
  batch = _decode_batch(images, sizes[0], budget.max_image_pixels)
  _check_deadline(deadline, "the reward")
  kwargs = {k: v for k, v in (("prompts", prompts), ("metadata", metadata))
            if k in registry.accepted_kwargs(reward_fn)}
  out = reward_fn(batch, specs, reasoning_texts=reasoning, **kwargs)
  n = len(images)
  details = {}
  for k, v in out.items():
    v = np.asarray(v, np.float64)
    if k != "reward" and v.shape == (n,) and np.all(np.isfinite(v)):
      details[k] = v.tolist()
  scores = np.asarray(out["reward"], np.float64)
  if scores.shape != (n,) or not np.all(np.isfinite(scores)):
    raise RuntimeError(f"reward returned {scores.shape} / non-finite scores for {n} images")
  return {"scores": scores.tolist(), "details": details}


def _score_body(reward_fn: Callable, body: list[bytes], budget: Budget,
                deadline: Optional[float] = None) -> dict:
  """[raw request body] -> response dict: the depth check (no recursion) before json.loads.
  The body comes in a list that this empties, so that it is freed once parsed (the caller and
  the executor would otherwise hold it until scoring ends)."""
  raw = body.pop()
  request_budget.check_json_depth(raw, budget)
  try:  # UTF-8 only (json.loads would guess UTF-16/32, where the byte scan above is not exact)
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise protocol.ProtocolError(f"not JSON: the body is not UTF-8 ({e.reason} at byte "
                                 f"{e.start}); body starts {raw[:20]!r}") from None
  del raw
  return score_request(reward_fn, protocol.loads_strict(text), budget, deadline)


# ------------------------------------------------------------------ the aiohttp app
class _Gate:
  """Requests in flight: admitted and not done, their worker thread included. Touched only on
  the event loop (workers report back with call_soon_threadsafe)."""

  def __init__(self, cap: int):
    self.cap, self.count, self.draining = cap, 0, False
    self.idle = asyncio.Event()
    self.idle.set()

  def try_enter(self) -> bool:
    if self.count >= self.cap:
      return False
    self.count += 1
    self.idle.clear()
    return True

  def leave(self) -> None:
    self.count -= 1
    if self.count == 0:
      self.idle.set()


GATE = web.AppKey("gate", _Gate)


def _error(status: int, message: str, **headers: str) -> web.Response:
  if status >= 500 and status != 503:
    log.warning("/score -> %d: %s", status, message)
  else:
    log.info("/score -> %d: %s", status, message)
  return web.json_response({"error": message}, status=status, headers=headers or None)


def _authorized(header: Optional[str], token: str) -> bool:
  scheme, _, value = (header or "").partition(" ")
  # surrogateescape: aiohttp keeps header bytes that are not UTF-8 as surrogates. compare_digest:
  # the time taken does not tell how much of a guess was right.
  guess = value.strip().encode("utf-8", "surrogateescape")
  return scheme.lower() == "bearer" and hmac.compare_digest(guess, token.encode())


async def _read_body(request: web.Request, budget: Budget, timeout_s: float) -> bytes:
  if request.content_length is not None:
    request_budget.check_body_size(request.content_length, budget)
  try:
    return await asyncio.wait_for(request.read(), timeout_s)
  except web.HTTPRequestEntityTooLarge:  # a chunked body that grew past the limit
    raise BudgetError(413, f"request body exceeds {budget.max_body_bytes:,} bytes (--max_body_mb="
                      f"{budget.max_body_bytes / (1 << 20):g})") from None
  except asyncio.TimeoutError:
    raise BudgetError(408, f"request body not received within {timeout_s:g} s "
                      "(--read_timeout_s)") from None


def make_app(reward: str | Callable, max_body_bytes: Optional[int] = None, *,
             budget: Optional[Budget] = None, limits: Optional[Limits] = None,
             token: Optional[str] = None) -> web.Application:
  """The aiohttp app serving ``reward`` (a registered name or a reward fn). ``token``: the
  bearer token /score requires (None: no auth); ``max_body_bytes`` overrides the budget's."""
  reward_fn = registry.get(reward) if isinstance(reward, str) else reward
  name = reward if isinstance(reward, str) else getattr(reward, "__name__", "reward")
  budget = budget or Budget()
  if max_body_bytes is not None:
    budget = dataclasses.replace(budget, max_body_bytes=max_body_bytes)
  limits = limits or Limits()
  executor = concurrent.futures.ThreadPoolExecutor(limits.workers, thread_name_prefix="reward")
  gate = _Gate(limits.max_in_flight)

  async def health(request: web.Request) -> web.Response:
    del request
    return web.json_response({"status": "ok", "reward": name})

  def busy(why: str) -> web.Response:
    return _error(503, f"{why}; retry after {limits.retry_after_s} s",
                  **{"Retry-After": str(limits.retry_after_s)})

  async def score(request: web.Request) -> web.Response:
    if token is not None and not _authorized(request.headers.get("Authorization"), token):
      return _error(401, "missing or wrong 'Authorization: Bearer <token>' (the server's "
                    "token is set by its environment)", **{"WWW-Authenticate": "Bearer"})
    if gate.draining:
      return busy("the server is shutting down")
    if not gate.try_enter():
      return busy(f"server busy: {gate.count} requests in flight, the limit is {gate.cap} "
                  "(--max_in_flight)")
    try:
      body = [await _read_body(request, budget, limits.read_timeout_s)]
    except BaseException as e:
      gate.leave()
      if not isinstance(e, BudgetError):
        raise
      response = _error(e.status, str(e))
      response.force_close()  # the rest of a slow or oversized body is not wanted
      return response
    return await in_worker(body)

  async def in_worker(body: list[bytes]) -> web.Response:
    """Scores ``[body]`` in a worker thread (which empties the list, freeing the body once
    parsed); the worker's end, not this response, frees the request's slot."""
    loop = asyncio.get_running_loop()
    try:
      work = executor.submit(_score_body, reward_fn, body, budget,
                             time.monotonic() + limits.deadline_s)
    except RuntimeError:  # the executor is shut down: the server is stopping
      gate.leave()
      return busy("the server is shutting down")
    work.add_done_callback(lambda _: _call_soon(loop, gate.leave))
    try:
      result = await asyncio.wait_for(asyncio.wrap_future(work), limits.deadline_s)
    except (asyncio.TimeoutError, DeadlineExceeded):
      return _error(504, f"scoring took longer than the server's deadline of "
                    f"{limits.deadline_s:g} s (--deadline_s)")
    except BudgetError as e:
      return _error(e.status, str(e))
    except protocol.ProtocolError as e:
      return _error(400, str(e))
    except Exception as e:  # the reward failed: say why, as a 5xx
      return _error(500, f"{type(e).__name__}: {e}")
    return web.Response(text=json.dumps(result), content_type="application/json")

  async def stop_workers(app: web.Application) -> None:
    del app
    executor.shutdown(wait=False, cancel_futures=True)

  app = web.Application(client_max_size=budget.max_body_bytes)
  app[GATE] = gate
  app.router.add_get("/health", health)
  app.router.add_post("/score", score)
  app.on_cleanup.append(stop_workers)
  return app


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable) -> None:
  try:
    loop.call_soon_threadsafe(fn)
  except RuntimeError:  # the loop is closed: the server has already exited
    pass


# ------------------------------------------------------------------ running it
async def _serve(app: web.Application, host: str, port: int, grace_s: float,
                 idle_timeout_s: float) -> None:
  # keepalive_timeout also closes a connection that has not sent a whole request head by then
  # (slow-loris headers; a body being read is bounded by the read timeout instead).
  # shutdown_timeout: only for responses being written when in-flight work is done (below).
  runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0,
                         keepalive_timeout=idle_timeout_s)
  await runner.setup()
  site = web.TCPSite(runner, host, port)
  await site.start()
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  shown = f"[{host}]" if ":" in host else host
  print(f"serving on http://{shown}:{runner.addresses[0][1]}", flush=True)  # --port=0: which
  await stop.wait()
  gate = app[GATE]
  gate.draining = True  # connections still open get 503 for new requests
  print(f"stopping: {gate.count} requests in flight get up to {grace_s:g} s", flush=True)
  await site.stop()  # no new connections
  # Wait for the requests in flight ourselves: aiohttp's own shutdown would cancel those still
  # receiving their body.
  try:
    await asyncio.wait_for(gate.idle.wait(), grace_s)
  except asyncio.TimeoutError:
    pass
  await runner.cleanup()  # closes the connections left
  if gate.count:
    print(f"stopping: {gate.count} requests still in flight after {grace_s:g} s; exiting anyway",
          file=sys.stderr, flush=True)
    os._exit(0)  # a hung reward thread would otherwise keep the process alive


def serve_forever(app: web.Application, host: str, port: int, grace_s: float = 130.0,
                  idle_timeout_s: float = 30.0) -> None:
  """Serves ``app`` until SIGTERM/SIGINT, then shuts down gracefully (see the module doc).
  ``idle_timeout_s``: how long a connection may stay idle or take to send a request head."""
  asyncio.run(_serve(app, host, port, grace_s, idle_timeout_s))


def _is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:  # a host name other than localhost may resolve to anything
    return False


def _parser() -> argparse.ArgumentParser:
  d, b = Limits(), Budget()
  p = argparse.ArgumentParser(
      description="Serves a registered reward over the reward protocol, with request budgets, "
      "load limits and an optional bearer token (docs/rewards.md).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--reward", required=True, help=f"one of {registry.available()}")
  p.add_argument("--port", type=int, required=True, help="0: any free port (printed)")
  p.add_argument("--host", default="127.0.0.1",
                 help="interface to bind; beyond localhost needs a token (or --insecure)")
  p.add_argument("--token_env", default=None,
                 help=f"environment variable holding the bearer token /score requires "
                 f"(unset: {TOKEN_ENV}, optional; named here, it must be set)")
  p.add_argument("--insecure", action="store_true",
                 help="allow binding beyond localhost without a token")
  p.add_argument("--max_body_mb", type=float, default=b.max_body_bytes / (1 << 20),
                 help="request body size (413)")
  p.add_argument("--max_json_depth", type=int, default=b.max_json_depth,
                 help="JSON nesting, checked before parsing (400)")
  p.add_argument("--max_images", type=int, default=b.max_images, help="per request (413)")
  p.add_argument("--max_image_side", type=int, default=b.max_image_side,
                 help="px, from the PNG header (413)")
  p.add_argument("--max_request_pixels", type=int, default=b.max_request_pixels,
                 help="width * height summed over a request's images (413)")
  p.add_argument("--max_in_flight", type=int, default=d.max_in_flight,
                 help="requests admitted at once; beyond: 503 + Retry-After")
  p.add_argument("--workers", type=int, default=d.workers, help="threads decoding and scoring")
  p.add_argument("--read_timeout_s", type=float, default=d.read_timeout_s,
                 help="to receive a body (408) or a request head (connection closed)")
  p.add_argument("--deadline_s", type=float, default=d.deadline_s,
                 help="to decode and score a request (504)")
  p.add_argument("--shutdown_grace_s", type=float, default=d.read_timeout_s + d.deadline_s,
                 help="on SIGTERM, how long requests in flight may take to finish")
  return p


def main(argv=None) -> None:
  p = _parser()
  a = p.parse_args(argv)
  if a.reward not in registry.available():
    p.error(f"--reward: unknown reward {a.reward!r}; available: {registry.available()}")
  for flag in ("max_body_mb", "max_json_depth", "max_images", "max_image_side",
               "max_request_pixels", "max_in_flight", "workers", "read_timeout_s",
               "deadline_s"):
    if getattr(a, flag) <= 0:
      p.error(f"--{flag} must be positive, got {getattr(a, flag)}")
  token = os.environ.get(a.token_env or TOKEN_ENV) or None
  if a.token_env and token is None:
    p.error(f"--token_env: environment variable {a.token_env!r} is not set")
  if token is None and not _is_loopback(a.host) and not a.insecure:
    p.error(f"--host={a.host} would expose /score to the network without a token: set "
            f"${TOKEN_ENV} (clients send it via config.remote_rewards.<name>.token_env), or "
            "pass --insecure on a network you trust")
  budget = Budget(max_body_bytes=int(a.max_body_mb * (1 << 20)),
                  max_json_depth=a.max_json_depth, max_images=a.max_images,
                  max_image_side=a.max_image_side, max_request_pixels=a.max_request_pixels)
  limits = Limits(max_in_flight=a.max_in_flight, workers=a.workers,
                  read_timeout_s=a.read_timeout_s, deadline_s=a.deadline_s)
  # PIL's own decompression-bomb guard, consistent with the budget (errors past twice this;
  # the header check and decode_png's max_pixels refuse anything past it first).
  Image.MAX_IMAGE_PIXELS = budget.max_image_pixels
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  serve_forever(make_app(a.reward, budget=budget, limits=limits, token=token), a.host, a.port,
                a.shutdown_grace_s, idle_timeout_s=a.read_timeout_s)


if __name__ == "__main__":
  main()
