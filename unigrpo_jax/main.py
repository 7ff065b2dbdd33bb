"""Entry point: ``python -m unigrpo_jax.main --config=configs/shapes_cpu.py --workdir=DIR``.

Flags: ``--config`` (a configs/*.py file; override keys with ``--config.key=value``) and
``--workdir``. ``config.mode`` picks the job: train (UniGRPO), sft, eval or sample.
The console shows progress, evaluation summaries, warnings and errors; library INFO logs go to
``<workdir>/log.txt`` (``--config.verbose_logs=True`` shows them on the console too).
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, samples, checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


_REWARD_FLAG = re.compile(r"^--config\.rewards\.([^=.]+)(?:=(.*))?$")


def split_reward_flags(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """Takes ``--config.rewards.NAME=W`` (or ``--config.rewards.NAME W``) out of argv.

  config_flags can only override keys the config file already has, so naming a new reward on
  the command line would die in the locked ConfigDict; these flags are applied after loading
  instead (``apply_reward_flags``), for any name, and validated with the rest of the config.
  """
  rest, weights, i = [], {}, 0
  while i < len(argv):
    m = _REWARD_FLAG.match(argv[i])
    if m and m.group(2) is None and i + 1 < len(argv):
      weights[m.group(1)] = argv[i + 1]
      i += 2
      continue
    if m and m.group(2) is not None:
      weights[m.group(1)] = m.group(2)
    else:
      rest.append(argv[i])
    i += 1
  return rest, weights


def apply_reward_flags(config, weights: dict[str, str]) -> None:
  """Sets config.rewards[NAME] = float(W); a weight that is not a number is one error line."""
  for name, text in weights.items():
    try:
      w = float(text)
    except ValueError:
      sys.exit(f"error: bad config: config.rewards.{name}: weight {text!r} is not a number")
    with config.rewards.unlocked():
      config.rewards[name] = w


_REWARD_WEIGHTS: dict[str, str] = {}


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from unigrpo_jax import config_validation, console
  from unigrpo_jax.trainers import run

  config = _CONFIG.value
  apply_reward_flags(config, _REWARD_WEIGHTS)
  try:
    config_validation.validate(config)
  except config_validation.ConfigError as e:
    sys.exit(f"error: bad config: {e}")
  from unigrpo_jax import distributed
  try:  # before anything touches a device: connects the processes of a multi-host run
    distributed.initialize(distributed.DistributedConfig.from_config(config.distributed))
  except distributed.DistributedError as e:
    sys.exit(f"error: {e}")
  from unigrpo_jax import paths
  try:  # creates the workdir (local or gs://) and proves it writable, before anything compiles
    import jax
    paths.check_writable(_WORKDIR.value, tag=f".{jax.process_index()}")
  except paths.PathError as e:
    sys.exit(f"error: {e}")
  try:
    with console.route_logs(_WORKDIR.value, verbose=config.verbose_logs,
                            process_index=jax.process_index()):
      run.run(config, _WORKDIR.value)
  except (ValueError, RuntimeError) as e:
    # Bad input (checkpoint, prompt file, rewards) and stopped runs: one clear line, exit 1.
    # Anything else keeps its traceback.
    sys.exit(f"error: {type(e).__name__}: {e}")


if __name__ == "__main__":
  sys.argv, _REWARD_WEIGHTS = split_reward_flags(sys.argv)
  app.run(main)
