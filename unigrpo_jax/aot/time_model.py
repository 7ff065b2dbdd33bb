"""A three-term time model of a compiled program, per call and per loop iteration.

Each term is seconds on one chip if that resource alone were the limit:

* compute: FLOPs / the chip's peak dense bf16 FLOP/s;
* HBM: bytes read and written / the chip's HBM bandwidth;
* ICI: for each collective, its ring-algorithm wire bytes (``comm.Collective.wire_bytes``) /
  the ICI bandwidth of the links its group can use, summed.

The bound is the largest term (perfect overlap of the three); ``binds`` names it; ``serial_s`` is
their sum (no overlap at all). Chip figures and their sources: ``topology.Chip``.

ICI bandwidth of a group: a chip's links are spread evenly over the slice's physical dimensions
(two per dimension of a 3-D torus: v4, v5p; of a 2-D torus: v5e, v6e), and a ring over a group
uses only the links along the dimensions its chips differ in (from the compile-only devices'
``coords``). A group spread over every dimension gets the chip's whole ``ici_bandwidth``; one
along a single dimension of a 3-D torus a third of it. Latency (a few microseconds per
collective) is not modelled: a decode step's tens of small collectives would add to it.

The per-loop FLOPs and bytes are read from the partitioned HLO (``hlo_costs``): FLOPs of every
dot and convolution (fused or not), HBM bytes of every top-level instruction (its operands and
result; a fusion's operand that it only slices counts the slice, a buffer it updates in place
counts the update; buffers in on-chip memory, layouts with ``S(n)``, n > 0, count nothing).
XLA cannot see into custom calls (Pallas kernels such as splash attention): their FLOPs are
missing from these counts, and ``custom_calls`` says how many there are.
"""
from __future__ import annotations

import collections
import math
import re
from typing import Optional, Sequence

from unigrpo_jax.aot import comm, hlo

_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
               "call", "conditional", "after-all", "partition-id", "replica-id",
               "opt-barrier", "async-start", "async-update", "async-done", "add-dependency"}


def _dims(type_str: str) -> list:
  m = re.search(r"\[([\d,]*)\]", type_str)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def flops(inst: hlo.Instruction, types: dict) -> float:
  """FLOPs of a dot (2 x result elements x contracted size) or a convolution (2 x result
  elements x input features x the window taps that can meet real input: per spatial dimension
  min(ceil(window / lhs dilation), input size), so padding is free); 0 for anything else.
  XLA on TPU writes many matmuls as convolutions (heads as a padded spatial dimension)."""
  if inst.opcode not in ("dot", "convolution") or len(inst.operands) < 2:
    return 0.0
  out = math.prod(_dims(inst.type))
  lhs = _dims(types.get(inst.operands[0], ""))
  if inst.opcode == "dot":
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
    k = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i) if m and lhs else 1
    return 2.0 * out * k
  rhs = _dims(types.get(inst.operands[1], ""))
  m = re.search(r"dim_labels=(\w+)_(\w+)->", inst.attrs)
  if not rhs or not lhs or not m or "i" not in m.group(2):
    return 0.0
  lhs_labels, rhs_labels = m.group(1), m.group(2)
  window = re.search(r"window=\{([^}]*)\}", inst.attrs)
  field = lambda name: (re.search(name + r"=([\dx]+)", window.group(1)) if window else None)
  size, dilate = field("size"), field(r"\blhs_dilate")
  sizes = [int(x) for x in size.group(1).split("x")] if size else []
  dilates = [int(x) for x in dilate.group(1).split("x")] if dilate else [1] * len(sizes)
  taps = 1
  spatial = [c for c in lhs_labels if c.isdigit()]
  for i, w in enumerate(sizes):
    extent = lhs[lhs_labels.index(spatial[i])] if i < len(spatial) else w
    taps *= min(-(-w // dilates[i]), extent)
  return 2.0 * out * rhs[rhs_labels.index("i")] * taps


def _tuple_elements(type_str: str) -> list:
  """Top-level elements of a tuple type string ``(a, (b, c), d)`` -> ["a", "(b, c)", "d"]."""
  if not type_str.startswith("("):
    return [type_str]
  out, depth, start = [], 0, 1
  for i, ch in enumerate(type_str[1:-1], 1):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      out.append(type_str[start:i].strip())
      start = i + 1
  out.append(type_str[start:len(type_str) - 1].strip())
  return out


def _hbm(type_str: str) -> int:
  return hlo.array_bytes(type_str, hbm_only=True)


def _fusion_bytes(inst: hlo.Instruction, types: dict, comps: dict) -> float:
  fused = comps.get(next((c for r, c in inst.called if r == "calls"), ""))
  if fused is None:
    return float(sum(_hbm(types.get(o, "")) for o in inst.operands)
                 + _hbm(inst.type))
  params, users = {}, collections.defaultdict(list)
  ftypes = fused.types()
  for f in fused.instructions:
    if f.opcode == "parameter" and f.args.strip().isdigit():
      params[int(f.args)] = f.name
    for o in f.operands:
      users[o].append(f)
  total = 0.0
  for k, operand in enumerate(inst.operands):
    size = _hbm(types.get(operand, ""))
    us = users.get(params.get(k), [])
    if us and all(u.opcode in ("dynamic-slice", "slice", "gather") for u in us):
      size = sum(_hbm(u.type) for u in us)  # reads a window of it
    elif us and all(u.opcode == "dynamic-update-slice" and u.operands[0] == params[k]
                    for u in us):
      size = 0  # updated in place: the update is counted with the result
    total += size
  root = next((f for f in fused.instructions if f.is_root), None)
  if root is not None and root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
    return total + _hbm(ftypes.get(root.operands[1], ""))
  return total + _hbm(inst.type)


def traffic(inst: hlo.Instruction, types: dict, comps: dict) -> float:
  """HBM bytes of a top-level instruction (see the module docstring)."""
  op = inst.opcode
  if op in _NO_TRAFFIC or op.endswith("-done"):
    return 0.0
  if op == "fusion":
    return _fusion_bytes(inst, types, comps)
  if op in ("copy-start", "slice-start"):  # async copies, e.g. prefetches into on-chip memory
    parts = _tuple_elements(inst.type)
    if op == "copy-start" and parts:  # (destination, source, context): source read, dest written
      return float(sum(_hbm(types.get(o, "")) for o in inst.operands) + _hbm(parts[0]))
    if len(parts) > 1:  # ((source), destination, context): the slice is read, then written
      return float(hlo.array_bytes(parts[1]) + _hbm(parts[1]))
  if op == "dynamic-update-slice" and len(inst.operands) > 1:
    return 2.0 * _hbm(types.get(inst.operands[1], ""))
  if op in ("dynamic-slice", "slice"):
    return 2.0 * _hbm(inst.type)
  return float(sum(_hbm(types.get(o, "")) for o in inst.operands)
               + _hbm(inst.type))


def hlo_costs(comps: dict, visits, loops: dict) -> dict:
  """Per call and per loop (inclusive of nested loops): FLOPs, HBM bytes and custom calls per
  chip. Returns {"program": {...}, "loops": {while name: {... per iteration}}}."""
  keys = ("flops", "bytes", "custom_calls")
  program = dict.fromkeys(keys, 0.0)
  per_loop = collections.defaultdict(lambda: dict.fromkeys(keys, 0.0))
  types_cache = {}
  for comp, inst, mult, loop, fused in visits:
    if comp.name not in types_cache:
      types_cache[comp.name] = comp.types()
    types = types_cache[comp.name]
    add = {"flops": flops(inst, types) * mult,
           "bytes": 0.0 if fused else traffic(inst, types, comps) * mult,
           "custom_calls": float(mult) if inst.opcode == "custom-call" else 0.0}
    if not any(add.values()):
      continue
    for k in keys:
      program[k] += add[k]
    for name in hlo.loop_chain(loops, loop):
      for k in keys:
        per_loop[name][k] += add[k]
  out = {}
  for name, lp in loops.items():
    iterations = max(lp.entries * lp.trips, 1)
    out[name] = {k: per_loop[name][k] / iterations for k in keys}
  return {"program": program, "loops": out}


def physical_dims(coords: Optional[Sequence]) -> int:
  """Number of physical dimensions of the slice that have more than one chip."""
  if not coords:
    return 1
  return sum(len({tuple(c)[i] for c in coords}) > 1 for i in range(len(coords[0]))) or 1


def group_fraction(groups: Optional[list], coords: Optional[Sequence]) -> float:
  """Share of a chip's ICI links a collective over ``groups`` can use (module docstring)."""
  if not coords or not groups:
    return 1.0
  total = physical_dims(coords)
  spanned = 0
  for g in groups:
    pts = [coords[i] for i in g if i < len(coords)]
    if len(pts) > 1:
      spanned = max(spanned, sum(len({tuple(p)[i] for p in pts}) > 1
                                 for i in range(len(pts[0]))))
  return max(spanned, 1) / total


def ici_seconds(collectives, chip, coords=None) -> tuple:
  """(seconds per call, [(collective, its seconds per call)]) of ``collectives`` on ``chip``."""
  bw = chip.ici_bandwidth
  if not bw:
    return 0.0, {}
  total, per_collective = 0.0, []
  for c in collectives:
    s = c.wire_bytes * c.executions / (bw * group_fraction(c.groups, coords))
    total += s
    per_collective.append((c, s))
  return total, per_collective


def terms(compute_s: float, hbm_s: float, ici_s: float) -> dict:
  t = {"compute_s": compute_s, "hbm_s": hbm_s, "ici_s": ici_s}
  binds = max(t, key=t.get)
  return {**t, "bound_s": t[binds], "binds": binds[:-2], "serial_s": sum(t.values())}


def analyze(text: str, chip, coords=None, hints: Optional[dict] = None) -> dict:
  """Communication and the three-term model of one compiled program (per chip, from its HLO).

  Returns {"comm": ``comm.summarize`` with each loop's FLOPs, HBM bytes and three terms per
  iteration and per call, "hlo_costs": ``hlo_costs``["program"], "ici_s": seconds per call,
  "loops_bound_s": the sum of the outermost loops' bounds}. The planner takes the program's
  compute term from its analytic FLOPs (which include the Pallas kernels'), its HBM term from
  ``hlo_costs`` and its ICI term from here.
  """
  comps = hlo.parse_module(text)
  n = comm.num_partitions(text)
  visits, loops = hlo.walk(comps, hints)
  analysis = comm.Analysis(comm.collectives_of(visits, n), loops, n)
  summary = comm.summarize(analysis)
  costs = hlo_costs(comps, visits, loops)
  ici_total, per_collective = ici_seconds(analysis.collectives, chip, coords)
  ici_loop = collections.defaultdict(float)
  for c, s in per_collective:
    for name in analysis.loop_chain(c.loop):
      ici_loop[name] += s
  out_loops = {}
  for name, lp in loops.items():
    iterations = max(lp.entries * lp.trips, 1)
    cost = costs["loops"][name]
    per_iter = terms(cost["flops"] / chip.peak_flops, cost["bytes"] / chip.hbm_bandwidth,
                     ici_loop[name] / iterations)
    entry = summary["loops"][name]
    entry.update({"flops_per_iteration": cost["flops"], "hbm_bytes_per_iteration": cost["bytes"],
                  "custom_calls_per_iteration": cost["custom_calls"],
                  "time_per_iteration": per_iter,
                  "time_per_call": {k: (v * iterations if k.endswith("_s") else v)
                                    for k, v in per_iter.items()}})
    out_loops[name] = entry
  summary["loops"] = out_loops
  # Phases run one after another: the outermost loops' bounds add up (a tighter lower bound
  # than one max over the whole program when phases are bound by different terms).
  loops_bound = sum(lp["time_per_call"]["bound_s"] for lp in out_loops.values()
                    if lp["parent"] is None)
  return {"comm": summary, "hlo_costs": costs["program"], "ici_s": ici_total,
          "loops_bound_s": loops_bound}


def _size(b: float) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if b >= scale:
      return f"{b / scale:.3g} {unit}"
  return f"{b:.0f} B"


def _secs(s: float) -> str:
  return f"{s:.3g} s" if s >= 0.1 else f"{s * 1e3:.3g} ms"


def format_lines(report: dict) -> list:
  """Report lines: each program's three terms and collective bytes per call, its loops that
  communicate (trips, bytes per iteration, the binding term), the decode step, the step bound."""
  lines = ["time model (per chip; bound = the largest of compute, HBM and ICI) and collectives "
           "(operand bytes per chip):"]
  for name, p in report["programs"].items():
    t = p.get("time_model")
    if t is None:
      continue
    c = p["comm"]
    kinds = ", ".join(f"{k} {_size(v)}" for k, v in c["per_call_bytes"].items() if v)
    lines.append(f"  {name}: compute {_secs(t['compute_s'])}, HBM {_secs(t['hbm_s'])}, ICI "
                 f"{_secs(t['ici_s'])} -> {_secs(t['bound_s'])} ({t['binds']}-bound; its loops "
                 f"one after another: {_secs(t.get('loops_bound_s', 0.0))}); collectives "
                 f"{_size(c['per_call_total'])} per call ({kinds or 'none'})")
    for lname, lp in c["loops"].items():
      if not lp["per_iteration_total"]:
        continue
      ti = lp["time_per_iteration"]
      lines.append(f"    loop {lname} x{lp['trips']} ({lp['trip_source']}, entered "
                   f"{lp['entries']:g}x): {_size(lp['per_iteration_total'])} per iteration in "
                   f"{lp['collectives_per_iteration']:.0f} collectives; compute "
                   f"{_secs(ti['compute_s'])}, HBM {_secs(ti['hbm_s'])}, ICI "
                   f"{_secs(ti['ici_s'])} ({ti['binds']}-bound)  {lp['op_name'][-40:]}")
    if "decode_step" in p:
      d = p["decode_step"]
      lines.append(f"  decode step ({d['steps']} steps): {_size(d['collective_bytes_total'])} of "
                   f"collectives per chip per step, {_secs(d['time']['bound_s'])} "
                   f"({d['time']['binds']}-bound)")
  if "step_bound_s" in report:
    lines.append(f"lower bound per UniGRPO step (sum of the programs' bounds): "
                 f"{_secs(report['step_bound_s'])}")
  return lines
