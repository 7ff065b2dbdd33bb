"""Where a TPU program's XLA compile time goes: per kernel, grouped by the pass of the model.

    python benchmarks/compile_breakdown.py --config=configs/bagel_lora_1host.py \
        --topology=v6e-8 --program=train_step [--out=report.md] [--keep_dump=DIR]

Compiles ONE program of ``python -m unigrpo_jax.aot``'s plan (no TPU needed, libtpu installed)
with libtpu's LLO dump on, for two passes only: ``fingerprints`` (the first pass of a kernel's
low-level code generation) and ``final_bundles`` (its last). The time between the two files of
a kernel is that kernel's code generation; libtpu runs kernels on a thread pool, so the spans
overlap and add up to more than the wall time, and the dump itself costs ~40 % more CPU time.
Read the shares, not the seconds.

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
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `python benchmarks/compile_breakdown.py` puts benchmarks/ first
  sys.path.insert(0, _ROOT)

# `<start ns>-<kernel>-<pass number>-<pass label>.txt`; TLP and <late-...> are whole-program spans.
_DUMP_FILE = re.compile(r"^(\d+)-(.+)-\d+-(fingerprints|(?:.*_)?final_bundles)\.txt$")
_OP_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s[^\n]*?op_name=\"([^\"]*)\"", re.M)
PHASES = ("backward", "rematerialised forward", "forward with gradient",
          "forward without gradient", "other")


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One kernel's code generation: its HLO name, the model pass it belongs to, seconds."""
  name: str
  phase: str
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
  """The kernels of an LLO dump (``fingerprints`` and ``final_bundles`` files), longest first.

  A kernel whose two files are not both there (a dump cut short) is left out; so are the
  whole-program spans (``TLP``, ``<late-...>``), which overlap every kernel.
  """
  first, last = {}, {}
  for entry in os.scandir(dump_dir):
    m = _DUMP_FILE.match(entry.name)
    if not m or m.group(2) == "TLP" or m.group(2).startswith("<"):
      continue
    key = (m.group(1), m.group(2))
    (first if m.group(3) == "fingerprints" else last)[key] = entry.stat().st_mtime
  names = op_names(hlo_text)
  out = [Kernel(name, phase_of(names.get(name, "")), max(0.0, last[key] - first[key]))
         for key in last.keys() & first.keys() for name in [key[1]]]
  return sorted(out, key=lambda k: -k.seconds)


def format_breakdown(found: list[Kernel], title: str, top: int = 10) -> str:
  """A markdown table of the seconds and kernels per phase, then the ``top`` longest kernels."""
  total = sum(k.seconds for k in found) or 1.0
  secs, count = collections.Counter(), collections.Counter()
  for k in found:
    secs[k.phase] += k.seconds
    count[k.phase] += 1
  lines = [f"## {title}", "", f"{len(found)} kernels, {total:.1f} s of code generation "
           "(overlapping spans on the compile's thread pool).", "",
           "| phase | kernels | seconds | share |", "|---|---|---|---|"]
  for phase in PHASES:
    if count[phase]:
      lines.append(f"| {phase} | {count[phase]} | {secs[phase]:.1f} | "
                   f"{100 * secs[phase] / total:.1f} % |")
  lines += ["", "| longest kernels | phase | seconds |", "|---|---|---|"]
  lines += [f"| `{k.name}` | {k.phase} | {k.seconds:.2f} |" for k in found[:top]]
  return "\n".join(lines) + "\n"


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
    # libtpu reads its flags once, when jax first loads it: set them before importing jax.
    os.environ["LIBTPU_INIT_ARGS"] = " ".join(filter(None, [
        os.environ.get("LIBTPU_INIT_ARGS", ""), f"--xla_jf_dump_to={dump_dir}",
        "--xla_jf_dump_llo_text=true",
        "--xla_jf_dump_llo_pass_label_regex=fingerprints|final_bundles"]))
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
      report = plan.plan(config.value, topology.value, [program.value],
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ValueError, RuntimeError) as e:
      sys.exit(f"error: {e}")
    finally:
      jax.stages.Lowered.compile = compile_fn
    found = kernels(dump_dir, compiled_text[-1])
    seconds = report["programs"][program.value]["compile_s"]
    text = format_breakdown(found, f"{program.value} on {topology.value} "
                                   f"(compile {seconds:.0f} s wall with the dump on)")
    print(text)
    if out.value:
      with open(out.value, "a") as f:
        f.write(text + "\n")

  app.run(run, argv)


if __name__ == "__main__":
  main()
