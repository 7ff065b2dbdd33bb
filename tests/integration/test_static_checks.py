"""Static checks that run with the tests: no Python file of the project uses a name it never
defined (pyflakes' "undefined name", "undefined name in __all__" and "local variable referenced
before assignment"). Such a name fails only when its line runs, which may be a branch no other
test reaches (``build_programs`` once named ``PatchAutoencoder`` without importing it).
Unused imports and other style findings are not checked here.
"""
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKED = ("unigrpo_jax", "benchmarks", "configs", "launch/*.py")


def _undefined_names(paths):
  """(findings as 'path:line: message', files checked) of pyflakes over ``paths``."""
  from pyflakes import api, messages, reporter

  undefined = (messages.UndefinedName, messages.UndefinedExport, messages.UndefinedLocal)

  class Collect(reporter.Reporter):
    def __init__(self):
      super().__init__(None, None)
      self.found = []

    def flake(self, message):
      if isinstance(message, undefined):
        self.found.append(str(message))

    def syntaxError(self, filename, msg, lineno, offset, text):
      self.found.append(f"{filename}:{lineno}: syntax error: {msg}")

    def unexpectedError(self, filename, msg):
      self.found.append(f"{filename}: {msg}")

  files = [p for p in api.iterSourceCode(paths) if p.endswith(".py")]
  collect = Collect()
  for path in files:
    api.checkPath(path, collect)
  return collect.found, files


def test_no_undefined_names():
  pytest.importorskip("pyflakes", reason="pyflakes is in the test extra: pip install -e .[test]")
  paths = [p for pattern in CHECKED for p in sorted(glob.glob(os.path.join(REPO, pattern)))]
  found, files = _undefined_names(paths)
  assert len(files) > 100, files  # the package, benchmarks, configs and launch scripts
  assert not found, "undefined names:\n" + "\n".join(found)


def test_the_check_finds_an_undefined_name(tmp_path):
  pytest.importorskip("pyflakes", reason="pyflakes is in the test extra: pip install -e .[test]")
  bad = tmp_path / "bad.py"
  bad.write_text("import os\n\n\ndef f(cfg):\n  return PatchAutoencoder.for_model(cfg)\n")
  found, _ = _undefined_names([str(bad)])
  assert len(found) == 1 and "undefined name 'PatchAutoencoder'" in found[0], found
