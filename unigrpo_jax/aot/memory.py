"""What a compiled program needs per chip: XLA's memory and cost analyses, and its largest buffers.

``compiled.memory_analysis()`` and ``cost_analysis()`` describe ONE device's share of an SPMD
program (checked: the FLOPs of a batch-split matmul drop 4x from 2 to 8 chips). XLA's cost analysis
counts a while/scan loop's body once, whatever its trip count.
"""
from __future__ import annotations

import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
# "%name = f32[8,4096,128]{...} opcode(...), ... metadata={op_name="jit(f)/..." ...}"
_HLO_VALUE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]\S*\s+([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def memory_stats(compiled) -> dict:
  """Bytes per chip: arguments, outputs, temporaries, aliased (outputs reusing donated inputs),
  generated code, XLA's own peak estimate ``xla_peak``, and ``total``: the larger of
  ``arguments + outputs + temporaries - aliased`` (the bound MaxText reports) and ``xla_peak``
  (on TPU, small programs report 0 temporaries but a larger peak: take the conservative one)."""
  m = compiled.memory_analysis()
  out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
         "temporaries": int(m.temp_size_in_bytes), "aliased": int(m.alias_size_in_bytes),
         "code": int(m.generated_code_size_in_bytes),
         "xla_peak": int(getattr(m, "peak_memory_in_bytes", 0) or 0)}
  out["total"] = max(out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"],
                     out["xla_peak"])
  return out


def cost_stats(compiled) -> dict:
  """XLA's per-chip ``flops`` and ``bytes accessed`` (loop bodies counted once)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def largest_values(hlo_text: str, top: int = 8) -> list[dict]:
  """The ``top`` largest array values of an optimized (per-chip) HLO module: name, shape, bytes,
  opcode and the JAX op that made it. Candidates for what to shard, remat or chunk."""
  found = {}
  for line in hlo_text.splitlines():
    m = _HLO_VALUE.match(line)
    if not m or m.group(2) not in _DTYPE_BYTES:
      continue
    name, dtype, dims, opcode = m.groups()
    if opcode in ("parameter", "get-tuple-element", "bitcast", "constant"):
      continue  # arguments are listed separately; views alias their source
    size = _DTYPE_BYTES[dtype]
    for d in filter(None, dims.split(",")):
      size *= int(d)
    op = _OP_NAME.search(line)
    found[name] = {"shape": f"{dtype}[{dims}]", "bytes": size, "opcode": opcode,
                   "op_name": op.group(1) if op else ""}
  ranked = sorted(found.items(), key=lambda kv: -kv[1]["bytes"])[:top]
  return [{"name": k, **v} for k, v in ranked]


def largest_arguments(abstract_args, top: int = 5) -> list[dict]:
  """The ``top`` largest per-chip argument shards (path, global shape, shard bytes)."""
  import jax
  rows = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_args):
    sharding = getattr(leaf, "sharding", None)
    shard = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    size = getattr(leaf.dtype, "itemsize", 0) or 0  # PRNG key dtypes may have none
    for d in shard:
      size *= d
    rows.append({"path": jax.tree_util.keystr(path), "shape": list(leaf.shape),
                 "dtype": str(leaf.dtype), "bytes": int(size)})
  return sorted(rows, key=lambda r: -r["bytes"])[:top]


# TPU compiles refuse programs that cannot fit: "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the
# total memory required for HLO temporaries (15.79G) exceeds available HBM (15.75G)." (G = GiB).
_OOM = re.compile(r"required[^(]*\(([\d.]+)([KMGT]?)i?B?\)[^(]*available HBM \(([\d.]+)([KMGT]?)")
_UNIT = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def parse_oom(message: str) -> dict:
  """The compiler's out-of-memory message -> {"required": bytes, "available": bytes} (either
  None when the message does not say)."""
  m = _OOM.search(message)
  if not m:
    return {"required": None, "available": None}
  return {"required": int(float(m.group(1)) * _UNIT[m.group(2)]),
          "available": int(float(m.group(3)) * _UNIT[m.group(4)])}
