"""``unigrpo_jax.aot``: the trainer's programs compile for TPU slices from this CPU machine.

Needs libtpu (``pip install -e ".[tpu]"``, installed by .ci/run). Where it cannot load, the
compile tests SKIP with the reason (never pass silently); the name checks run anyway.
"""
import os
import subprocess
import sys

import pytest

from unigrpo_jax import config_defaults
from unigrpo_jax.aot import comm, plan, topology
from unigrpo_jax.aot.topology import Chip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**rollout):
  c = config_defaults.base()
  c.model.preset = "tiny"
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.data.max_prompt_len = 24
  c.rollout.prompts_per_batch = 4
  c.rollout.group_size = 2
  c.rollout.max_reasoning_len = 8
  c.rollout.num_steps = 6
  c.rollout.update(rollout)
  return c


@pytest.fixture(scope="module")
def libtpu():
  try:
    topology.devices(topology.parse("v5e-8"))
  except RuntimeError as e:
    pytest.skip(f"libtpu cannot load, TPU AOT tests skipped: {e}")


@pytest.fixture(scope="module")
def v5e8_report(libtpu):
  return plan.plan(tiny_config(), "v5e-8", log=lambda m: None)


def test_names_map_to_slices():
  v5p = topology.parse("v5p-128")  # names count TensorCores: two per v5p chip
  assert (v5p.num_chips, v5p.topology_name, v5p.wrap) == (64, "v5:4x4x4", (True,) * 3)
  assert topology.parse("v4-8").num_chips == 4
  lite = topology.parse("v5litepod-16")  # v5e names count chips
  assert (lite.num_chips, lite.topology_name, lite.chip.generation) == (16, "v5e:4x4", "v5e")
  assert topology.parse("v6e-256").topology_name == "v6e:16x16"


@pytest.mark.parametrize("name", ["v7-8", "v5p-7", "v5e-12", "v5p", "tpu"])
def test_unknown_topology_lists_known(name):
  with pytest.raises(ValueError, match=r"unknown topology .*known: v4-8, .*v5p-128.*v6e-256"):
    topology.parse(name)


def test_tiny_programs_compile_and_fit_v5e_8(v5e8_report):
  r = v5e8_report
  assert (r["topology"], r["num_chips"], r["mesh"]["fsdp"]) == ("v5e-8", 8, 8)
  assert r["hbm_bytes_per_chip"] == topology.CHIPS["v5e"].hbm_bytes
  assert r["params"] > 100_000
  assert set(r["programs"]) == {"rollout", "train_step"}
  for p in r["programs"].values():
    m = p["bytes_per_chip"]
    assert p["fits"] and 0 < m["total"] < 1e8
    assert m["total"] >= m["arguments"] + m["outputs"] + m["temporaries"] - m["aliased"]
    assert p["flops"] > 0 and p["xla_flops_per_chip"] > 0 and 0 < p["lower_s"] <= p["compile_s"]
    assert p["roofline_s"] > 0
  # The programs compile side by side: the wall time covers each one's, not their sum.
  assert max(p["compile_s"] for p in r["programs"].values()) <= r["compile_wall_s"]
  # The train state is donated: its buffers are reused by the new state.
  assert r["programs"]["train_step"]["bytes_per_chip"]["aliased"] > 0
  assert r["fits"]


def test_report_has_time_model_and_communication(v5e8_report):
  """Each program gets compute / HBM / ICI seconds and which binds, collectives per call by kind
  and per loop; the rollout's decode loop is counted over all T reasoning steps."""
  r = v5e8_report
  for p in r["programs"].values():
    t = p["time_model"]
    assert t["bound_s"] == max(t["compute_s"], t["hbm_s"], t["ici_s"]) > 0
    assert t["binds"] in ("compute", "hbm", "ici") and t["ici_s"] > 0
    assert p["comm"]["per_call_total"] > 0 and p["comm"]["loops"]
    assert set(p["comm"]["per_call_bytes"]) == set(comm.KINDS)
  d = r["programs"]["rollout"]["decode_step"]
  assert d["steps"] == 8 and d["collective_bytes_total"] > 0 and d["time"]["bound_s"] > 0
  assert r["step_bound_s"] == pytest.approx(sum(p["time_model"]["bound_s"]
                                                for p in r["programs"].values()))
  text = plan.format_report(r)
  assert "decode step (8 steps)" in text and "lower bound per UniGRPO step" in text


def test_fsdp_doubling_chips_halves_argument_bytes(libtpu, v5e8_report):
  """Params, both Adam moments, the reference and the batch are all split over fsdp."""
  r4 = plan.plan(tiny_config(), "v5e-4", programs=("train_step",), log=lambda m: None)
  a4 = r4["programs"]["train_step"]["bytes_per_chip"]["arguments"]
  a8 = v5e8_report["programs"]["train_step"]["bytes_per_chip"]["arguments"]
  assert 1.7 < a4 / a8 <= 2.0, (a4, a8)


def test_not_fitting_reports_by_how_much_and_largest_buffers(libtpu, monkeypatch):
  monkeypatch.setitem(topology.CHIPS, "v5e", Chip("v5e", 100_000, 197e12, 819e9))
  r = plan.plan(tiny_config(), "v5e-8", programs=("rollout",), log=lambda m: None)
  p = r["programs"]["rollout"]
  assert not p["fits"] and not r["fits"]
  assert p["over_by_bytes"] == p["bytes_per_chip"]["total"] - 100_000
  assert p["largest_temporaries"] and p["largest_temporaries"][0]["bytes"] > 0
  assert p["largest_arguments"][0]["bytes"] >= p["largest_arguments"][-1]["bytes"]
  assert "does NOT fit" in plan.format_report(r)


def _fails_before_compiling(config, match):
  logged = []
  with pytest.raises(ValueError, match=match):
    plan.plan(config, "v5e-8", log=logged.append)
  assert not any("compiling" in m for m in logged)


def test_mesh_not_dividing_slice_fails_before_compile(libtpu):
  c = tiny_config()
  c.mesh.fsdp = 3
  _fails_before_compiling(c, r"mesh \(data=1, fsdp=3, tensor=1\) has 3 slots but there are 8")


def test_batch_the_mesh_cannot_split_fails_before_compile(libtpu):
  _fails_before_compiling(tiny_config(prompts_per_batch=3),
                          r"prompts_per_batch \* group_size = 6 is not a multiple of the mesh's "
                          r"batch parallelism 8")


def test_cli_unknown_topology_exit_2():
  out = subprocess.run([sys.executable, "-m", "unigrpo_jax.aot",
                        "--config=configs/shapes_cpu.py", "--topology=v9-64"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
  assert out.returncode == 2, out.stderr[-2000:]
  assert "unknown topology 'v9-64'; known: v4-8" in out.stderr


def test_rollout_rows_are_split_over_chips(libtpu, monkeypatch):
  """The trainer's rollout computes each row on one chip: without the mesh (the old wiring) XLA
  kept every row on every chip and the per-chip peak was several times larger."""
  c = tiny_config(prompts_per_batch=8, group_size=8)
  c.model.attention_impl = "chunked"  # splash needs the mesh (a shard_map) that this test drops
  peak = lambda: plan.plan(c, "v5e-8", programs=("rollout",), log=lambda m: None)[
      "programs"]["rollout"]["bytes_per_chip"]["total"]
  split = peak()
  from unigrpo_jax.trainers import build
  make = build.make_rollout
  monkeypatch.setattr(build, "make_rollout", lambda *a, mesh=None, **k: make(*a, **k))
  assert peak() > 3 * split


def test_compiler_oom_message_is_parsed():
  from unigrpo_jax.aot import memory
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (15.79G) exceeds available HBM (15.75G).")  # libtpu 0.0.42.1, v5e-1
  assert memory.is_oom(RuntimeError(msg))
  assert memory.parse_oom(msg) == {"required": int(15.79 * 2**30),
                                   "available": int(15.75 * 2**30)}
  assert memory.parse_oom("INTERNAL: something else") == {"required": None, "available": None}


def test_scanned_remat_splash_programs_compile_and_fit(libtpu):
  """The pod configs' model settings (layer scan, remat, splash attention resolved for the TPU
  target although this process runs on a CPU) compile for a slice, both programs."""
  c = tiny_config()
  c.model.scan_layers, c.model.remat, c.model.dtype = True, True, "bfloat16"
  r = plan.plan(c, "v5e-8", log=lambda m: None)
  assert r["model"]["attention_impl"] == "splash" and r["model"]["scan_layers"]
  assert r["fits"] and set(r["programs"]) == {"rollout", "train_step"}
