"""Inter-chip communication of a compiled SPMD program, per chip, attributed to its loops.

``analyze(hlo_text)`` reads the partitioned HLO (``compiled.as_text()``: one chip's program),
finds every collective (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute;
their async ``-start`` forms counted once, ``-done`` never), how many times each runs per call
(the product of the trip counts of the loops around it, ``hlo.trip_count``) and the innermost
``while`` loop it runs in.

Bytes convention (per chip, per execution), ``operand_bytes``: the bytes of the collective's
operands on this chip, whatever the collective does with them. An all-reduce counts its operand
once (not the 2x a ring sends); an all-gather counts this chip's shard (its operand), not the
gathered result; a reduce-scatter counts its whole input; an all-to-all and a
collective-permute their operand. ``wire_bytes`` is what a bandwidth-optimal (ring) algorithm
sends from each chip of an n-chip group: all-reduce 2 (n - 1) / n x operand, all-gather
(n - 1) x operand, reduce-scatter and all-to-all (n - 1) / n x operand, collective-permute
the operand. The time model (``time_model.py``) uses the wire bytes.

Groups come from ``replica_groups`` in any of its three printed forms (explicit
``{{0,1},{2,3}}``, iota ``[2,2]<=[4]`` with an optional ``T(...)`` transpose, and the mesh form
``mesh['axis_0'=8,'axis_1'=2] {'axis_1'}``) as global device ids (= partition ids: one replica),
i.e. positions in the program's device assignment (the mesh's flattened devices).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Optional

import numpy as np

from unigrpo_jax.aot import hlo

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_KIND = {"all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
         "all-gather": "all-gather", "all-gather-start": "all-gather",
         "reduce-scatter": "reduce-scatter", "all-to-all": "all-to-all",
         "ragged-all-to-all": "all-to-all", "collective-permute": "collective-permute",
         "collective-permute-start": "collective-permute"}


@dataclasses.dataclass
class Collective:
  kind: str
  name: str
  computation: str
  operand_bytes: int  # per chip, per execution (see the module docstring)
  group_size: int
  groups: Optional[list]  # global device ids per group (collective-permute: [src, dst] pairs)
  executions: float  # per call of the program
  loop: Optional[str]  # innermost while instruction it runs in (None: outside every loop)
  op_name: str
  shape: str

  @property
  def wire_bytes(self) -> float:
    """Bytes each chip sends per execution, ring algorithm over ``group_size`` chips."""
    n, b = max(self.group_size, 1), self.operand_bytes
    if n == 1:
      return 0.0
    return {"all-reduce": 2.0 * (n - 1) / n * b, "all-gather": (n - 1) * float(b),
            "reduce-scatter": (n - 1) / n * b, "all-to-all": (n - 1) / n * b,
            "collective-permute": float(b)}[self.kind]


def parse_groups(attrs: str, num_devices: int) -> Optional[list]:
  """``replica_groups`` (or ``source_target_pairs``) of a collective -> lists of device ids.
  ``{}`` (or none) means one group of every device; None when the form is not recognised."""
  m = re.search(r"source_target_pairs=\{((?:\{[\d,\s]*\},?\s*)*)\}", attrs)
  if m:
    return [[int(x) for x in g.split(",") if x.strip()]
            for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
  m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
  if m:
    shape = [int(x) for x in m.group(1).split(",")]
    dims = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(-1, shape[-1]).tolist()
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:
    axes = [(a, int(s)) for a, s in re.findall(r"'([^']+)'=(\d+)", m.group(1))]
    chosen = re.findall(r"'([^']+)'", m.group(2))
    names = [a for a, _ in axes]
    if not axes or any(c not in names for c in chosen):
      return None
    ids = np.arange(math.prod(s for _, s in axes)).reshape([s for _, s in axes])
    keep = [i for i, a in enumerate(names) if a not in chosen]
    ids = ids.transpose(keep + [names.index(c) for c in chosen])
    n = math.prod(dict(axes)[c] for c in chosen)
    return ids.reshape(-1, n).tolist()
  m = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}", attrs)
  if m:
    groups = [[int(x) for x in g.split(",") if x.strip()]
              for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
    return groups or [list(range(num_devices))]
  if "replica_groups" not in attrs:
    return [list(range(num_devices))]
  return None


def _operand_bytes(inst: hlo.Instruction, types: dict, kind: str, n: int) -> int:
  ops = [types.get(o) for o in inst.operands]
  if ops and all(t is not None for t in ops):
    return sum(hlo.array_bytes(t) for t in ops)
  out = hlo.array_bytes(inst.type)  # operands unknown: from the result (sync forms)
  if kind == "all-gather":
    return out // max(n, 1)
  if kind == "reduce-scatter":
    return out * n
  return out


@dataclasses.dataclass
class Analysis:
  collectives: list
  loops: dict  # while name -> hlo.Loop
  num_devices: int

  def loop_chain(self, loop: Optional[str]) -> list:
    """``loop`` and its enclosing loops, innermost first."""
    return hlo.loop_chain(self.loops, loop)


def num_partitions(text: str) -> int:
  m = re.search(r"num_partitions=(\d+)", text)
  return int(m.group(1)) if m else 1


def collectives_of(visits, num_devices: int) -> list:
  """The collectives among ``hlo.walk``'s visits."""
  out, types_cache = [], {}
  for comp, inst, mult, loop, _ in visits:
    kind = _KIND.get(inst.opcode)
    if kind is None:
      continue
    if comp.name not in types_cache:
      types_cache[comp.name] = comp.types()
    groups = parse_groups(inst.attrs, num_devices)
    n = 2 if kind == "collective-permute" else (len(groups[0]) if groups else num_devices)
    shape = inst.type if inst.type.startswith("(") else inst.type.split("{")[0]
    out.append(Collective(kind, inst.name, comp.name,
                          _operand_bytes(inst, types_cache[comp.name], kind, n), n, groups,
                          mult, loop, inst.op_name, shape))
  return out


def analyze(text: str, hints: Optional[dict] = None) -> Analysis:
  """Every collective of the program with its executions per call and its innermost loop.
  ``hints``: {condition bound: trips} for loops XLA cannot count (``hlo.trip_count``)."""
  n = num_partitions(text)
  visits, loops = hlo.walk(hlo.parse_module(text), hints)
  return Analysis(collectives_of(visits, n), loops, n)


def by_kind(collectives, weight=lambda c: c.operand_bytes * c.executions) -> dict:
  out = {k: 0.0 for k in KINDS}
  for c in collectives:
    out[c.kind] += weight(c)
  return out


def summarize(analysis: Analysis, top: int = 5) -> dict:
  """Report-ready figures: per-call bytes per chip by kind (operand and wire), and per loop its
  trip count, executions per call and per-iteration bytes (inclusive of nested loops) by kind,
  with the largest collectives of one iteration."""
  cs = analysis.collectives
  per_call = by_kind(cs)
  wire_call = by_kind(cs, lambda c: c.wire_bytes * c.executions)
  children = collections.defaultdict(list)
  for c in cs:
    for loop in analysis.loop_chain(c.loop):
      children[loop].append(c)
  loops = {}
  for name, lp in analysis.loops.items():
    iterations = lp.entries * lp.trips
    inner = children.get(name, [])
    per_iter = by_kind(inner, lambda c: c.operand_bytes * c.executions / max(iterations, 1))
    wire_iter = by_kind(inner, lambda c: c.wire_bytes * c.executions / max(iterations, 1))
    largest = sorted(inner, key=lambda c: -c.operand_bytes * c.executions)[:top]
    loops[name] = {
        "op_name": lp.op_name, "parent": lp.parent, "trips": lp.trips,
        "trip_source": lp.trip_source, "condition_bound": lp.bound, "entries": lp.entries,
        "per_iteration_bytes": per_iter, "per_iteration_total": sum(per_iter.values()),
        "per_iteration_wire_bytes": sum(wire_iter.values()),
        "per_call_bytes": sum(c.operand_bytes * c.executions for c in inner),
        "collectives_per_iteration": sum(c.executions for c in inner) / max(iterations, 1),
        "largest": [{"kind": c.kind, "shape": c.shape, "bytes": c.operand_bytes,
                     "group_size": c.group_size,
                     "per_iteration": c.executions / max(iterations, 1),
                     "op_name": c.op_name[-100:]} for c in largest]}
  return {"convention": "operand bytes per chip (all-reduce: operand once; all-gather: this "
                        "chip's shard; reduce-scatter: whole input); wire: ring-algorithm bytes "
                        "sent per chip",
          "per_call_bytes": per_call, "per_call_total": sum(per_call.values()),
          "per_call_wire_bytes": sum(wire_call.values()),
          "num_collectives": len(cs), "loops": loops}
