"""Entry point: ``python -m unigrpo_jax.main --config=configs/shapes_cpu.py --workdir=DIR``.

Flags: ``--config`` (a configs/*.py file; override keys with ``--config.key=value``) and
``--workdir``. ``config.mode`` picks the job: train (UniGRPO), sft, eval or sample.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, samples, checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from unigrpo_jax import config_validation
  from unigrpo_jax.trainers import run

  config = _CONFIG.value
  try:
    config_validation.validate(config)
  except config_validation.ConfigError as e:
    sys.exit(f"error: bad config: {e}")
  from unigrpo_jax import distributed
  try:  # before anything touches a device: connects the processes of a multi-host run
    distributed.initialize(distributed.DistributedConfig.from_config(config.distributed))
  except distributed.DistributedError as e:
    sys.exit(f"error: {e}")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  try:
    run.run(config, _WORKDIR.value)
  except (ValueError, RuntimeError) as e:
    # Bad input (checkpoint, prompt file, rewards) and stopped runs: one clear line, exit 1.
    # Anything else keeps its traceback.
    sys.exit(f"error: {type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main)
