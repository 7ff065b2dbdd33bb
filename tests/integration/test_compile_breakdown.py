"""benchmarks/compile_breakdown.py: the model pass of each HLO instruction, and the kernel times
read from an LLO dump (a dump written here in libtpu's file layout; nothing is timed)."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent.parent))
from benchmarks import compile_breakdown as cb  # noqa: E402


def _nested_remat_grad_hlo() -> str:
  """The optimized HLO (CPU) of the train step's shape: a forward without gradient (the
  behaviour pass), then a loss and its gradient through a scan over blocks whose body is
  checkpointed and runs a scan of checkpointed layers."""
  def layer(h, w):
    return jnp.tanh(h @ w), None

  def block(ws, x):
    return jax.lax.scan(jax.checkpoint(layer), x, ws)[0]

  def loss(ws, xs):
    def one(carry, x):
      return carry + jnp.sum(block(ws, x) ** 2), None
    return jax.lax.scan(jax.checkpoint(one), 0.0, xs)[0]

  def step(ws, xs):
    behaviour = loss(ws, xs + 1.0)  # other inputs: XLA must not merge it with the forward below
    value, grad = jax.value_and_grad(loss)(ws, xs)
    return behaviour, value, grad

  ws, xs = jnp.ones((3, 8, 8)) * 0.1, jnp.ones((2, 4, 8))
  return jax.jit(step).lower(ws, xs).compile().as_text()


def test_every_pass_of_a_nested_remat_gradient_is_named():
  names = cb.op_names(_nested_remat_grad_hlo())
  phases = {cb.phase_of(op) for op in names.values()}
  assert set(cb.PHASES) <= phases, sorted(phases)


def test_phase_of_real_name_stacks():
  stack = "jit(train_step)/while/body/closed_call/"
  assert cb.phase_of(stack + "checkpoint/while/body/closed_call/checkpoint/dot_general") == \
      "forward without gradient"
  assert cb.phase_of(stack + "transpose(jvp())/while/body/closed_call/checkpoint/"
                     "rematted_computation/dot_general") == "rematerialised forward"
  assert cb.phase_of(stack + "transpose(jvp())/while/body/dot_general") == "backward"
  assert cb.phase_of(stack + "jvp()/while/body/closed_call/checkpoint/dot_general") == \
      "forward with gradient"
  assert cb.phase_of("jit(rollout)/while/body/dot_general") == "other"


def _touch(path, mtime):
  path.write_text("")
  os.utime(path, (mtime, mtime))


def test_kernels_read_from_a_dump(tmp_path):
  """A kernel's seconds: its final_bundles files' last modification minus the start (ns) that
  libtpu writes in their names."""
  hlo = ('  %fusion.7 = bf16[8]{0} fusion(%p), kind=kOutput, calls=%f, metadata={op_name='
         '"jit(f)/transpose(jvp())/dot_general"}\n'
         '  ROOT %add.3 = f32[8]{0} add(%a, %b), metadata={op_name="jit(f)/checkpoint/add"}\n')
  _touch(tmp_path / "1000000000000-fusion.7-00-schedule-analysis_final_bundles.txt", 1003.0)
  _touch(tmp_path / "1000000000000-fusion.7-01-final_bundles.txt", 1003.5)
  _touch(tmp_path / "1001000000000-add.3-01-final_bundles.txt", 1001.5)
  _touch(tmp_path / "990000000000-TLP-01-final_bundles.txt", 1010.0)   # whole-program span
  _touch(tmp_path / "1000000000000-fusion.7-00-original.txt", 1009.0)  # another pass: ignored
  found = cb.kernels(str(tmp_path), hlo)
  assert found == [cb.Kernel("fusion.7", "backward", "dot_general", 3.5),
                   cb.Kernel("add.3", "forward without gradient", "add", 0.5)]
  text = cb.format_breakdown(found, "test")
  assert "2 kernels, 4.0 s" in text
  assert "| backward | 1 | 3.5 | 87.5 % |" in text
  assert "| forward without gradient | 1 | 0.5 | 12.5 % |" in text
  assert "| dot_general | 1 | 3.5 | 87.5 % |" in text
  assert "| `fusion.7` | backward | dot_general | 3.50 |" in text


def test_breaks_down_a_real_tpu_compile(tmp_path):
  """End to end on libtpu: the tiny model's train step for v5e-8, every phase of its gradient
  found in the dump, the dump kept where asked."""
  from unigrpo_jax.aot import topology
  try:
    topology.devices(topology.parse("v5e-8"))
  except RuntimeError as e:
    pytest.skip(f"libtpu cannot load: {e}")
  config = tmp_path / "tiny.py"
  config.write_text(
      "from unigrpo_jax import config_defaults\n\n\n"
      "def get_config():\n"
      "  c = config_defaults.base()\n"
      "  c.model.preset = 'tiny'\n"
      "  c.mesh.data, c.mesh.fsdp = 1, -1\n"
      "  c.data.max_prompt_len = 24\n"
      "  c.rollout.prompts_per_batch, c.rollout.group_size = 4, 2\n"
      "  c.rollout.max_reasoning_len, c.rollout.num_steps = 8, 6\n"
      "  return c\n")
  dump, out = tmp_path / "dump", tmp_path / "breakdown.md"
  root = pathlib.Path(__file__).resolve().parent.parent.parent
  proc = subprocess.run(
      [sys.executable, str(root / "benchmarks" / "compile_breakdown.py"), f"--config={config}",
       "--topology=v5e-8", "--program=train_step", f"--keep_dump={dump}", f"--out={out}"],
      capture_output=True, text=True, timeout=600, cwd=root,
      env={**os.environ, "PYTHONPATH": str(root)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = out.read_text()
  assert text.startswith("## train_step on v5e-8")
  for phase in ("backward", "forward with gradient", "dot_general"):
    assert f"| {phase} |" in text, text
  assert any(name.endswith("final_bundles.txt") for name in os.listdir(dump))
