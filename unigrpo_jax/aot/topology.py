"""Cloud TPU accelerator types -> compile-only devices, and each chip's limits.

A Cloud TPU accelerator type (``v4-64``, ``v5p-128``, ``v5litepod-16`` / ``v5e-16``, ``v6e-64``)
names a slice. v4 and v5p names count TensorCores, two per chip (one megacore = one JAX device),
so ``v5p-128`` is 64 chips in a 4x4x4 torus; v5e and v6e names count chips (one core each). The
physical shapes below follow the Cloud TPU docs' slice tables (cloud.google.com/tpu/docs/v4,
/v5p, /v5e, /v6e); MaxText's ``accelerator_to_spec_map.py`` uses the same ones.

``devices(name)`` asks libtpu (the ``tpu`` extra) for the slice's devices: they can compile
(``jax.jit(...).lower(...).compile()``) but never run, so no TPU is needed.
"""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip's limits.

  hbm_bytes: HBM the compiler lets a program use (from its out-of-memory message
    "exceeds available HBM (X)", measured on this project's CPU machine with libtpu 0.0.42.1;
    see docs/aot.md); slightly below the marketed size.
  peak_flops: dense bf16 matmul FLOP/s per chip; hbm_bandwidth: bytes/s per chip. Both are the
    Cloud TPU documentation's system-architecture figures (cloud.google.com/tpu/docs/v4: 275
    TFLOP/s, 1200 GB/s; /v5e: 197 TFLOP/s, 819 GB/s; /v5p-training: 459 TFLOP/s, 2765 GB/s;
    /v6e: 918 TFLOP/s, 1640 GB/s).
  ici_bandwidth: bytes/s one chip sends over all its inter-chip links together (one direction):
    half the Cloud TPU docs' "bidirectional ICI bandwidth per chip" (cloud.google.com/tpu/docs/
    v5p: 1200 GBps; /v5e: 400 GBps, also "1600 Gbps"; /v6e: 800 GBps). The v4 page gives no
    per-chip figure, only "all-reduce bandwidth per Pod 1.1 PB/s" for 4096 chips: 268.6 GB/s
    per chip. The same per-pod figure over the pod's chips gives exactly the halved per-chip one
    for v5e (51.2 TB/s / 256 = 200 GB/s) and v6e (102.4 TB/s / 256 = 400 GB/s).
  """
  generation: str
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float
  ici_bandwidth: float = 0.0


_GIB = 2 ** 30
CHIPS = {
    "v4": Chip("v4", int(30.75 * _GIB), 275e12, 1200e9, 1.1e15 / 4096),
    "v5p": Chip("v5p", int(95.74 * _GIB), 459e12, 2765e9, 600e9),
    "v5e": Chip("v5e", int(15.75 * _GIB), 197e12, 819e9, 200e9),
    "v6e": Chip("v6e", int(31.25 * _GIB), 918e12, 1640e9, 400e9),
}

# Chips -> physical shape. 3-D tori (v4, v5p) wrap around once every side is >= 4 chips.
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16)}
# 2-D slices (v5e, v6e): only the full 16-wide rows/columns wrap.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
# Accelerator-name prefix -> (chip generation, libtpu topology prefix, cores per chip).
_FAMILIES = {"v4": ("v4", "v4", 2), "v5p": ("v5p", "v5", 2), "v5e": ("v5e", "v5e", 1),
             "v5litepod": ("v5e", "v5e", 1), "v6e": ("v6e", "v6e", 1)}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice: ``name`` as given, ``chip`` limits, ``num_chips`` JAX devices, libtpu arguments."""
  name: str
  chip: Chip
  num_chips: int
  topology_name: str  # e.g. "v5:4x4x4"
  chip_config_name: str
  chips_per_host_bounds: tuple
  wrap: tuple


def known_names() -> list[str]:
  names = []
  for family, (gen, _, cores) in _FAMILIES.items():
    shapes = _SHAPES_3D if cores == 2 else _SHAPES_2D
    names += [f"{family}-{chips * cores}" for chips in shapes]
  return names


def parse(name: str) -> Topology:
  """``v5p-128`` -> Topology; an unknown name raises ValueError listing the known ones."""
  family, _, count = name.partition("-")
  if family not in _FAMILIES or not count.isdigit():
    raise ValueError(f"unknown topology {name!r}; known: {', '.join(known_names())}")
  gen, prefix, cores = _FAMILIES[family]
  if int(count) % cores:
    raise ValueError(f"unknown topology {name!r}: {family} names count TensorCores, {cores} "
                     f"per chip; known: {', '.join(known_names())}")
  chips = int(count) // cores
  if cores == 2:
    shape = _SHAPES_3D.get(chips)
    wrap = (min(shape) >= 4,) * 3 if shape else None
    config, host = "megacore", (2, 2, 1)
  else:
    shape = _SHAPES_2D.get(chips)
    wrap = (shape[0] >= 16, shape[1] >= 16, False) if shape else None
    config, host = "default", (1, 1, 1) if chips == 1 else (2, 2, 1)
  if shape is None:
    raise ValueError(f"unknown topology {name!r}; known: {', '.join(known_names())}")
  return Topology(name, CHIPS[gen], chips, f"{prefix}:{'x'.join(map(str, shape))}", config,
                  host, wrap)


def devices(topo: Topology) -> list:
  """The slice's compile-only devices (needs libtpu: ``pip install -e ".[tpu]"``).

  Raises RuntimeError with the install hint when libtpu is missing or cannot load.
  """
  # libtpu otherwise queries a GCE metadata server (absent off Cloud TPU VMs) and refuses to
  # load while another process holds it (compile-only use is safe to share): MaxText's CPU CI
  # sets the same two variables.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "true")
  from jax.experimental import topologies
  try:
    desc = topologies.get_topology_desc(
        topology_name=topo.topology_name, platform="tpu", chip_config_name=topo.chip_config_name,
        chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=1, wrap=topo.wrap)
  except Exception as e:  # missing or broken libtpu: say which, with the fix
    raise RuntimeError(f"cannot build TPU topology {topo.topology_name} ({topo.name}): "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                       "(install libtpu with: pip install -e \".[tpu]\")") from e
  devs = list(desc.devices)
  if len(devs) != topo.num_chips:
    raise RuntimeError(f"libtpu gave {len(devs)} devices for {topo.name}, expected "
                       f"{topo.num_chips}")
  return devs
