"""Where a TPU program's XLA compile time goes: per kernel, grouped by the pass of the model.

    python benchmarks/compile_breakdown.py --config=configs/bagel_lora_1host.py \
        --topology=v6e-8 --program=train_step [--out=report.md] [--keep_dump=DIR]

Compiles ONE program of ``python -m unigrpo_jax.aot``'s plan (no TPU needed, libtpu installed)
with libtpu's LLO dump on for one pass: ``final_bundles``, the last of a kernel's low-level code
generation. libtpu names each kernel's dump files after the wall-clock nanosecond at which the
kernel's code generation began; the file's modification time is when it ended. libtpu runs
kernels on a thread pool, so the spans overlap and add up to more than the wall time, and the
dump itself costs time. Read the shares, not the seconds.

Each kernel is named in the optimized HLO, whose ``op_name`` metadata says which pass of the
model it came from: ``forward with gradient`` (under ``jvp``: the forward whose residuals the
backward reads), ``rematerialised forward`` (a checkpoint's recomputation in the backward),
``backward`` (``transpose(jvp(...))``), ``forward without gradient`` (the model's checkpointed
layers run outside differentiation: e.g. the behaviour log-probs at the start of a train step;
libtpu compiles a kernel once per distinct fusion, so a reference forward whose fusions are the
same shows up here too) and ``other`` (the rest: the optimizer, the loss's elementwise tail).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
import shutil
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `python benchmarks/compile_breakdown.py` puts benchmarks/ first
  sys.path.insert(0, _ROOT)

# `<start ns>-<kernel>-<pass number>-<pass label>.txt`; TLP and <late-...> are whole-program spans.
_DUMP_FILE = re.compile(r"^(\d+)-(.+)-\d+-(?:[\w-]*_)?final_bundles\.txt$")
_OP_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s[^\n]*?op_name=\"([^\"]*)\"", re.M)
PHASES = ("backward", "rematerialised forward", "forward with gradient",
          "forward without gradient", "other")


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One kernel's code generation: its HLO name, the model pass it belongs to, the JAX operation
  it was named after (the last part of its op_name, e.g. ``dot_general``), seconds."""
  name: str
  phase: str
  op: str
  seconds: float


def phase_of(op_name: str) -> str:
  """JAX's name stack of an HLO instruction -> the pass of the model it belongs to."""
  if "rematted_computation" in op_name:
    return "rematerialised forward"
  if "transpose(jvp" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward with gradient"
  if "checkpoint" in op_name:
    return "forward without gradient"
  return "other"


def op_names(hlo_text: str) -> dict[str, str]:
  """Optimized HLO text -> {instruction name: its op_name metadata}."""
  return {m.group(1): m.group(2) for m in _OP_NAME.finditer(hlo_text)}


def kernels(dump_dir: str, hlo_text: str) -> list[Kernel]:
  """The kernels of an LLO dump (``*final_bundles`` files), longest first.

  A kernel's seconds: the last modification time of its ``final_bundles`` files minus the start
  in their name. The whole-program spans (``TLP``, ``<late-...>``), which overlap every kernel,
  are left out.
  """
  start, end = {}, {}
  for entry in os.scandir(dump_dir):
    m = _DUMP_FILE.match(entry.name)
    if not m or m.group(2) == "TLP" or m.group(2).startswith("<"):
      continue
    key = (m.group(1), m.group(2))
    start[key] = int(m.group(1)) / 1e9
    end[key] = max(end.get(key, 0.0), entry.stat().st_mtime)
  names = op_names(hlo_text)
  out = []
  for key, finished in end.items():
    name = key[1]
    op_name = names.get(name, "")  # "" for a kernel without metadata: phase "other", op "?"
    out.append(Kernel(name, phase_of(op_name), op_name.rsplit("/", 1)[-1] or "?",
                      max(0.0, finished - start[key])))
  return sorted(out, key=lambda k: -k.seconds)


def _table(found: list[Kernel], field: str, total: float, rows=None) -> list[str]:
  """Markdown rows ``| value | kernels | seconds | share |`` of ``field``: the given ``rows`` in
  their order (those with kernels), or else the 8 values with the most seconds."""
  secs, count = collections.Counter(), collections.Counter()
  for k in found:
    secs[getattr(k, field)] += k.seconds
    count[getattr(k, field)] += 1
  keys = [r for r in rows if count[r]] if rows else [r for r, _ in secs.most_common(8)]
  return [f"| {r} | {count[r]} | {secs[r]:.1f} | {100 * secs[r] / total:.1f} % |" for r in keys]


def format_breakdown(found: list[Kernel], title: str, top: int = 10) -> str:
  """Markdown: seconds and kernels per phase, per operation (the 8 costliest), then the ``top``
  longest kernels."""
  total = sum(k.seconds for k in found) or 1.0
  lines = [f"## {title}", "", f"{len(found)} kernels, {total:.1f} s of code generation "
           "(overlapping spans on the compile's thread pool).", "",
           "| phase | kernels | seconds | share |", "|---|---|---|---|"]
  lines += _table(found, "phase", total, PHASES)
  lines += ["", "| operation | kernels | seconds | share |", "|---|---|---|---|"]
  lines += _table(found, "op", total)
  lines += ["", "| longest kernels | phase | operation | seconds |", "|---|---|---|---|"]
  lines += [f"| `{k.name}` | {k.phase} | {k.op} | {k.seconds:.2f} |" for k in found[:top]]
  return "\n".join(lines) + "\n"


def _compile_and_break_down(config, topology: str, program: str, dump_dir: str) -> str:
  """Compile ``program`` of the plan with the LLO dump into ``dump_dir``; the markdown report."""
  # libtpu reads its flags once, when jax first loads it: set them before importing jax.
  os.environ["LIBTPU_INIT_ARGS"] = " ".join(filter(None, [
      os.environ.get("LIBTPU_INIT_ARGS", ""), f"--xla_jf_dump_to={dump_dir}",
      "--xla_jf_dump_llo_text=true", "--xla_jf_dump_llo_pass_label_regex=final_bundles"]))
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import jax
  from unigrpo_jax.aot import plan

  compiled_text = []
  compile_fn = jax.stages.Lowered.compile

  def compile_and_keep_hlo(self, *args, **kwargs):
    compiled = compile_fn(self, *args, **kwargs)
    compiled_text.append(compiled.as_text())
    return compiled

  jax.stages.Lowered.compile = compile_and_keep_hlo
  try:
    report = plan.plan(config, topology, [program],
                       log=lambda m: print(m, file=sys.stderr, flush=True))
  except (ValueError, RuntimeError) as e:
    sys.exit(f"error: {e}")
  finally:
    jax.stages.Lowered.compile = compile_fn
  if not compiled_text:
    sys.exit(f"error: {program} did not compile for {topology} (see the planner's report)")
  found = kernels(dump_dir, compiled_text[-1])
  if not found:
    sys.exit(f"error: no '<ns>-<kernel>-<n>-final_bundles.txt' files in {dump_dir}: this libtpu "
             "names its LLO dump differently")
  seconds = report["programs"][program]["compile_s"]
  return format_breakdown(found, f"{program} on {topology} "
                                 f"(compile {seconds:.0f} s wall with the dump on)")


def main(argv=None) -> None:
  from absl import app, flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
  topology = flags.DEFINE_string("topology", None, "Cloud TPU accelerator type, e.g. v6e-8.")
  program = flags.DEFINE_enum("program", "train_step", ["rollout", "train_step"],
                              "The program to compile.")
  out = flags.DEFINE_string("out", None, "Append the markdown breakdown to this file.")
  keep = flags.DEFINE_string("keep_dump", None, "Write the LLO dump here (default: a temp dir).")
  flags.mark_flags_as_required(["config", "topology"])

  def run(_):
    dump_dir = keep.value or tempfile.mkdtemp(prefix="llo_dump_")
    os.makedirs(dump_dir, exist_ok=True)
    if os.listdir(dump_dir):
      sys.exit(f"error: --keep_dump={dump_dir} is not empty; the breakdown reads every file")
    try:
      text = _compile_and_break_down(config.value, topology.value, program.value, dump_dir)
    finally:
      if not keep.value:  # the dump of BAGEL's train step: ~450 MB
        shutil.rmtree(dump_dir, ignore_errors=True)
    print(text)
    if out.value:
      with open(out.value, "a") as f:
        f.write(text + "\n")

  app.run(run, argv)


if __name__ == "__main__":
  main()
