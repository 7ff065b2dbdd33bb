"""Rewards computed by HTTP servers: transport, the protocol client, and config -> reward fns.

Each entry of ``config.remote_rewards`` is one reward, named by its key, with a ``kind``:

- ``protocol``: a server speaking ``rewards.protocol`` (e.g. ``python -m
  unigrpo_jax.rewards.serve --reward=NAME``);
- ``geneval``: the same protocol, sent to a GenEval-detector server; every prompt must carry
  GenEval metadata (``rewards.geneval``);
- ``vlm_judge``: an OpenAI-compatible ``/v1/chat/completions`` endpoint (``rewards.vlm_judge``).

Safety (``http.py``): requests go only to the entry's ``url`` (http/https; redirects are refused,
not followed); responses are read up to ``max_response_bytes`` and parsed as JSON only; the
optional bearer token is read from the environment variable named by ``token_env``. The keys of
an entry and their defaults: ``config_defaults.remote_reward_defaults``.

Robustness: a batch is cut into chunks of ``chunk_size`` images, ``max_in_flight`` chunks are in
flight at once (threads), each request has ``timeout_s``; connection errors, timeouts and 5xx
are retried ``retries`` times with exponential backoff (``backoff_s * 2**attempt``). Anything
else (4xx, bad JSON, wrong counts, NaN) fails at once. Giving up raises ``RemoteRewardError``
naming the URL, the chunk and its prompts; the trainer then stops (never trains on a partial
reward).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from unigrpo_jax.config_defaults import REMOTE_REWARD_KINDS
from unigrpo_jax.data import geneval
from unigrpo_jax.rewards import protocol
from unigrpo_jax.rewards.remote import vlm_judge
from unigrpo_jax.rewards.remote.http import (RemoteRewardError, Transport, check_url, describe_chunk, post_json, run_chunks)


# ------------------------------------------------------------------ the protocol client
class ProtocolClient:
  """Scores images with a ``rewards.protocol`` server."""

  def __init__(self, transport: Transport, chunk_size: int = 16, max_in_flight: int = 4):
    self.t, self.chunk_size, self.max_in_flight = transport, chunk_size, max_in_flight

  def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict],
            reasoning: Optional[Sequence[str]] = None) -> dict:
    """images uint8 [N, H, W, 3] -> {"reward": float32 [N], details: float32 [N] each}."""
    n = len(images)

    def chunk(a: int, b: int):
      what = describe_chunk(a, prompts[a:b])
      try:
        payload = protocol.make_request(images[a:b], prompts[a:b], metadata[a:b],
                                        None if reasoning is None else reasoning[a:b])
      except protocol.ProtocolError as e:
        raise RemoteRewardError(f"remote reward {self.t.name!r}: {what}: {e}") from None
      return post_json(self.t, payload, what, lambda body: protocol.parse_response(body, b - a))

    parts = run_chunks(chunk, n, self.chunk_size, self.max_in_flight)
    scores = np.concatenate([p[0] for p in parts])
    names = set(parts[0][1])
    if any(set(p[1]) != names for p in parts):
      raise RemoteRewardError(f"remote reward {self.t.name!r} at {self.t.url}: chunks returned "
                              "different detail names")
    out = {k: np.concatenate([p[1][k] for p in parts]) for k in sorted(names)}
    out["reward"] = scores
    return out


# ------------------------------------------------------------------ config -> reward fns
def build_reward_fns(remote_rewards, names: Sequence[str]) -> dict[str, Callable]:
  """Reward fns for the ``names`` that are entries of ``config.remote_rewards`` (validated:
  URL, token env var, kind). Other names are left to the registry."""
  fns = {}
  for name in names:
    if remote_rewards is None or name not in remote_rewards:
      continue
    e = remote_rewards[name]
    field = f"config.remote_rewards.{name}"
    if e.get("kind") not in REMOTE_REWARD_KINDS:
      raise ValueError(f"{field}.kind: {e.get('kind')!r} is not one of {REMOTE_REWARD_KINDS}")
    check_url(f"{field}.url", e.url)
    t = Transport.from_entry(name, e)
    if e.kind == "vlm_judge":
      fns[name] = vlm_judge.make_reward(t, e)
    else:
      fns[name] = _protocol_reward(ProtocolClient(t, e.chunk_size, e.max_in_flight),
                                   needs_geneval=e.kind == "geneval")
  return fns


def _protocol_reward(client: ProtocolClient, needs_geneval: bool) -> Callable:
  def fn(images, specs, reasoning_texts=None, prompts=None, metadata=None) -> dict:
    if prompts is None:
      raise ValueError(f"remote reward {client.t.name!r} needs the prompts")
    metadata = geneval.batch_metadata(specs, metadata, prompts, require_geneval=needs_geneval)
    return client.score(np.asarray(images), list(prompts), metadata, reasoning_texts)
  fn.remote = True
  return fn
