"""HTTP transport of the remote rewards: one URL, its limits and its retry policy.

Requests go only to the configured URL (http/https; redirects are refused, not followed);
responses are read up to ``max_response_bytes``; the optional bearer token comes from the
environment variable named by ``token_env``. Connection errors, timeouts and 5xx are retried with
exponential backoff; anything else fails at once with ``RemoteRewardError`` naming the URL and
the chunk. Used by the protocol client (``client.py``) and the VLM judge (``vlm_judge.py``).
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

from unigrpo_jax.rewards import protocol


class RemoteRewardError(RuntimeError):
  """A remote reward gave up (after retries) or got an answer it must not use."""


class _Retryable(Exception):
  """Connection error, timeout or 5xx: worth another attempt."""


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
