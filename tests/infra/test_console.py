"""The console shows progress, evaluation summaries and errors; library chatter goes to log.txt.

In-process: a real orbax checkpoint save (its INFO option dumps are the noise users saw), a native
write to fd 2 (XLA / libtpu / TensorFlow start-up lines), a warning and a progress print. The
subprocess test runs the real entry point on the tiny model (slow: it compiles a whole run).
"""
import logging
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from unigrpo_jax import checkpointing, console

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ORBAX_INFO = "CheckpointManager"  # appears in orbax's INFO lines on every manager creation


def _noisy_run(workdir):
  ckpt = checkpointing.RunCheckpointer(workdir, keep=1, async_save=False)
  ckpt.save(1, {"00000": jnp.ones(3)}, {"step": 1}, force=True)
  ckpt.close()
  os.write(2, b"I0000 native start-up chatter\n")
  logging.warning("a library warning")
  print("step 1/1 | progress", flush=True)


def test_library_info_goes_to_the_log_file(tmp_path, capfd):
  with console.route_logs(str(tmp_path)) as path:
    _noisy_run(str(tmp_path))
  out, err = capfd.readouterr()
  assert "step 1/1 | progress" in out
  assert "a library warning" in err
  assert ORBAX_INFO not in out + err and "native start-up chatter" not in out + err, err
  log = open(path).read()
  assert path == os.path.join(str(tmp_path), "log.txt")
  assert ORBAX_INFO in log and "native start-up chatter" in log and "a library warning" in log
  # Everything is restored: fd 2 reaches the console again.
  os.write(2, b"after\n")
  assert "after" in capfd.readouterr().err


def test_verbose_logs_show_everything(tmp_path, capfd):
  with console.route_logs(str(tmp_path), verbose=True) as path:
    _noisy_run(str(tmp_path))
  err = capfd.readouterr().err
  assert ORBAX_INFO in err and "native start-up chatter" in err
  assert ORBAX_INFO in open(path).read()


def test_an_exception_is_logged_and_raised(tmp_path):
  with pytest.raises(RuntimeError, match="boom"):
    with console.route_logs(str(tmp_path)) as path:
      raise RuntimeError("boom")
  assert "RuntimeError: boom" in open(path).read()


TINY = """
from unigrpo_jax import config_defaults

def get_config():
  c = config_defaults.base()
  c.model.preset = "tiny"
  c.rollout.prompts_per_batch = 2
  c.rollout.group_size = 2
  c.rollout.max_reasoning_len = 4
  c.rollout.num_steps = 3
  c.rollout.window_range = (0, 2)
  c.rollout.window_size = 1
  c.data.eval_tasks = 2
  c.data.train_tasks = 50
  c.eval.batch_size = 2
  c.eval.num_steps = 2
  c.eval.grid_rows = 1
  c.total_steps = 1
  c.checkpoint_every = 1
  return c
"""


@pytest.mark.slow
def test_console_of_a_tiny_run(tmp_path):
  cfg = tmp_path / "tiny.py"
  cfg.write_text(TINY)
  workdir = tmp_path / "work"
  env = dict(os.environ, PYTHONPATH=REPO)
  # As a user runs it: one CPU device, and JAX probes every backend it knows (where libtpu is
  # installed, that probing is what prints native TPU start-up errors).
  for var in ("XLA_FLAGS", "JAX_PLATFORMS"):
    env.pop(var, None)
  result = subprocess.run([sys.executable, "-m", "unigrpo_jax.main", f"--config={cfg}",
                           f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = (result.stdout + result.stderr).splitlines()
  assert lines and all(l.startswith(("step ", "eval @ step ")) for l in lines), lines[:20]
  assert any(l.startswith("step 1/1") for l in lines)
  assert sum(l.startswith("eval @ step ") for l in lines) == 2  # steps 0 and 1
  log = (workdir / "log.txt").read_text()
  assert ORBAX_INFO in log and "Saving checkpoint" in log
