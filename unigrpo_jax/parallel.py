"""Device mesh and logical-axis sharding rules.

The model annotates every parameter with *logical* axis names (``vocab``, ``embed``, ``mlp``,
``heads``, ``kv_heads``, ``head_dim``, ``latent``, ``norm``; see ``models/unified/layers.py``). A list of
rules maps each logical name onto zero, one or several *mesh* axes of a 3-D mesh
``("data", "fsdp", "tensor")``:

* ``data``: pure data parallelism (params replicated, batch split);
* ``fsdp``: the batch is split AND the params are split along ``embed`` (ZeRO-3 style);
* ``tensor``: Megatron-style split of heads / MLP / vocab.

Arrays whose leading axis is the batch (the rollout Trajectory, advantages) are split over
``("data", "fsdp")``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

MeshAxes = Union[None, str, tuple[str, ...]]
Rules = tuple[tuple[str, MeshAxes], ...]

# Logical name -> mesh axis (or axes, or None = replicated). Names not listed are replicated.
DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    # The untied LM head [D, V] has names of its own so a config can shard it apart from the
    # other weights (e.g. its vocabulary over fsdp, so the logits never gather the whole head).
    ("head_embed", "fsdp"),
    ("head_vocab", "tensor"),
    ("lora_rank", "fsdp"),  # LoRA adapters' rank axis, where the other axis is not on fsdp
    ("head_dim", None),
    ("latent", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; at most one axis may be -1 (filled with the remaining devices)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    for name in MESH_AXES:
      size = getattr(self, name)
      if size != -1 and size < 1:
        raise ValueError(f"MeshConfig.{name} must be -1 or >= 1, got {size}")
    if sum(getattr(self, n) == -1 for n in MESH_AXES) > 1:
      raise ValueError(f"MeshConfig: at most one axis may be -1, got {self}")


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Fills the one -1 axis and checks that the product is ``num_devices``."""
  MeshConfig(data, fsdp, tensor)  # validates values and the single -1
  shape = [data, fsdp, tensor]
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): the fixed axes "
                       f"(product {known}) do not divide the {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}) has "
                     f"{math.prod(shape)} slots but there are {num_devices} devices")
  return tuple(shape)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: all devices).

  Axis types are Auto (sharding is propagated by the compiler; the code never relies on
  explicit-sharding types). Raises ValueError if the shape does not match the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
  # Mesh over an explicit device list (jax.make_mesh only takes a device count prefix).
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(cfg: MeshConfig, devices=None) -> Mesh:
  return make_mesh(cfg.data, cfg.fsdp, cfg.tensor, devices)


def normalize_rules(rules: Optional[Iterable[Sequence[Any]]]) -> Rules:
  """Validates rules given as (logical, mesh_axes) pairs (e.g. from a config list).

  ``mesh_axes`` may be None, a mesh-axis name or a list/tuple of names. As in flax/maxtext, the
  FIRST rule naming a logical axis wins, so ``overrides + DEFAULT_RULES`` overrides defaults;
  later rules for the same name are dropped. Raises ValueError on an unknown mesh axis or a
  malformed pair. ``None`` gives ``DEFAULT_RULES``.
  """
  if rules is None:
    return DEFAULT_RULES
  out, seen = [], set()
  for pair in rules:
    if len(pair) != 2:
      raise ValueError(f"a sharding rule must be (logical_name, mesh_axes), got {pair!r}")
    name, axes = pair
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes) if axes else None
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"rule {name!r} -> {axes!r}: unknown mesh axis {a!r}; "
                         f"mesh axes are {MESH_AXES}")
    if name in seen:
      continue
    seen.add(name)
    out.append((str(name), axes))
  return tuple(out)


def merge_rules(overrides: Optional[Iterable[Sequence[Any]]], base: Rules = DEFAULT_RULES) -> Rules:
  """``overrides`` first, then every rule of ``base`` not overridden (validated)."""
  return normalize_rules(tuple(overrides or ()) + tuple(base))


def logical_to_mesh_spec(pspec: PartitionSpec, rules: Rules, mesh: Mesh,
                         shape: Optional[Sequence[int]] = None) -> PartitionSpec:
  """Maps a PartitionSpec of logical names to one of mesh axes.

  Per dimension, the rule's mesh axes are used only if (a) none of them is already used by an
  earlier dimension of the same array, and (b) with ``shape`` given, the dimension is divisible
  by the product of their sizes. Otherwise that dimension is REPLICATED (deterministically,
  never partially sharded): e.g. the tiny model's ``kv_heads=2`` on ``tensor=4`` is replicated.
  Mesh axes of size 1 are dropped (they shard nothing). Logical names without a rule, and None,
  are replicated.
  """
  table = dict(rules)
  used: set[str] = set()
  out = []
  for dim, name in enumerate(tuple(pspec)):
    axes = table.get(name) if isinstance(name, str) else None
    if axes is None:
      out.append(None)
      continue
    axes = axes if isinstance(axes, tuple) else (axes,)
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if (not axes or used.intersection(axes)
        or (shape is not None and shape[dim] % size)):
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  while out and out[-1] is None:  # canonical form: P('a') rather than P('a', None)
    out.pop()
  return PartitionSpec(*out)


def state_shardings(abstract_state, mesh: Mesh, rules: Optional[Rules] = None):
  """nnx.State (abstract or concrete) -> same-structure pytree of NamedSharding.

  Leaves without logical names (e.g. the constant position table) are replicated.
  """
  rules = normalize_rules(rules)
  logical = nnx.get_partition_spec(abstract_state)
  return jax.tree.map(
      lambda spec, leaf: NamedSharding(mesh, logical_to_mesh_spec(spec, rules, mesh, leaf.shape)),
      logical, abstract_state, is_leaf=lambda x: isinstance(x, PartitionSpec))


def create_sharded_model(cfg, seed: int, mesh: Mesh, rules: Optional[Rules] = None, *,
                         model_fn: Callable, compiler_options=None):
  """Builds ``model_fn(cfg, nnx.Rngs(seed))`` (e.g. ``UnifiedModel``) directly in its final sharding.

  Returns ``(graphdef, state)``: ``state`` is the FULL model state (Params plus the constant
  non-param Variables, if any), so ``nnx.merge(graphdef, state)`` rebuilds the model. The init
  runs under ``jax.jit(out_shardings=...)`` so no device ever holds an unsharded copy.
  ``model_fn`` is a parameter so that this module knows no model; ``compiler_options`` go to
  that jit.
  """
  def init():
    return nnx.split(model_fn(cfg, nnx.Rngs(seed)))[1]

  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_fn(cfg, nnx.Rngs(seed))))
  shardings = state_shardings(abstract, mesh, rules)
  state = jax.jit(init, out_shardings=shardings, compiler_options=compiler_options)()
  return graphdef, state


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of [B, ...] arrays: batch over ("data", "fsdp"), other dims replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def rows_sharding(mesh: Mesh, rows: int) -> NamedSharding:
  """Sharding of a [rows, ...] input: split over the batch axes when they divide ``rows``, else
  replicated (e.g. 32 prompts on 64 chips: the rollout splits the rows after the group repeat)."""
  return batch_sharding(mesh) if rows % batch_parallelism(mesh) == 0 else replicated(mesh)


def batch_parallelism(mesh: Mesh) -> int:
  """Number of batch shards (data * fsdp); batch sizes must be multiples of it."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# The rollout's decode loop runs on a second mesh over the same devices (``decode_mesh``): rows
# split over groups of ``tensor`` chips, and inside each group the understanding expert's heads,
# MLP and vocabulary split Megatron-style. Every other logical axis is replicated in a group.
DECODE_AXES = ("rows", "model")
DECODE_RULES: Rules = (("heads", "model"), ("kv_heads", "model"), ("mlp", "model"),
                       ("vocab", "model"), ("head_vocab", "model"))


def decode_mesh(mesh: Mesh, tensor: int) -> Mesh:
  """``("rows", "model")`` mesh of ``mesh``'s devices in their order, ``tensor`` consecutive
  devices per row group. Row group g holds rows [g B / G, (g + 1) B / G) of a batch of B rows
  (G = devices / tensor), which the ``tensor`` chips of group g already held between them in the
  trainer's batch sharding: moving to this layout moves rows only inside a group."""
  devices = np.asarray(mesh.devices).reshape(-1)
  if tensor < 1 or devices.size % tensor:
    raise ValueError(f"decode tensor parallelism {tensor} does not divide the {devices.size} "
                     "devices")
  return Mesh(devices.reshape(-1, tensor), DECODE_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 2)


def auto_decode_tensor(mesh: Mesh, rows: int, num_heads: int, num_kv_heads: int,
                       largest: int = 8) -> int:
  """The decode loop's group size: the largest of ``largest``, ..., 4, 2 that divides the query
  and key/value heads and the devices, with ``rows`` divisible by the number of groups; 1 (the
  trainer's own layout) when none does, or when the mesh already has a tensor axis."""
  if mesh.shape.get("tensor", 1) > 1:
    return 1
  n = mesh.devices.size
  t = largest
  while t > 1:
    if not (num_heads % t or num_kv_heads % t or n % t or rows % (n // t)):
      return t
    t //= 2
  return 1
