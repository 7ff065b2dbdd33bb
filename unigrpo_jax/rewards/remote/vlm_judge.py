"""VLM judge: scores each image with an OpenAI-compatible ``/v1/chat/completions`` endpoint.

Any server with that API works (vLLM or SGLang serving Qwen2.5-VL, UnifiedReward, ...). One
request per image, ``max_in_flight`` in flight, with the transport's timeouts and retries::

  {"model": model, "temperature": 0, "max_tokens": max_tokens,
   "messages": [{"role": "user", "content": [
       {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
       {"type": "text", "text": template with {prompt} replaced by the prompt}]}]}

The reply text (``choices[0].message.content``) must contain exactly one match of
``score_pattern`` (group 1 a number in [score_min, score_max]); the reward is that number
scaled to [0, 1]. A reply without one is an error for that image: it is counted
(``parse_failed``), reported with the reply text, and the image gets the mean reward of the
batch's parsed images [ours: neutral-ish, keeps the step]. When more than
``max_failed_fraction`` of the batch fails, the step fails (``RemoteRewardError``).
"""
from __future__ import annotations

import re
import sys
from typing import Sequence

import numpy as np

from unigrpo_jax.rewards import protocol
from unigrpo_jax.rewards.remote.http import (RemoteRewardError, Transport, describe_chunk, post_json, run_chunks)

class Judge:
  """Parses and scores; one instance per configured judge."""

  def __init__(self, transport: Transport, model: str, template: str, score_pattern: str,
               score_min: float, score_max: float, max_tokens: int,
               max_failed_fraction: float, max_in_flight: int = 4):
    field = f"config.remote_rewards.{transport.name}"
    if "{prompt}" not in template:
      raise ValueError(f"{field}.template: must contain {{prompt}}")
    try:
      self.pattern = re.compile(score_pattern)
    except re.error as e:
      raise ValueError(f"{field}.score_pattern: not a regex ({e})") from None
    if self.pattern.groups < 1:
      raise ValueError(f"{field}.score_pattern: needs a group capturing the number")
    if not score_max > score_min:
      raise ValueError(f"{field}: score_max {score_max} must exceed score_min {score_min}")
    if not 0.0 <= max_failed_fraction <= 1.0:
      raise ValueError(f"{field}.max_failed_fraction: {max_failed_fraction} not in [0, 1]")
    if not model:
      raise ValueError(f"{field}.model: empty; name the model the endpoint serves")
    self.t, self.model, self.template = transport, model, template
    self.lo, self.hi, self.max_tokens = float(score_min), float(score_max), int(max_tokens)
    self.max_failed_fraction, self.max_in_flight = float(max_failed_fraction), max_in_flight

  def request(self, image: np.ndarray, prompt: str) -> dict:
    png = protocol.encode_png(image)
    return {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                {"type": "text", "text": self.template.replace("{prompt}", prompt)}]}]}

  @staticmethod
  def reply_text(body: bytes) -> str:
    """choices[0].message.content of a chat-completions response (str or list of parts)."""
    obj = protocol.loads_strict(body)
    try:
      content = obj["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
      raise protocol.ProtocolError("not a chat-completions response (no "
                                   "choices[0].message.content)") from None
    if isinstance(content, list):
      content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
      raise protocol.ProtocolError("choices[0].message.content is not text")
    return content

  def parse_score(self, reply: str) -> float:
    """The one score in ``reply``, scaled to [0, 1]; ValueError saying why not."""
    found = self.pattern.findall(reply)
    if len(found) != 1:
      raise ValueError("no score" if not found else f"{len(found)} scores")
    text = found[0] if isinstance(found[0], str) else found[0][0]
    value = float(text)
    if not self.lo <= value <= self.hi:
      raise ValueError(f"score {value} outside [{self.lo}, {self.hi}]")
    return (value - self.lo) / (self.hi - self.lo)

  def score(self, images: np.ndarray, prompts: Sequence[str]) -> dict:
    """images uint8 [N, H, W, 3] -> {"reward": float32 [N] in [0, 1], "parse_failed": [N]}."""
    n = len(images)

    def one(a: int, b: int) -> str:
      return post_json(self.t, self.request(images[a], prompts[a]), describe_chunk(a, prompts[a:b]),
                       self.reply_text)

    replies = run_chunks(one, n, 1, self.max_in_flight)
    scores, failures = np.zeros(n, np.float32), []
    for i, reply in enumerate(replies):
      try:
        scores[i] = self.parse_score(reply)
      except ValueError as e:
        failures.append((i, str(e), reply))
    failed = np.zeros(n, np.float32)
    if failures:
      failed[[i for i, _, _ in failures]] = 1.0
      report = "; ".join(f"row {i} prompt {prompts[i]!r}: {why} in reply {reply[:200]!r}"
                         for i, why, reply in failures[:3])
      head = (f"vlm judge {self.t.name!r} at {self.t.url}: {len(failures)}/{n} replies without "
              f"a valid score")
      if len(failures) > self.max_failed_fraction * n or len(failures) == n:
        raise RemoteRewardError(f"{head} (more than max_failed_fraction="
                                f"{self.max_failed_fraction}): {report}")
      print(f"warning: {head}, given the batch's mean: {report}", file=sys.stderr, flush=True)
      scores[failed > 0] = scores[failed == 0].mean()
    return {"reward": scores, "parse_failed": failed}


def make_reward(t: Transport, e) -> callable:
  judge = Judge(t, model=e.model, template=e.template, score_pattern=e.score_pattern,
                score_min=e.score_min, score_max=e.score_max, max_tokens=e.max_tokens,
                max_failed_fraction=e.max_failed_fraction, max_in_flight=e.max_in_flight)

  def fn(images, specs, reasoning_texts=None, prompts=None, metadata=None) -> dict:
    del specs, reasoning_texts, metadata
    if prompts is None:
      raise ValueError(f"vlm judge {t.name!r} needs the prompts")
    return judge.score(np.asarray(images), list(prompts))
  fn.remote = True
  fn.judge = judge
  return fn


def data_uri_png(uri: str) -> np.ndarray:
  """``data:image/png;base64,...`` -> uint8 [H, W, 3] (for servers and tests)."""
  prefix = "data:image/png;base64,"
  if not uri.startswith(prefix):
    raise protocol.ProtocolError(f"not a PNG data URI: {uri[:40]!r}")
  return protocol.decode_png(uri[len(prefix):])
