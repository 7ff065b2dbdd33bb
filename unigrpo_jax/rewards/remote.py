"""Rewards computed by HTTP servers: transport, the protocol client, and config -> reward fns.

Each entry of ``config.remote_rewards`` is one reward, named by its key, with a ``kind``:

- ``protocol``: a server speaking ``rewards.protocol`` (e.g. ``python -m
  unigrpo_jax.rewards.serve --reward=NAME``);
- ``geneval``: the same protocol, sent to a GenEval-detector server; every prompt must carry
  GenEval metadata (``rewards.geneval``);
- ``vlm_judge``: an OpenAI-compatible ``/v1/chat/completions`` endpoint (``rewards.vlm_judge``).

Safety: requests go only to the entry's ``url`` (http/https; redirects are refused, not
followed); responses are read up to ``max_response_bytes`` and parsed as JSON only; the
optional bearer token is read from the environment variable named by ``token_env``.

Robustness: a batch is cut into chunks of ``chunk_size`` images, ``max_in_flight`` chunks are in
flight at once (threads), each request has ``timeout_s``; connection errors, timeouts and 5xx
are retried ``retries`` times with exponential backoff (``backoff_s * 2**attempt``). Anything
else (4xx, bad JSON, wrong counts, NaN) fails at once. Giving up raises ``RemoteRewardError``
naming the URL, the chunk and its prompts; the trainer then stops (never trains on a partial
reward).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Optional, Sequence

import ml_collections
import numpy as np

from unigrpo_jax.rewards import protocol

KINDS = ("protocol", "geneval", "vlm_judge")


class RemoteRewardError(RuntimeError):
  """A remote reward gave up (after retries) or got an answer it must not use."""


class _Retryable(Exception):
  """Connection error, timeout or 5xx: worth another attempt."""


# ------------------------------------------------------------------ config
def entry_defaults(kind: str = "protocol") -> ml_collections.ConfigDict:
  """The keys of one ``config.remote_rewards.<name>`` entry, with defaults."""
  if kind not in KINDS:
    raise ValueError(f"remote reward kind {kind!r} is not one of {KINDS}")
  e = ml_collections.ConfigDict()
  e.kind = kind
  e.url = ""  # e.g. http://10.0.0.5:8000/score; required when the reward has a weight
  e.token_env = ""  # name of an env var holding a bearer token; "" = no Authorization header
  e.timeout_s = 120.0  # per request
  e.total_timeout_s = 600.0  # per chunk, all attempts and backoffs together; <= 0: no limit
  e.retries = 3  # extra attempts after a connection error, timeout or 5xx
  e.backoff_s = 1.0  # wait before retry k is backoff_s * 2**k
  e.chunk_size = 16  # images per request (vlm_judge: always 1)
  e.max_in_flight = 4  # concurrent requests
  e.max_response_bytes = 1 << 20
  if kind == "vlm_judge":
    from unigrpo_jax.rewards import vlm_judge
    e.update(vlm_judge.judge_defaults())
  return e


@dataclasses.dataclass(frozen=True)
class Transport:
  """Where and how to POST: one URL, its limits, its retry policy."""
  url: str
  name: str = "remote"
  token: Optional[str] = None
  timeout_s: float = 120.0
  retries: int = 3
  backoff_s: float = 1.0
  max_response_bytes: int = 1 << 20
  total_timeout_s: float = 600.0  # one chunk's budget across retries; <= 0: no limit

  @classmethod
  def from_entry(cls, name: str, e) -> "Transport":
    return cls(url=e.url, name=name, token=read_token(name, e.token_env), timeout_s=e.timeout_s,
               retries=e.retries, backoff_s=e.backoff_s,
               max_response_bytes=e.max_response_bytes,
               total_timeout_s=e.get("total_timeout_s", 600.0))


def read_token(name: str, token_env: str) -> Optional[str]:
  if not token_env:
    return None
  token = os.environ.get(token_env)
  if not token:
    raise ValueError(f"config.remote_rewards.{name}.token_env: environment variable "
                     f"{token_env!r} is not set")
  return token


def check_url(field: str, url: str) -> None:
  """http(s)://host[:port]/path or a ValueError naming the field."""
  if not url:
    raise ValueError(f"{field}: empty; this reward needs its server's URL")
  parts = urllib.parse.urlsplit(url)
  if parts.scheme not in ("http", "https") or not parts.hostname:
    raise ValueError(f"{field}: {url!r} is not an http(s)://host[:port]/path URL")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
  """Only URLs named in the config are contacted: a 3xx is an error, never followed."""

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _post_once(t: Transport, body: bytes, timeout_s: float) -> bytes:
  headers = {"Content-Type": "application/json", "Accept": "application/json"}
  if t.token:
    headers["Authorization"] = f"Bearer {t.token}"
  req = urllib.request.Request(t.url, data=body, headers=headers, method="POST")
  try:
    with _OPENER.open(req, timeout=timeout_s) as resp:
      length = resp.headers.get("Content-Length")
      if length is not None and length.isdigit() and int(length) > t.max_response_bytes:
        raise RemoteRewardError(f"response of {int(length)} bytes exceeds max_response_bytes="
                                f"{t.max_response_bytes}")
      data = resp.read(t.max_response_bytes + 1)
      if len(data) > t.max_response_bytes:
        raise RemoteRewardError(f"response exceeds max_response_bytes={t.max_response_bytes}")
      return data
  except urllib.error.HTTPError as e:
    snippet = e.read(300).decode("utf-8", "replace") if e.fp else ""
    e.close()
    if e.code >= 500:
      raise _Retryable(f"HTTP {e.code}: {snippet!r}") from None
    raise RemoteRewardError(f"HTTP {e.code}: {snippet!r}") from None
  except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as e:
    reason = getattr(e, "reason", e)
    raise _Retryable(f"{type(reason).__name__}: {reason}") from None


def post_json(t: Transport, payload: dict, what: str,
              parse: Callable[[bytes], object]) -> object:
  """POSTs payload to t.url with retries; returns parse(body). Each attempt waits at most
  ``timeout_s`` and all attempts with their backoffs at most ``total_timeout_s``. Raises
  RemoteRewardError naming the reward, URL and ``what`` (the chunk and its prompts) once it
  gives up."""
  body = json.dumps(payload).encode()
  budget = t.total_timeout_s if t.total_timeout_s > 0 else float("inf")
  deadline = time.monotonic() + budget
  last, attempts = "", 0
  for attempt in range(t.retries + 1):
    if attempt:
      wait = t.backoff_s * 2 ** (attempt - 1)
      if time.monotonic() + wait >= deadline:
        break  # the backoff alone would run past the budget
      time.sleep(wait)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      break
    attempts += 1
    try:
      return parse(_post_once(t, body, min(t.timeout_s, remaining)))
    except _Retryable as e:
      last = str(e)
    except (RemoteRewardError, protocol.ProtocolError) as e:
      raise RemoteRewardError(f"remote reward {t.name!r} at {t.url}: {what}: {e}") from None
  spent = "" if attempts == t.retries + 1 else f" (total_timeout_s={t.total_timeout_s:g} spent)"
  raise RemoteRewardError(f"remote reward {t.name!r} at {t.url}: {what}: gave up after "
                          f"{attempts} attempts{spent}; last error: {last}")


def describe_chunk(start: int, prompts: Sequence[str], limit: int = 3) -> str:
  shown = ", ".join(repr(p) for p in prompts[:limit])
  more = f" and {len(prompts) - limit} more" if len(prompts) > limit else ""
  return f"chunk rows {start}..{start + len(prompts) - 1} (prompts {shown}{more})"


def run_chunks(fn: Callable[[int, int], object], n: int, chunk_size: int,
               max_in_flight: int) -> list:
  """[fn(start, stop) for each chunk], max_in_flight at a time, in chunk order. The first
  exception (in chunk order) propagates after the others finish or are cancelled."""
  bounds = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
  if max_in_flight <= 1 or len(bounds) == 1:
    return [fn(a, b) for a, b in bounds]
  with concurrent.futures.ThreadPoolExecutor(min(max_in_flight, len(bounds))) as pool:
    futures = [pool.submit(fn, a, b) for a, b in bounds]
    try:
      return [f.result() for f in futures]
    finally:
      for f in futures:
        f.cancel()


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
    if e.get("kind") not in KINDS:
      raise ValueError(f"{field}.kind: {e.get('kind')!r} is not one of {KINDS}")
    check_url(f"{field}.url", e.url)
    t = Transport.from_entry(name, e)
    if e.kind == "vlm_judge":
      from unigrpo_jax.rewards import vlm_judge
      fns[name] = vlm_judge.make_reward(t, e)
    else:
      fns[name] = _protocol_reward(ProtocolClient(t, e.chunk_size, e.max_in_flight),
                                   needs_geneval=e.kind == "geneval")
  return fns


def _protocol_reward(client: ProtocolClient, needs_geneval: bool) -> Callable:
  def fn(images, specs, reasoning_texts=None, prompts=None, metadata=None) -> dict:
    from unigrpo_jax.rewards import geneval
    if prompts is None:
      raise ValueError(f"remote reward {client.t.name!r} needs the prompts")
    metadata = geneval.batch_metadata(specs, metadata, prompts, require_geneval=needs_geneval)
    return client.score(np.asarray(images), list(prompts), metadata, reasoning_texts)
  fn.remote = True
  return fn
