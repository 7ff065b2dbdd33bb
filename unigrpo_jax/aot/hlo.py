"""A small reader of optimized (partitioned, per-chip) HLO text: ``compiled.as_text()``.

It knows what the AOT report needs and no more: computations and their instructions (name,
result type, opcode, operands, attributes), which computations each instruction calls (while
body / condition, fusion, call, async wrappers, conditional branches, reducers), and how many
times each computation runs per call of the program, loops' trip counts included.

Trip count of a ``while``, in order of preference:
1. XLA's ``known_trip_count`` in the while's ``backend_config`` (scans and fori_loops on CPU;
   the TPU compiler does not print it); source ``"known_trip_count"``;
2. ``hints``: the caller's own knowledge, keyed by the loop condition's bound (the constant its
   counter is compared against, e.g. a decode window's last step); source ``"hint"``;
3. the bound of the loop condition (``counter < c``) minus XLA's ``known_init_step`` init when it
   has one (else c: an upper bound); source ``"condition_bound"``;
4. otherwise 1, source ``"unknown"``.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Optional

DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_NAME = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_CALLED = re.compile(r"\b(condition|body|calls|to_apply|true_computation|false_computation)="
                     r"%?([\w.\-]+)")
_CALLED_LIST = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


_ARRAY_LAYOUT = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\](\{[^}]*\})?")


def array_bytes(type_str: str, hbm_only: bool = False) -> int:
  """Bytes of every array in a (possibly tuple) HLO type string, e.g. ``(s32[], f32[8,4])``.
  ``hbm_only``: skip arrays placed in another memory space (a layout with ``S(n)``, n > 0: on
  TPU the on-chip VMEM / CMEM buffers XLA prefetches weights into)."""
  total = 0
  for dtype, dims, layout in _ARRAY_LAYOUT.findall(type_str):
    if dtype not in DTYPE_BYTES:
      continue
    if hbm_only and re.search(r"S\([1-9]\d*\)", layout or ""):
      continue
    size = DTYPE_BYTES[dtype]
    for d in filter(None, dims.split(",")):
      size *= int(d)
    total += size
  return total


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at ``text[start]`` ('(' or '{')."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  stack = []
  for i in range(start, len(text)):
    c = text[i]
    if c in pairs:
      stack.append(pairs[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  return len(text)


@dataclasses.dataclass
class Instruction:
  name: str
  type: str  # result type, e.g. "f32[8,4]{1,0}" or "(s32[], f32[8])"
  opcode: str
  operands: list  # names of the operand values (without '%')
  args: str  # the raw text between the opcode's parentheses (a constant's value, ...)
  attrs: str  # everything after the operand list
  called: list  # (role, computation name): role in condition/body/calls/to_apply/branch/...
  is_root: bool = False

  @property
  def op_name(self) -> str:
    m = _OP_NAME.search(self.attrs)
    return m.group(1) if m else ""

  def backend_config(self) -> dict:
    i = self.attrs.find("backend_config=")
    if i < 0 or self.attrs[i + 15:i + 16] != "{":
      return {}
    j = _balanced(self.attrs, i + 15)
    try:
      return json.loads(self.attrs[i + 15:j])
    except ValueError:
      return {}


@dataclasses.dataclass
class Computation:
  name: str
  is_entry: bool
  instructions: list
  params: dict  # parameter name -> type (from the header)

  def types(self) -> dict:
    out = dict(self.params)
    out.update({i.name: i.type for i in self.instructions})
    return out


def parse_instruction(line: str) -> Optional[Instruction]:
  m = _NAME.match(line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith("("):  # tuple type
    end = _balanced(rest, 0)
  else:
    end = rest.find(" ")
    end = len(rest) if end < 0 else end
  type_str, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  close = _balanced(rest, op.end() - 1)
  args = rest[op.end():close - 1]
  operands = re.findall(r"%([\w.\-]+)", args)
  attrs = rest[close:]
  called = [(role, name) for role, name in _CALLED.findall(attrs)]
  for role, names in _CALLED_LIST.findall(attrs):
    called += [(role, n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
  return Instruction(m.group(2), type_str, op.group(1), operands, args, attrs, called,
                     bool(m.group(1)))


def parse_module(text: str) -> dict:
  """HLO module text -> {computation name: Computation} (the entry has ``is_entry``).

  A computation ends at a line that is exactly ``}``; a line that does not start a new
  instruction continues the previous one (custom calls print multi-line backend configs)."""
  comps, current, raw = {}, None, []

  def close():
    for line in raw:
      inst = parse_instruction(line)
      if inst is not None:
        current.instructions.append(inst)
    comps[current.name] = current

  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        header_params = line[line.find("(") + 1:line.rfind("->")]
        params = dict(re.findall(r"([\w.\-]+):\s*(\([^)]*\)|[^,()]+)", header_params))
        current, raw = Computation(m.group(2), bool(m.group(1)), [], params), []
      continue
    if line.rstrip() == "}":
      close()
      current = None
    elif _NAME.match(line) or not raw:
      raw.append(line)
    else:
      raw[-1] += "\n" + line
  return comps


def entry(comps: dict) -> Computation:
  for c in comps.values():
    if c.is_entry:
      return c
  raise ValueError("HLO text has no ENTRY computation")


def _constants(comp: Computation) -> dict:
  out = {}
  for i in comp.instructions:
    if i.opcode == "constant" and re.fullmatch(r"[su]\d+\[\]", i.type.split("{")[0]):
      m = re.fullmatch(r"\s*(-?\d+)\s*", i.args)
      if m:
        out[i.name] = int(m.group(1))
  return out


def condition_bound(comps: dict, cond_name: str) -> Optional[int]:
  """The constant c of the loop condition's ``counter < c`` (LT; ``<= c`` gives c + 1), looked
  for in the condition and the fusions it calls; None when there is no such compare."""
  cond = comps.get(cond_name)
  if cond is None:
    return None
  consts = _constants(cond)
  for inst in cond.instructions:
    if inst.opcode == "compare":
      bound = _compare_bound(inst, consts)
      if bound is not None:
        return bound
    if inst.opcode == "fusion":
      for _, callee in inst.called:
        fused = comps.get(callee)
        if fused is None:
          continue
        # Fusion parameters map positionally to the fusion's operands.
        params = [i for i in fused.instructions if i.opcode == "parameter"]
        inner = dict(_constants(fused))
        for p in params:
          idx = re.match(r"\s*(\d+)", p.args)
          k = int(idx.group(1)) if idx else None
          if k is not None and k < len(inst.operands) and inst.operands[k] in consts:
            inner[p.name] = consts[inst.operands[k]]
        for f in fused.instructions:
          if f.opcode == "compare":
            bound = _compare_bound(f, inner)
            if bound is not None:
              return bound
  return None


def _compare_bound(inst: Instruction, consts: dict) -> Optional[int]:
  d = re.search(r"direction=(\w+)", inst.attrs)
  if not d or len(inst.operands) != 2:
    return None
  a, b = inst.operands
  direction = d.group(1)
  if b in consts and direction in ("LT", "LE", "NE"):
    return consts[b] + (1 if direction == "LE" else 0)
  if a in consts and direction in ("GT", "GE", "NE"):
    return consts[a] + (1 if direction == "GE" else 0)
  return None


def trip_count(comps: dict, inst: Instruction, hints: Optional[dict] = None) -> tuple:
  """(trips, source, condition bound) of a ``while`` instruction (see the module docstring)."""
  cond = next((n for role, n in inst.called if role == "condition"), None)
  bound = condition_bound(comps, cond) if cond else None
  cfg = inst.backend_config()
  known = cfg.get("known_trip_count", {}).get("n")
  if known is not None:
    return int(known), "known_trip_count", bound
  if hints and bound is not None and bound in hints:
    return int(hints[bound]), "hint", bound
  if bound is not None:
    init = cfg.get("known_init_step", {}).get("init")
    return (bound - int(init) if init is not None else bound), "condition_bound", bound
  return 1, "unknown", bound


@dataclasses.dataclass
class Loop:
  """A ``while`` of the program: where it is, its enclosing loop, trips and entries per call."""
  name: str  # the while instruction
  computation: str  # where the while is
  body: str
  parent: Optional[str]  # enclosing loop
  trips: int
  trip_source: str
  bound: Optional[int]
  entries: float  # times the loop is entered per call
  op_name: str


# Ops whose ``calls=`` repeat the computation of their start op (visiting them double counts).
_NO_DESCEND = ("async-done", "async-update")


def walk(comps: dict, hints: Optional[dict] = None):
  """Visits every instruction reachable from the entry, with how often it runs per call.

  Returns ``(visits, loops)``: visits is a list of ``(computation, instruction, executions per
  call, innermost while name or None, inside_fusion)``; loops maps each while's name to its
  ``Loop``. A computation called from several places is visited once per call site.
  """
  visits, loops = [], {}

  def visit(name: str, mult: float, loop: Optional[str], fused: bool):
    comp = comps.get(name)
    if comp is None:
      return
    for inst in comp.instructions:
      visits.append((comp, inst, mult, loop, fused))
      if inst.opcode == "while":
        trips, source, bound = trip_count(comps, inst, hints)
        body = next((c for r, c in inst.called if r == "body"), None)
        cond = next((c for r, c in inst.called if r == "condition"), None)
        if inst.name in loops:
          loops[inst.name].entries += mult
        else:
          loops[inst.name] = Loop(inst.name, name, body, loop, trips, source, bound, mult,
                                  inst.op_name)
        if body:
          visit(body, mult * trips, inst.name, fused)
        if cond:
          visit(cond, mult * (trips + 1), inst.name, fused)
        continue
      if inst.opcode in _NO_DESCEND or inst.opcode.endswith("-done"):
        continue
      for role, callee in inst.called:
        visit(callee, mult, loop, fused or (inst.opcode == "fusion" and role == "calls"))

  visit(entry(comps).name, 1.0, None, False)
  return visits, loops


def loop_chain(loops: dict, loop: Optional[str]) -> list:
  """``loop`` and its enclosing loops, innermost first."""
  chain = []
  while loop is not None:
    chain.append(loop)
    loop = loops[loop].parent
  return chain
