"""The package's import graph: no cycles, no upward imports, no oversized modules.

Imports are read from the source with ``ast`` (every ``import`` / ``from ... import`` statement,
including those inside functions, which is where cycles used to hide), so nothing is executed.
"""
import ast
import os
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "unigrpo_jax"
# Modules every layer may use: they import no model, reward, rollout, RL or trainer code.
INFRASTRUCTURE = ("unigrpo_jax.parallel", "unigrpo_jax.distributed", "unigrpo_jax.console",
                  "unigrpo_jax.config_defaults", "unigrpo_jax.paths")
# What infrastructure must not import (prefixes).
UPPER_LAYERS = ("unigrpo_jax.models", "unigrpo_jax.rewards", "unigrpo_jax.rollout",
                "unigrpo_jax.rl", "unigrpo_jax.trainers", "unigrpo_jax.aot", "unigrpo_jax.data",
                "unigrpo_jax.checkpointing", "unigrpo_jax.testing")
MAX_LINES = 450


def module_files(root: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
  """{dotted module name: file} of every module under ``root`` (packages by their __init__)."""
  out = {}
  for path in root.rglob("*.py"):
    rel = path.relative_to(root.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    out[".".join(parts)] = path
  return out


def imports_of(path: pathlib.Path, modules: dict) -> set[str]:
  """The package modules ``path`` imports anywhere in its body (``from a import b`` counts as
  ``a.b`` when ``a.b`` is a module, else as ``a``)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        if sub in modules:
          found.add(sub)
        elif node.module in modules:
          found.add(node.module)
  return found


def import_graph(root: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
  modules = module_files(root)
  return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan, iterative)."""
  index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

  def visit(root):
    work = [(root, iter(sorted(graph.get(root, ()))))]
    index[root] = low[root] = counter[0]
    counter[0] += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter[0]
          counter[0] += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          out.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return out


def test_cycle_finder_finds_a_planted_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
  assert find_cycles(graph) == [["a", "b", "c"]]
  assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_cycle_finder_sees_imports_inside_functions(tmp_path):
  pkg = tmp_path / "unigrpo_jax"
  (pkg / "sub").mkdir(parents=True)
  for f in ("__init__.py", "sub/__init__.py"):
    (pkg / f).write_text("")
  (pkg / "a.py").write_text("from unigrpo_jax.sub import b\n")
  (pkg / "sub" / "b.py").write_text("def f():\n  from unigrpo_jax import a\n  return a\n")
  assert find_cycles(import_graph(pkg)) == [["unigrpo_jax.a", "unigrpo_jax.sub.b"]]


def test_package_has_no_import_cycles():
  cycles = find_cycles(import_graph())
  assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", INFRASTRUCTURE)
def test_infrastructure_imports_nothing_above_it(module):
  graph = import_graph()
  upward = sorted(m for m in graph[module] if m.startswith(UPPER_LAYERS))
  assert not upward, f"{module} imports {upward}"


def test_fixture_writers_live_outside_the_model_code():
  graph = import_graph()
  users = sorted(m for m, deps in graph.items()
                 if any(d.startswith("unigrpo_jax.testing") for d in deps)
                 and not m.startswith("unigrpo_jax.testing"))
  assert not users, f"package modules importing test fixture writers: {users}"


def test_no_module_exceeds_the_line_budget():
  long = {name: n for name, path in module_files().items()
          if (n := len(path.read_text().splitlines())) > MAX_LINES}
  assert not long, f"modules over {MAX_LINES} lines: {long}"
