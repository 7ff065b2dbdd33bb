"""Rewards named on the command line, their validation, and a training run whose remote reward
server fails: it stops with its last checkpoint intact and never trains on that step."""
import os
import subprocess
import sys

import numpy as np
import pytest

from local_server import serve
from test_trainer import tiny_config
from unigrpo_jax import checkpointing, config_defaults, config_validation, main
from unigrpo_jax.rewards import registry
from unigrpo_jax.rewards.remote import client as remote
from unigrpo_jax.rewards import serve as serve_lib
from unigrpo_jax.trainers.metrics import read_metrics
from unigrpo_jax.trainers.scoring import RewardError
from unigrpo_jax.trainers.unigrpo import run_train
from unigrpo_jax import config_defaults

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_reward_flags_are_split_off_and_applied_to_the_locked_config():
  rest, weights = main.split_reward_flags(
      ["prog", "--config=c.py", "--config.rewards.pickscore=1.0", "--config.rewards.judge",
       "0.5", "--config.rollout.group_size=4"])
  assert rest == ["prog", "--config=c.py", "--config.rollout.group_size=4"]
  assert weights == {"pickscore": "1.0", "judge": "0.5"}
  c = config_defaults.base()
  c.lock()
  main.apply_reward_flags(c, {"shapeworld_strict": "0.5", "shapeworld": "0"})
  assert dict(c.rewards) == {"shapeworld": 0.0, "shapeworld_strict": 0.5}
  config_validation.validate(c)
  with pytest.raises(SystemExit, match=r"config.rewards.x: weight 'abc' is not a number"):
    main.apply_reward_flags(c, {"x": "abc"})


@pytest.mark.parametrize("rewards, urls, match", [
    ({"nosuch": 1.0}, {}, r"config.rewards.nosuch: unknown reward; available: \[.*'geneval'"),
    ({"vlm_judge": 1.0}, {}, r"config.remote_rewards.vlm_judge.url: empty"),
    ({"vlm_judge": 1.0}, {"vlm_judge": "http://h:8000/v1/chat/completions"},
     r"config.remote_rewards.vlm_judge.model: empty"),
    ({"geneval": 1.0}, {"geneval": "h:8000"}, r"config.remote_rewards.geneval.url: 'h:8000'"),
    ({"shapeworld": 0.0}, {}, r"config.rewards: all weights are 0"),
    ({"shapeworld": "1"}, {}, r"config.rewards.shapeworld: weight must be a number"),
])
def test_reward_config_errors_name_the_field(rewards, urls, match):
  c = config_defaults.base()
  c.rewards = rewards
  for name, url in urls.items():
    c.remote_rewards[name].url = url
  with pytest.raises(config_validation.ConfigError, match=match):
    config_validation.validate(c)


def test_cli_new_reward_name_gives_one_line_not_a_traceback(tmp_path):
  cmd = [sys.executable, "-m", "unigrpo_jax.main", "--config=configs/shapes_cpu.py",
         f"--workdir={tmp_path}", "--config.rewards.pickscore_typo=1.0"]
  p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                     env={**os.environ, "PYTHONPATH": REPO})
  assert p.returncode != 0
  assert "Traceback" not in p.stderr and "AttributeError" not in p.stderr
  assert ("error: bad config: config.rewards.pickscore_typo: unknown reward; available:"
          in p.stderr.strip().splitlines()[-1])


def test_example_config_validates(monkeypatch):
  monkeypatch.syspath_prepend(REPO)
  from configs import bagel_7b_pickscore_vlm
  c = bagel_7b_pickscore_vlm.get_config()
  monkeypatch.setenv("VLM_JUDGE_TOKEN", "x")
  assert dict(c.rewards) == {"pickscore": 1.0, "vlm_judge": 0.5}
  assert c.rollout.group_size == 24 and c.optim.lr_gen == 3e-5  # Table 3, from bagel_7b
  c.rewards = {"vlm_judge": 0.5}  # pickscore loads its model (a directory) when validated
  config_validation.validate_rewards(c)


def test_geneval_config_needs_its_server_url_and_evaluates_on_geneval(monkeypatch):
  monkeypatch.syspath_prepend(REPO)
  from configs import bagel_geneval
  c = bagel_geneval.get_config()
  assert dict(c.rewards) == {"geneval": 1.0}
  assert c.data.eval_prompt_file == "package://geneval/evaluation_metadata.jsonl"
  with pytest.raises(config_validation.ConfigError, match=r"remote_rewards.geneval.url: empty"):
    config_validation.validate_rewards(c)
  c.remote_rewards.geneval.url = "http://10.0.0.5:8000/score"
  config_validation.validate_rewards(c)


class _FailsAfter:
  """The ShapeWorld reward, served; raises from its ``n``-th call on (a 500 each time)."""

  def __init__(self, n: int):
    self.n, self.calls = n, 0

  def __call__(self, images, specs, reasoning_texts=None):
    self.calls += 1
    if self.calls >= self.n:
      raise RuntimeError("detector crashed")
    return registry.get("shapeworld")(images, specs, reasoning_texts)


def _remote_config(url: str, total_steps: int):
  c = tiny_config(total_steps)
  c.eval_every = 100  # only the step-0 evaluation and the last step's
  e = config_defaults.remote_reward_defaults("protocol")
  e.url, e.retries, e.backoff_s, e.timeout_s = url, 1, 0.01, 30.0
  c.remote_rewards.served = e
  c.rewards = {"served": 1.0}
  return c


@pytest.mark.slow
def test_training_stops_on_a_failing_reward_server_with_last_checkpoint_intact(tmp_path):
  workdir = str(tmp_path)
  failing = _FailsAfter(3)  # steps 1 and 2 are scored; step 3's request gets 500s
  with serve(serve_lib.make_app(failing), max_seconds=900) as base:
    with pytest.raises(RewardError, match=r"remote reward 'served' at http://127.0.0.1:\d+/score: "
                       r"chunk rows 0\.\.3 .*gave up after 2 attempts; last error: HTTP 500.*"
                       r"detector crashed"):
      run_train(_remote_config(base + "/score", 4), workdir)
  assert failing.calls == 4  # step 3 tried twice; no row-by-row re-runs against the server
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [0, 1, 2]  # step 3 was never trained or logged
  ckpt = checkpointing.RunCheckpointer(workdir, keep=2, async_save=False)
  assert ckpt.latest_step() == 2
  ckpt.close()
  assert "eval/geneval/overall" in rows[0] and "train/reward/overall" in rows[1]
  np.testing.assert_array_less(-1e-6, [r["train/reward_mean"] for r in rows[1:]])
  # The server is healthy again: the same command resumes from step 2 and finishes.
  with serve(serve_lib.make_app("shapeworld"), max_seconds=900) as base:
    run_train(_remote_config(base + "/score", 3), workdir)
  assert [r["step"] for r in read_metrics(workdir)] == [0, 1, 2, 3]
