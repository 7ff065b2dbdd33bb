"""The VLM judge against a local fake OpenAI-compatible chat-completions endpoint."""
import json

import numpy as np
import pytest
from aiohttp import web

from local_server import serve
from unigrpo_jax.rewards.remote import client as remote, vlm_judge
from unigrpo_jax import config_defaults
from unigrpo_jax.rewards.remote import http as remote_http

IMAGES = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
PROMPTS = [f"a photo of thing {i}" for i in range(6)]


def fake_openai(replies: dict, seen: list) -> web.Application:
  """Answers with replies[i] for the image whose top-left pixel matches IMAGES[i]; records
  each request (model, text, decoded image, headers)."""
  async def chat(request):
    body = json.loads(await request.read())
    content = body["messages"][0]["content"]
    image = vlm_judge.data_uri_png(content[0]["image_url"]["url"])
    i = next(k for k in range(len(IMAGES)) if np.array_equal(IMAGES[k], image))
    seen.append({"i": i, "model": body["model"], "text": content[1]["text"],
                 "types": [c["type"] for c in content], "max_tokens": body["max_tokens"],
                 "auth": request.headers.get("Authorization")})
    return web.json_response({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": replies[i]},
         "finish_reason": "stop"}]})

  app = web.Application()
  app.router.add_post("/v1/chat/completions", chat)
  return app


def judge_fn(url, **kw):
  e = config_defaults.remote_reward_defaults("vlm_judge")
  e.url, e.model, e.backoff_s, e.timeout_s = url, "fake-vl", 0.01, 10.0
  e.template = "Rate {prompt} please."
  e.update(kw)
  return remote.build_reward_fns({"judge": e}, ["judge"])["judge"]


def test_prompt_and_image_arrive_as_specified_and_scores_parse(monkeypatch):
  monkeypatch.setenv("JUDGE_TOKEN", "tok")
  replies = {i: f"The image is fine. Score: {i + 2}" for i in range(6)}
  seen = []
  with serve(fake_openai(replies, seen)) as base:
    fn = judge_fn(base + "/v1/chat/completions", token_env="JUDGE_TOKEN")
    out = fn(IMAGES, [None] * 6, None, prompts=PROMPTS, metadata=None)
  np.testing.assert_allclose(out["reward"], [(i + 2) / 10 for i in range(6)], atol=1e-6)
  np.testing.assert_array_equal(out["parse_failed"], 0)
  assert sorted(s["i"] for s in seen) == list(range(6))  # each image exactly once, unaltered
  for s in seen:
    assert s["text"] == f"Rate {PROMPTS[s['i']]} please."
    assert s["model"] == "fake-vl" and s["types"] == ["image_url", "text"]
    assert s["auth"] == "Bearer tok" and s["max_tokens"] == 64


@pytest.mark.parametrize("reply, why", [
    ("I like it.", "no score"),
    ("Score: 3 or maybe Score: 4", "2 scores"),
    ("Score: 11", "outside"),
    ("score = -1", "outside"),
])
def test_strict_parsing(reply, why):
  j = vlm_judge.Judge(remote_http.Transport(url="http://x/"), "m", "{prompt}",
                      config_defaults.VLM_JUDGE_PATTERN, 0, 10, 8, 0.5)
  assert j.parse_score("Score: 7.5") == pytest.approx(0.75)
  with pytest.raises(ValueError, match=why):
    j.parse_score(reply)


def test_unparsable_replies_counted_and_reported(capsys):
  replies = {i: f"Score: {i}" for i in range(6)}
  replies[4] = "I cannot rate this image."
  seen = []
  with serve(fake_openai(replies, seen)) as base:
    fn = judge_fn(base + "/v1/chat/completions", max_failed_fraction=0.2)
    out = fn(IMAGES, [None] * 6, None, prompts=PROMPTS)
    np.testing.assert_array_equal(out["parse_failed"], [0, 0, 0, 0, 1, 0])
    ok = np.array([0, 1, 2, 3, 5]) / 10
    np.testing.assert_allclose(out["reward"], [*ok[:4], ok.mean(), ok[4]], atol=1e-6)
    err = capsys.readouterr().err
    assert "1/6 replies without a valid score" in err and "I cannot rate this image." in err
    assert "'a photo of thing 4'" in err
    replies[1] = "No idea."  # 2/6 > 0.2: the step fails, naming the replies
    with pytest.raises(remote_http.RemoteRewardError, match=r"2/6 replies without a valid score "
                       r"\(more than max_failed_fraction=0.2\).*No idea"):
      fn(IMAGES, [None] * 6, None, prompts=PROMPTS)


def test_not_a_chat_completion_is_an_error():
  async def chat(request):
    return web.json_response({"choices": []})
  app = web.Application()
  app.router.add_post("/v1/chat/completions", chat)
  with serve(app) as base:
    fn = judge_fn(base + "/v1/chat/completions")
    with pytest.raises(remote_http.RemoteRewardError, match="not a chat-completions response"):
      fn(IMAGES[:1], [None], None, prompts=PROMPTS[:1])


def test_bad_judge_config_named():
  with pytest.raises(ValueError, match=r"remote_rewards.judge.template: must contain"):
    judge_fn("http://h/v1/chat/completions", template="no placeholder")
  with pytest.raises(ValueError, match=r"remote_rewards.judge.score_pattern: needs a group"):
    judge_fn("http://h/v1/chat/completions", score_pattern="score")
