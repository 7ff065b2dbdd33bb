"""launch/summarize_hacking.py: the Fig. 5 table's numbers from synthetic metrics files."""
import importlib.util
import json
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "launch", "summarize_hacking.py")
_spec = importlib.util.spec_from_file_location("summarize_hacking", _PATH)
summarize_hacking = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize_hacking)


def _write_run(path, steps, jpeg_slope, saturation_slope):
  """A run whose per-step metrics are linear in the step, evaluated at 0 and at the end."""
  os.makedirs(path)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for step in range(steps + 1):
      if step % (steps // 2) == 0:
        f.write(json.dumps({"step": step, "eval/reward_mean": 0.5 - 0.001 * step,
                            "eval/strict_accuracy": 0.3}) + "\n")
      if step:
        jpeg = -1.5 + jpeg_slope * step
        f.write(json.dumps({"step": step, "train/reward_mean": 0.4 + jpeg,
                            summarize_hacking.JPEG: jpeg, summarize_hacking.SHAPES: 0.4,
                            "hack/saturation": 0.8 + saturation_slope * step,
                            "hack/blank_frac": 0.0}) + "\n")


def test_table_has_first_and_last_window_means_over_seeds(tmp_path):
  for seed, slope in enumerate((0.01, 0.03)):
    _write_run(str(tmp_path / "none" / f"seed{seed}"), 40, slope, 0.002)
  _write_run(str(tmp_path / "velocity_mse" / "seed0"), 40, 0.0, 0.0)
  summarize_hacking.main(str(tmp_path))
  table = (tmp_path / "table.md").read_text()
  rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
  assert list(rows)[1:] == ["velocity_mse", "none"]  # the fixed order, header first
  # JPEG of the last 10 steps (31..40): -1.5 + slope * 35.5 -> seeds -1.145 and -0.435
  last = np.array([-1.5 + 0.01 * 35.5, -1.5 + 0.03 * 35.5])
  assert f"{last.mean():.3f} ± {np.std(last, ddof=1):.3f}" in rows["none"]
  assert "-1.500 -> -1.500 ± 0.000" in rows["velocity_mse"]  # flat JPEG, one seed
  assert "0.500 -> 0.460 ± 0.000" in rows["none"]  # held-out reward, step 0 -> 40


def test_unfinished_runs_are_skipped_and_none_finished_is_an_error(tmp_path):
  os.makedirs(tmp_path / "none" / "seed0")
  (tmp_path / "none" / "seed0" / "metrics.jsonl").write_text(
      json.dumps({"step": 0, "eval/reward_mean": 0.5, "eval/strict_accuracy": 0.3}) + "\n")
  with pytest.raises(SystemExit, match="no finished runs"):
    summarize_hacking.main(str(tmp_path))
