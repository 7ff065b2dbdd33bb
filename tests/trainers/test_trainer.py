"""The training program end to end on the tiny model: outputs, resume, compiles, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from unigrpo_jax import config_defaults, config_validation
from unigrpo_jax.trainers.metrics import read_metrics
from unigrpo_jax.data.pipeline import ShapeWorldSource
from unigrpo_jax.data.tokenizer import Tokenizer
from unigrpo_jax.trainers.evaluate import eval_records
from unigrpo_jax.trainers.build import objective_config, prompt_source, rollout_config
from unigrpo_jax.trainers.unigrpo import run_train
from unigrpo_jax.data.shapeworld.world import shapeworld_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(total_steps=4):
  c = config_defaults.base()
  c.model.preset = "tiny"
  c.tensorboard = False
  c.mesh.data = 2  # 4 rollout rows over 2 data shards; params split 4-way (tensor)
  c.mesh.tensor = 4
  c.async_checkpointing = False
  c.rollout.prompts_per_batch = 2
  c.rollout.group_size = 2
  c.rollout.max_reasoning_len = 6
  c.rollout.num_steps = 4
  c.rollout.window_range = (0, 3)
  c.rollout.window_size = 2
  c.optim.lr_und = 1e-3
  c.optim.lr_gen = 1e-3
  c.data.eval_tasks = 4
  c.eval.batch_size = 4
  c.eval.num_steps = 3
  c.eval.grid_rows = 1
  c.total_steps = total_steps
  c.eval_every = 2
  c.checkpoint_every = 1
  return c


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("four"))
  run_train(tiny_config(4), workdir)
  return workdir


def test_run_writes_metrics_checkpoint_and_samples(four_steps):
  rows = read_metrics(four_steps)
  assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
  first_train = rows[1]
  for key in ("train/reward_mean", "train/loss", "perf/step_time_s", "perf/num_compiles",
              "train/onpolicy/text_logp_maxdiff", "train/onpolicy/flow_logp_maxdiff",
              "train/grad_norm/und", "train/grad_norm/gen", "train/zero_variance_groups",
              "train/spread/image_share", "train/spread/text_var", "train/spread/image_var",
              "hack/saturation", "hack/blank_frac", "hack/hist_distance",
              "hack/strict_partial_gap"):
    assert key in first_train, key
  # The spread decomposition is exact: text + image = total within-group variance.
  assert abs(first_train["train/spread/text_var"] + first_train["train/spread/image_var"]
             - first_train["train/spread/total_var"]) < 1e-6
  assert first_train["hack/hist_distance"] == 0.0  # step 1 is the reference
  for key in ("eval/reward_mean", "eval/strict_accuracy", "eval/reasoning_accuracy"):
    assert key in rows[0] and key in rows[4], key
  assert any(k.startswith("eval/acc/") for k in rows[0])
  # The first PPO epoch is on-policy: the recomputed log-probs equal the rollout's.
  assert first_train["train/onpolicy/text_logp_maxdiff"] < 1e-3
  assert first_train["train/onpolicy/flow_logp_maxdiff"] < 1e-3
  assert os.path.exists(os.path.join(four_steps, "samples_step_000000.png"))
  assert os.path.exists(os.path.join(four_steps, "samples_step_000004.png"))
  steps = sorted(os.listdir(os.path.join(four_steps, "checkpoints")))
  assert "4" in steps


def test_no_recompilation_after_the_first_steps(four_steps):
  rows = read_metrics(four_steps)
  compiles = [r["perf/num_compiles"] for r in rows]
  # Row k is written before step k's checkpoint: row 2 holds step 1's save (orbax compiles its
  # transfer programs once), the step-2 evaluation and training. From then on: flat.
  assert compiles[2] == compiles[3] == compiles[4], compiles
  assert compiles[1] > compiles[0]  # the counter does count (rollout + train step compiled)


def test_resume_two_plus_two_equals_four(four_steps, tmp_path):
  workdir = str(tmp_path)
  run_train(tiny_config(2), workdir)
  run_train(tiny_config(4), workdir)  # same workdir: resumes from step 2
  resumed, straight = read_metrics(workdir), read_metrics(four_steps)
  assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
  skip = lambda k: k.startswith("perf/")  # wall-clock times differ
  for a, b in zip(resumed, straight):
    assert {k: v for k, v in a.items() if not skip(k)} == {
        k: v for k, v in b.items() if not skip(k)}, a["step"]


def _main(args, workdir):
  cmd = [sys.executable, "-m", "unigrpo_jax.main", "--config=configs/shapes_cpu.py",
         f"--workdir={workdir}", "--config.tensorboard=False", *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--config.init_checkpoint=/nonexistent/ckpt"], "does not exist"),
    (["--config.data.prompt_file=PROMPTS"], "glorbish"),
    (["--config.rollout.prompts_per_batch=2", "--config.rollout.group_size=3",
      "--config.optim.num_minibatches=4"],
     "num_minibatches"),
    (["--config.rollout.window_size=9"], "window_size"),
    # grad_accum must divide each minibatch: checked by the config, not inside the jitted step.
    (["--config.optim.num_minibatches=4", "--config.optim.grad_accum=3"], "optim.grad_accum"),
])
def test_bad_input_stops_before_training_and_keeps_the_workdir(tmp_path, args, message):
  keep = tmp_path / "metrics.jsonl"
  keep.write_text('{"step": 7}\n')
  prompts = tmp_path.parent / f"{tmp_path.name}_prompts.txt"
  prompts.write_text("a red circle\na glorbish square\n")
  result = _main([a.replace("PROMPTS", str(prompts)) for a in args], str(tmp_path))
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert keep.read_text() == '{"step": 7}\n'
  # Nothing but the log file (library logs and the error's traceback) is added.
  assert set(os.listdir(tmp_path)) - {"log.txt"} == {"metrics.jsonl"}


def test_unreadable_checkpoint_is_named(tmp_path):
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / "meta.json").write_text("{not json")
  c = tiny_config()
  c.init_checkpoint = str(ckpt)
  with pytest.raises(ValueError, match="cannot read"):
    run_train(c, str(tmp_path / "work"))


@pytest.mark.parametrize("content, message", [
    ("a red circle\n\na blue square\n", "line 2"),
    ("a red circle\na glorbish square\n", "glorbish"),
])
def test_bad_prompt_file_is_named(tmp_path, content, message):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text(content)
  c = tiny_config()
  c.data.prompt_file = str(prompts)
  with pytest.raises(ValueError, match=message):
    run_train(c, str(tmp_path / "work"))
  assert not (tmp_path / "work" / "checkpoints").exists()


def test_reward_that_raises_names_the_prompt(tmp_path):
  from unigrpo_jax.rewards import registry

  @registry.register("explodes_on_squares")
  def explodes(images, specs, reasoning_texts=None):
    if any(o.shape == "square" for s in specs for o in s.objects):
      raise RuntimeError("boom")
    return {"score": np.zeros(len(specs), np.float32)}

  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red square\n" * 4)
  c = tiny_config()
  c.rewards = {"explodes_on_squares": 1.0}
  c.data.prompt_file = str(prompts)
  from unigrpo_jax.trainers.scoring import RewardError
  with pytest.raises(RewardError, match="a red square"):
    run_train(c, str(tmp_path / "work"))


def test_unknown_reward_is_named(tmp_path):
  c = tiny_config()
  c.rewards = {"nope": 1.0}
  with pytest.raises(config_validation.ConfigError, match="unknown reward"):
    config_validation.validate(c)
  with pytest.raises(ValueError, match="unknown reward 'nope'"):
    run_train(c, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_config_validation_names_fields():
  c = tiny_config()
  c.rollout.group_size = 1
  with pytest.raises(config_validation.ConfigError, match="rollout.group_size"):
    config_validation.validate(c)
  c = tiny_config()
  c.objective.regularizer = "l2"
  with pytest.raises(config_validation.ConfigError, match="objective.regularizer"):
    config_validation.validate(c)
  c = tiny_config()
  c.advantage.estimator = "ppo"
  with pytest.raises(config_validation.ConfigError, match="advantage.estimator"):
    config_validation.validate(c)


def test_config_keys_that_did_nothing_or_failed_late():
  c = tiny_config()
  c.rollout.cfg_scale = 3.0  # training rollouts have no CFG: the key must not be a silent no-op
  with pytest.raises(config_validation.ConfigError, match="rollout.cfg_scale"):
    config_validation.validate(c)
  c = tiny_config()  # 4 rollout rows, 2 minibatches of 2: 3 micro-batches cannot divide them
  c.optim.num_minibatches, c.optim.grad_accum = 2, 3
  with pytest.raises(config_validation.ConfigError, match="optim.grad_accum"):
    config_validation.validate(c)
  c.optim.grad_accum = 2
  config_validation.validate(c)
  c = tiny_config()
  c.data.eval_prompt_file = "/nonexistent/eval.txt"
  with pytest.raises(config_validation.ConfigError, match="data.eval_prompt_file"):
    config_validation.validate(c)
  # window_per_group and the text knobs reach the rollout AND the objective.
  tok = shapeworld_tokenizer()
  c = tiny_config()
  c.rollout.window_per_group = True
  c.rollout.top_k, c.rollout.top_p, c.rollout.temperature = 7, 0.8, 0.9
  config_validation.validate(c)
  r, o = rollout_config(c, tok), objective_config(c, tok)
  assert r.window_per_group
  assert (r.temperature, r.top_k, r.top_p, r.vocab_limit) == (0.9, 7, 0.8, tok.vocab_size)
  assert (o.temperature, o.top_k, o.top_p, o.vocab_limit) == (0.9, 7, 0.8, tok.vocab_size)
  c.rollout.vocab_limit = 0  # the whole embedding table
  assert rollout_config(c, tok).vocab_limit == objective_config(c, tok).vocab_limit == 0


def _json_line(record):
  return json.dumps({"prompt": record["prompt"], "spec": json.loads(record["spec"])})


def test_eval_prompt_file_is_used_and_must_be_held_out(tmp_path):
  tok = shapeworld_tokenizer()
  train = tmp_path / "train.txt"
  train.write_text("a red circle\na blue square\n")
  held = tmp_path / "eval.txt"
  held.write_text("a green triangle\n")
  c = tiny_config()
  c.data.prompt_file, c.data.eval_prompt_file = str(train), str(held)
  records = eval_records(c, tok)
  assert [r["prompt"] for r in records] == ["a green triangle"]
  assert len(prompt_source(c, tok, records)) == 2
  # An evaluation prompt that is also a training prompt (up to case and spacing) is named.
  held.write_text("a green triangle\nA  Blue square\n")
  with pytest.raises(ValueError, match="'A  Blue square'.*also a training prompt"):
    prompt_source(c, tok, eval_records(c, tok))
  # Without an eval file the ShapeWorld test split is checked against the prompt file too.
  c.data.eval_prompt_file = ""
  test_record = ShapeWorldSource("test", c.data.eval_tasks)[1]
  train.write_text("a red circle\n" + _json_line(test_record) + "\n")
  with pytest.raises(ValueError, match="ShapeWorld test split"):
    run_train(c, str(tmp_path / "work"))  # before any compile or file is written
  assert not (tmp_path / "work").exists()


def test_optim_eps_reaches_the_optimizer_config():
  """config.optim.eps is Adam's epsilon (it used to be unreachable from a config)."""
  from unigrpo_jax import config_defaults
  from unigrpo_jax.trainers.build import optim_config
  c = config_defaults.base()
  c.optim.eps = 1e-3
  assert optim_config(c).eps == 1e-3


def test_weighted_reward_sum_logs_each_component(tmp_path, four_steps):
  """A hackable sum (ShapeWorld + JPEG size) logs each reward unweighted, and they add up to the
  logged reward with the config's weights; a single reward logs no components."""
  c = tiny_config(1)
  c.rewards.jpeg_compressibility = 0.5
  run_train(c, str(tmp_path))
  step = [r for r in read_metrics(str(tmp_path)) if "train/reward_mean" in r][0]
  sw, jpeg = (step["train/reward_component/shapeworld"],
              step["train/reward_component/jpeg_compressibility"])
  assert jpeg < 0  # negative kB
  assert step["train/reward_mean"] == pytest.approx(sw + 0.5 * jpeg, abs=1e-5)
  single = [r for r in read_metrics(four_steps) if "train/reward_mean" in r][0]
  assert not any(k.startswith("train/reward_component/") for k in single)
