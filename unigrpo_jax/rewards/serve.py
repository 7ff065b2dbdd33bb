"""Serves any registered reward over ``rewards.protocol`` (aiohttp).

  python -m unigrpo_jax.rewards.serve --reward=shapeworld --port=8000 [--host=127.0.0.1]

Endpoints: ``POST /score`` (the protocol; body at most ``--max_body_mb``), ``GET /health``
(``{"status": "ok", "reward": NAME}``). A ShapeWorld reward reads each item's scene from
``metadata.spec`` (the client sends it for ShapeWorld prompts). Bad requests get 400 with the
reason; a reward that raises gets 500 with the reason (the client retries 5xx: a reward that
fails deterministically fails the run after the retries). The reward runs in a worker thread
so /health answers while a batch is being scored.
"""
from __future__ import annotations

import argparse
import asyncio
import json
from typing import Callable

import numpy as np
from aiohttp import web

from unigrpo_jax.data import shapeworld as sw
from unigrpo_jax.rewards import protocol, registry


def _specs(metadata: list[dict]) -> list:
  out = []
  for i, m in enumerate(metadata):
    try:
      out.append(sw.Spec.from_dict(m["spec"]) if "spec" in m else None)
    except (KeyError, TypeError, ValueError) as e:
      raise protocol.ProtocolError(f"metadata[{i}].spec: {e}") from None
  return out


def score_request(reward_fn: Callable, obj) -> dict:
  """Protocol request dict -> response dict. ProtocolError for bad requests; the reward's own
  exceptions propagate."""
  images, prompts, metadata, reasoning = protocol.parse_request(obj)
  shapes = {im.shape for im in images}
  if len(shapes) != 1:
    raise protocol.ProtocolError(f"images must share one shape, got {sorted(shapes)}")
  specs = _specs(metadata)
  if "spec" in getattr(reward_fn, "requires", ()) and None in specs:
    raise protocol.ProtocolError(f"metadata[{specs.index(None)}] has no 'spec' (a ShapeWorld "
                                 "scene), which this reward needs")
  kwargs = {k: v for k, v in (("prompts", prompts), ("metadata", metadata))
            if k in registry.accepted_kwargs(reward_fn)}
  out = reward_fn(np.stack(images), specs, reasoning_texts=reasoning, **kwargs)
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


def make_app(reward: str | Callable, max_body_bytes: int = 256 << 20) -> web.Application:
  """The aiohttp app serving ``reward`` (a registered name or a reward fn)."""
  reward_fn = registry.get(reward) if isinstance(reward, str) else reward
  name = reward if isinstance(reward, str) else getattr(reward, "__name__", "reward")

  async def health(request: web.Request) -> web.Response:
    del request
    return web.json_response({"status": "ok", "reward": name})

  async def score(request: web.Request) -> web.Response:
    try:
      obj = protocol.loads_strict(await request.read())
    except protocol.ProtocolError as e:
      return web.json_response({"error": str(e)}, status=400)
    loop = asyncio.get_running_loop()
    try:
      result = await loop.run_in_executor(None, score_request, reward_fn, obj)
    except protocol.ProtocolError as e:
      return web.json_response({"error": str(e)}, status=400)
    except Exception as e:  # the reward failed: say why, as a 5xx
      return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=500)
    return web.Response(text=json.dumps(result), content_type="application/json")

  app = web.Application(client_max_size=max_body_bytes)
  app.router.add_get("/health", health)
  app.router.add_post("/score", score)
  return app


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reward", required=True, help=f"one of {registry.available()}")
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--host", default="127.0.0.1",
                 help="interface to bind; 0.0.0.0 exposes the server to the network")
  p.add_argument("--max_body_mb", type=float, default=256.0, help="request body size limit")
  a = p.parse_args(argv)
  if a.reward not in registry.available():
    p.error(f"--reward: unknown reward {a.reward!r}; available: {registry.available()}")
  web.run_app(make_app(a.reward, int(a.max_body_mb * (1 << 20))), host=a.host, port=a.port)


if __name__ == "__main__":
  main()
