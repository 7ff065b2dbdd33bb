"""Evaluation in a 2-process run scores each image once, on the process that owns its row
(trainers/evaluate.py ``score_by_owner``), and both processes get the same metrics: a remote
reward gets each eval image once, not once per process. Two real ``python -m unigrpo_jax.main``
processes (gloo, 4 CPU devices each) as in test_multihost.py; the reward logs what it scores.
"""
import json
import os
import subprocess
import sys

import portpicker
import pytest

from unigrpo_jax.trainers.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import multihost_eval_config as cfg  # noqa: E402


@pytest.mark.slow
def test_two_processes_score_each_eval_image_once(tmp_path):
  scored, workdir = tmp_path / "scored", tmp_path / "work"
  scored.mkdir()
  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", UNIGRPO_SCORED_DIR=str(scored),
             PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests"), HERE]),
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "unigrpo_jax.main",
       "--config=tests/integration/multihost_eval_config.py", f"--workdir={workdir}",
       f"--config.distributed.coordinator_address=localhost:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]

  calls = [json.loads(line) for i in range(2)
           for line in (scored / f"scored_{i}.jsonl").read_text().splitlines()]
  evals = set(cfg.EVAL_PROMPTS)
  by_process = {0: [], 1: []}
  for c in calls:
    by_process[c["process"]] += [p for p in c["prompts"] if p in evals]
  # Two evaluations (steps 0 and 1), each scoring every eval image exactly once over both
  # processes: process 0 owns the first half of the rows, process 1 the second.
  half = len(cfg.EVAL_PROMPTS) // 2
  assert sorted(by_process[0]) == sorted(cfg.EVAL_PROMPTS[:half] * 2), by_process
  assert sorted(by_process[1]) == sorted(cfg.EVAL_PROMPTS[half:] * 2), by_process
  # Every process ended with every row's score: the metrics (written by process 0) are those
  # of all six prompts, and process 1 printed no error.
  rows = read_metrics(str(workdir))
  expected = sum(cfg.prompt_reward(p) for p in cfg.EVAL_PROMPTS) / len(cfg.EVAL_PROMPTS)
  for row in (rows[0], rows[-1]):
    assert abs(row["eval/reward_mean"] - expected) < 1e-6, row
  assert [r["step"] for r in rows] == [0, 1]
