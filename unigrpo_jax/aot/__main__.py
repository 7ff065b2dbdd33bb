"""``python -m unigrpo_jax.aot --config=CONFIG --topology=NAME [--out=report.json]``.

Compiles the config's rollout and train step for the TPU slice NAME (e.g. ``v5p-128``,
``v4-64``, ``v5e-16``, ``v6e-64``) on this machine (no TPU needed; libtpu from
``pip install -e ".[tpu]"``) and prints bytes per chip against the chip's usable HBM, FLOPs,
collective bytes per chip (per call and per loop), a compute / HBM / ICI time model per call
and per loop iteration, and compile times. Exit 0 when both programs fit, 1 when one does not,
2 on bad input (config, topology, mesh or batch that does not divide the slice, no libtpu).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Cloud TPU accelerator type, e.g. v5p-128.")
_OUT = flags.DEFINE_string("out", None, "Write the JSON report here.")
_PROGRAMS = flags.DEFINE_list("programs", ["rollout", "train_step"], "Programs to compile.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from unigrpo_jax.aot import plan

  try:
    report = plan.plan(_CONFIG.value, _TOPOLOGY.value, _PROGRAMS.value,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
  except (ValueError, RuntimeError) as e:  # bad input or no libtpu: one line, before compiling
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(plan.format_report(report))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=1)
  sys.exit(0 if report["fits"] else 1)


if __name__ == "__main__":
  app.run(main)
