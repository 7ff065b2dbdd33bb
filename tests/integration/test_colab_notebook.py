"""launch/colab_tpu.ipynb: valid, free of shell magics, and (slow) executed end to end on CPU."""
import ast
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(REPO, "launch", "colab_tpu.ipynb")


def code_cells() -> list[str]:
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_cells_are_plain_python():
  """Every code cell parses as Python (no `!`/`%` magics), so it runs in any kernel or script."""
  cells = code_cells()
  assert len(cells) >= 5
  for i, src in enumerate(cells):
    ast.parse(src, filename=f"cell {i}")
  joined = "\n".join(cells)
  for needed in ("unigrpo_jax.main", "unigrpo_jax.aot", "samples_step_", "metrics.jsonl"):
    assert needed in joined, needed


@pytest.mark.slow
def test_notebook_runs_end_to_end_on_cpu(tmp_path):
  """The notebook's code cells, in order, as one script (what a kernel would run), in smoke
  mode: the ShapeWorld run, its sample grid and metrics, and the AOT planner (libtpu)."""
  script = tmp_path / "notebook.py"
  script.write_text("\n\n".join(code_cells()))
  workdir = tmp_path / "run"
  env = dict(os.environ, UNIGRPO_NOTEBOOK_SMOKE="1", UNIGRPO_NOTEBOOK_WORKDIR=str(workdir),
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  p = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=1500)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert any(f.startswith("samples_step_") for f in os.listdir(workdir))
  plan = json.loads((workdir / "plan_v5e-8.json").read_text())
  assert plan["programs"]["rollout"]["fits"] and plan["programs"]["train_step"]["fits"]
  assert "eval reward" in p.stdout and "fits: True" in p.stdout
