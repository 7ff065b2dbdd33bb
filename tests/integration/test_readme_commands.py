"""Every command the README shows runs, in a small form, so that none can rot.

The commands are parsed from README.md itself: each line of its ```bash blocks (comments
dropped, ``&&`` chains split) and each inline `python ...` span that has no placeholder (such as
``--config=FILE``). Each runs as a subprocess from the repository root, made small:

* ``python -m unigrpo_jax.main ...``: the README's arguments plus one step, tiny evaluation sizes
  and a 2-prompt batch, in a tmp workdir; checks every output the README lists (slow).
* ``python -m unigrpo_jax.aot ...``: ``--help`` always (and every flag the README passes is
  one it has); with libtpu importable also the README's config on the smallest slice of the
  same chip (``-8``) with a tiny model and batch (else skipped with the reason).
* ``python -m unigrpo_jax.rewards.serve ...``: ``--help``, with the README's flags in it.
* ``python -m unigrpo_jax.testing.tiny_bagel DIR``: as shown, into a tmp DIR.
* ``python benchmarks/run.py --quick``: its ``--tiny`` form (one rep of every part) (slow).
* ``pip install ...`` is skipped (.ci/run installs the project), and so is ``bash tests/run.sh``
  (it is the test suite this file is part of).

A command of any other kind fails ``test_every_readme_command_has_a_small_form``: give it one
here. The slow ones run in CI through .ci/run's second pytest call on this file.
"""
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "README.md")

MAIN_SMALL = ("--config.total_steps=1", "--config.rollout.prompts_per_batch=2",
              "--config.data.eval_tasks=8", "--config.eval.batch_size=8",
              "--config.eval.num_steps=2", "--config.eval.grid_rows=1")
AOT_SMALL = ("--config.model.preset=tiny", "--config.model.vocab_size=0",
             "--config.rollout.prompts_per_batch=4", "--config.rollout.group_size=2",
             "--config.rollout.max_reasoning_len=8", "--config.rollout.num_steps=6",
             "--config.optim.num_minibatches=1")


def _placeholder(arg: str) -> bool:
  """FILE, DIR, --config=FILE, --x.NAME=W: a README template, not a command to run."""
  return any(re.fullmatch(r"[A-Z][A-Z_]{2,}", part) for part in re.split(r"[=.]", arg))


def readme_commands(text: str) -> list[list[str]]:
  """The README's shell commands as argv lists, in order of appearance, without repeats."""
  commands = []
  for block in re.findall(r"^```bash[^\n]*\n(.*?)^```", text, re.S | re.M):
    for line in block.replace("\\\n", " ").splitlines():
      words = shlex.split(line, comments=True)
      while words:
        cut = words.index("&&") if "&&" in words else len(words)
        commands.append(words[:cut])
        words = words[cut + 1:]
  prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
  for span in re.findall(r"`(python [^`\n]+)`", prose):
    words = shlex.split(span)
    if not any(_placeholder(w) for w in words):
      commands.append(words)
  unique = []
  for c in commands:
    if c and c not in unique:
      unique.append(c)
  return unique


def kind(argv: list[str]) -> str:
  if argv[0] == "pip" or argv[:3] == ["python", "-m", "pip"]:
    return "pip"
  if argv[:2] == ["bash", "tests/run.sh"]:
    return "test_suite"
  if argv[:2] == ["python", "benchmarks/run.py"]:
    return "benchmark"
  if argv[:2] == ["python", "-m"] and len(argv) > 2:
    return {"unigrpo_jax.main": "main", "unigrpo_jax.aot": "aot",
            "unigrpo_jax.rewards.serve": "serve",
            "unigrpo_jax.testing.tiny_bagel": "tiny_bagel"}.get(argv[2], "unknown")
  return "unknown"


with open(README) as _f:
  COMMANDS = readme_commands(_f.read())
SLOW = {"main", "benchmark"}


def _run(argv, timeout, **kw):
  argv = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
  out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)
  return out.returncode, out.stdout + out.stderr


def _flags(argv):
  return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def test_every_readme_command_has_a_small_form():
  kinds = [kind(c) for c in COMMANDS]
  unknown = [" ".join(c) for c, k in zip(COMMANDS, kinds) if k == "unknown"]
  assert not unknown, f"README commands without a small form in {__file__}: {unknown}"
  # The parser found what the README shows (an empty parse must not pass silently).
  assert {"main", "aot", "serve", "tiny_bagel", "benchmark", "pip", "test_suite"} <= set(kinds)


def test_the_parser_reads_blocks_chains_comments_and_spans():
  text = ("Run:\n\n```bash\npip install -e . && python -m a.b --x=1   # why\n"
          "python -m c \\\n  --y=2\n```\n\nor `python -m d --config=FILE`, `python e.py --q`.\n"
          "```python\nimport os\n```\n")
  assert readme_commands(text) == [["pip", "install", "-e", "."], ["python", "-m", "a.b", "--x=1"],
                                   ["python", "-m", "c", "--y=2"], ["python", "e.py", "--q"]]


@pytest.mark.parametrize("argv", [
    pytest.param(c, id=f"{kind(c)}-{i}", marks=[pytest.mark.slow] if kind(c) in SLOW else [])
    for i, c in enumerate(COMMANDS)])
def test_readme_command(argv, tmp_path):
  k = kind(argv)
  if k == "pip":
    pytest.skip("pip install: CI installs the project itself (.ci/run), not this test")
  if k == "test_suite":
    pytest.skip("bash tests/run.sh is the test suite this file is part of")
  globals()[f"_small_{k}"](argv, tmp_path)


def _small_main(argv, tmp_path):
  args = [f"--workdir={tmp_path / a.split('=', 1)[1]}" if a.startswith("--workdir=") else a
          for a in argv]
  workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
  rc, out = _run(args + list(MAIN_SMALL), timeout=900)
  assert rc == 0, out[-4000:]
  # What the README says the run writes to --workdir.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [0, 1]
  for name in ("samples_step_000000.png", "samples_step_000001.png", "log.txt"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "1"))
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert "eval @ step 1" in out


def _small_aot(argv, tmp_path):
  rc, out = _run(argv[:3] + ["--help"], timeout=300)
  assert rc in (0, 1) and "Try --helpfull" in out, out[-3000:]  # absl's --help exits 1
  for flag in _flags(argv[3:]):
    assert flag in out, f"{flag} (README) is not a flag of {argv[2]}"
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -e .[tpu]): the AOT planner's small-slice "
                "run is skipped; its --help ran")
  report = tmp_path / "plan.json"
  args = [re.sub(r"-\d+$", "-8", a) if a.startswith("--topology=") else a for a in argv]
  rc, out = _run(args + list(AOT_SMALL) + [f"--out={report}"], timeout=600)
  if rc == 2 and "libtpu" in out:
    pytest.skip(f"libtpu cannot load: {out.strip().splitlines()[-1][:300]}")
  assert rc == 0, out[-4000:]
  plan = json.loads(report.read_text())
  assert plan["fits"] and set(plan["programs"]) == {"rollout", "train_step"}, plan


def _small_serve(argv, tmp_path):
  rc, out = _run(argv[:3] + ["--help"], timeout=120)
  assert rc == 0, out[-3000:]
  for flag in _flags(argv[3:]):
    assert flag in out, f"{flag} (README) is not a flag of {argv[2]}"


def _small_tiny_bagel(argv, tmp_path):
  target = tmp_path / os.path.basename(argv[3].rstrip("/"))
  rc, out = _run(argv[:3] + [str(target)] + argv[4:], timeout=300)
  assert rc == 0, out[-3000:]
  for name in ("llm_config.json", "ema.safetensors", "ae.safetensors", "tokenizer.json"):
    assert (target / name).is_file(), name


def _small_benchmark(argv, tmp_path):
  out_json = tmp_path / "bench.json"
  args = [a for a in argv if a != "--quick"] + ["--tiny", f"--out={out_json}"]
  rc, out = _run(args, timeout=600)
  assert rc == 0, out[-4000:]
  res = json.loads(out_json.read_text())
  assert res["tiny"] and res["presets"]["tiny"]["train_step"]["seconds"] > 0
  assert "train step" in out
