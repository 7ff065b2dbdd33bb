"""Find whole-KV-cache copies in the optimized HLO of a compiled decode loop.

A decode step should read the cache once (attention) and write one slot per layer. XLA can add
data movement of the whole cache in two ways that the step's FLOPs do not show:

* ``copy`` instructions from copy insertion, when a ``while`` carry buffer cannot be updated in
  place (the old value is still live when the new one is written);
* ``copy`` roots of fusions that materialise a cache-sized array, e.g. ``concatenate([cache, new])``
  or a transposed cache operand of the attention dot.

``cache_copies`` lists every ``copy`` in a ``while`` body (and the computations it calls:
fusions, nested loops) whose element count is at least one layer's key (or value) buffer
``B * S * Hkv * D``. ``cache_materialisations`` lists the other way to move a cache: an
instruction of the loop body that produces a new cache-sized array with a dimension of the cache
length (a slice of a stacked cache, a concatenation, a transpose), other than the in-place
``dynamic-update-slice`` that writes the new slots. Zero of both means each step only reads the
cache (attention) and writes the new slots.

Works on ``jax.jit(...).lower(...).compile().as_text()`` of any backend (the parser only relies on
HLO's text syntax: ``%name (...) -> ... {`` headers, ``calls=``/``body=``/``to_apply=`` edges).
"""
from __future__ import annotations

import dataclasses
import math
import re

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_WHILE = re.compile(r"\bwhile\(.*?\bbody=%?([\w.\-]+)")
_CALLED_ONE = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_CALLED_MANY = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
# `%copy.12 = f32[8,97,2,32]{3,2,1,0} copy(%x)`; also the async copy-start pair.
_COPY = re.compile(r"%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\][^ ]*\s+copy(?:-start)?\(")
# Any array-valued instruction: name, dims, opcode.
_INSTR = re.compile(r"%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]\S*\s+([\w\-]+)\(")
_NOT_NEW = ("parameter", "get-tuple-element", "bitcast", "tuple", "dynamic-update-slice")


@dataclasses.dataclass(frozen=True)
class Copy:
  """One copy instruction: its name, result dims, the computation holding it."""
  name: str
  dims: tuple[int, ...]
  computation: str

  @property
  def elements(self) -> int:
    return math.prod(self.dims)


def split_computations(hlo_text: str) -> dict[str, list[str]]:
  """Optimized HLO text -> {computation name: its instruction lines}."""
  comps, current = {}, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      comps[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None:
      comps[current].append(line)
  return comps


def _callees(lines: list[str]) -> set[str]:
  out = set()
  for line in lines:
    out.update(_CALLED_ONE.findall(line))
    for group in _CALLED_MANY.findall(line):
      out.update(name.strip().lstrip("%") for name in group.split(",") if name.strip())
  return out


def while_bodies(hlo_text: str) -> dict[str, set[str]]:
  """{while body name: every computation it reaches (itself, fusions, nested loops)}."""
  comps = split_computations(hlo_text)
  bodies = {b for lines in comps.values() for line in lines for b in _WHILE.findall(line)}
  out = {}
  for body in bodies:
    seen, todo = set(), [body]
    while todo:
      name = todo.pop()
      if name in seen or name not in comps:
        continue
      seen.add(name)
      todo.extend(_callees(comps[name]))
    out[body] = seen
  return out


def copies_in(hlo_text: str, computations: set[str]) -> list[Copy]:
  comps = split_computations(hlo_text)
  found = []
  for name in sorted(computations):
    for line in comps.get(name, []):
      m = _COPY.search(line)
      if m:
        dims = tuple(int(d) for d in m.group(2).split(",") if d)
        found.append(Copy(m.group(1), dims, name))
  return found


def cache_copies(hlo_text: str, layer_buffer_elements: int) -> list[Copy]:
  """Copies of >= ``layer_buffer_elements`` elements inside any while body of the program.

  layer_buffer_elements: B * S * Hkv * D, one layer's key (or value) buffer.
  """
  reached = set().union(*while_bodies(hlo_text).values()) if while_bodies(hlo_text) else set()
  return [c for c in copies_in(hlo_text, reached) if c.elements >= layer_buffer_elements]


def _dims(text: str) -> tuple[int, ...]:
  return tuple(int(d) for d in text.split(",") if d)


def cache_materialisations(hlo_text: str, layer_buffer_elements: int,
                           cache_len) -> list[Copy]:
  """Loop-body instructions that build a new cache-sized array (see the module docstring).

  An instruction counts when it has >= ``layer_buffer_elements`` elements and a dimension in
  ``[n, n + 8]`` for a cache length n in ``cache_len`` (an int, or several for a decode with
  several attention windows): the cache, or the cache concatenated with a few new slots. Views
  (bitcast, tuple element) and the in-place ``dynamic-update-slice`` (also as the root of a
  fusion) do not count.
  """
  lengths = (cache_len,) if isinstance(cache_len, int) else tuple(cache_len)
  comps = split_computations(hlo_text)
  roots = {}
  for name, lines in comps.items():
    for line in lines:
      if line.lstrip().startswith("ROOT "):
        m = _INSTR.search(line)
        roots[name] = m.group(3) if m else ""
  found = []
  for body in while_bodies(hlo_text):
    for line in comps[body]:
      m = _INSTR.search(line)
      if not m or m.group(3) in _NOT_NEW or m.group(3).startswith("copy"):  # cache_copies
        continue
      dims = _dims(m.group(2))
      if math.prod(dims) < layer_buffer_elements:
        continue
      if not any(n <= d <= n + 8 for d in dims for n in lengths):
        continue
      called = _CALLED_ONE.findall(line)
      if m.group(3) == "fusion" and called and roots.get(called[0]) == "dynamic-update-slice":
        continue
      found.append(Copy(m.group(1), dims, body))
  return found
