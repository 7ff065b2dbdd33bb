"""Every file the trainers write or read under a workdir goes through ``unigrpo_jax.paths``
(issue #26: ``os.makedirs("gs://b/run")`` made a local folder ``gs:`` and ``open`` wrote the
metrics, log and sample grids into it, on worker 0's disk).

An ``ast`` scan of the modules that touch the workdir flags the builtin ``open`` and the ``os`` /
``shutil`` / ``glob`` file calls, unless the call's line carries a ``# local-path: <why>`` comment
(e.g. inside ``paths.py``'s local branch). Nothing is executed.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "unigrpo_jax"
SCANNED = sorted([*PACKAGE.glob("trainers/*.py"), PACKAGE / "checkpointing.py",
                  PACKAGE / "console.py", PACKAGE / "main.py", PACKAGE / "data" / "pipeline.py",
                  PACKAGE / "paths.py"])
# Dotted call names that touch the local file system.
LOCAL_FS_CALLS = {"open", "io.open", "os.makedirs", "os.mkdir", "os.listdir", "os.replace",
                  "os.rename", "os.remove", "os.unlink", "os.scandir", "os.walk",
                  "os.path.exists", "os.path.isdir", "os.path.isfile", "os.path.getsize",
                  "shutil.rmtree", "shutil.copy", "shutil.copyfile", "shutil.move",
                  "glob.glob", "pathlib.Path"}
# Calls that are not about the workdir, in files this check covers but whose owners have not
# moved them yet: (file relative to the package, dotted call) -> how many, and why.
KNOWN = {
    # is_bagel_dir / autoencoder_for: a downloaded BAGEL directory, read by the safetensors
    # loaders of models/ (local files only); never a workdir.
    ("trainers/build.py", "os.path.isfile"): 2,
}
MARK = "# local-path:"


def _dotted(func: ast.AST) -> str:
  parts = []
  while isinstance(func, ast.Attribute):
    parts.append(func.attr)
    func = func.value
  if isinstance(func, ast.Name):
    parts.append(func.id)
    return ".".join(reversed(parts))
  return ""


def local_fs_calls(source: str, filename: str = "<src>") -> list[tuple[int, str]]:
  """(line, dotted name) of each unmarked local file-system call in ``source``."""
  lines = source.splitlines()
  tree = ast.parse(source, filename)
  # A module-level def shadows the builtin (paths.open is the abstraction itself).
  shadowed = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    name = _dotted(node.func)
    if name not in LOCAL_FS_CALLS or name in shadowed:
      continue
    span = lines[node.lineno - 1:(node.end_lineno or node.lineno)]
    if any(MARK in line for line in span):
      continue
    found.append((node.lineno, name))
  return found


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_workdir_files_go_through_paths(path):
  rel = str(path.relative_to(PACKAGE))
  found = local_fs_calls(path.read_text(), str(path))
  counts = {}
  for _, name in found:
    counts[name] = counts.get(name, 0) + 1
  unexpected = [(line, name) for line, name in found
                if counts[name] > KNOWN.get((rel, name), 0)]
  assert not unexpected, (
      f"{rel}: local file-system calls {unexpected}: use unigrpo_jax.paths (gs:// workdirs), or "
      f"mark a deliberately local one with '{MARK} <why>' on its line")


def test_the_scan_flags_a_builtin_open_and_os_makedirs():
  src = ("import os\n\n\ndef f(workdir):\n  os.makedirs(workdir, exist_ok=True)\n"
         "  with open(os.path.join(workdir, 'x'), 'w') as f:\n    f.write('x')\n"
         "  return os.path.exists('/tmp')  # local-path: a test of the marker\n")
  assert local_fs_calls(src) == [(5, "os.makedirs"), (6, "open")]
