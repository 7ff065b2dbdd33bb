"""Mesh construction, logical-axis rules and sharded model creation (8 fake CPU devices)."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from unigrpo_jax import parallel as par
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.models.unified.config import get_preset


def test_fake_devices():
  assert len(jax.devices()) == 8


@pytest.mark.parametrize("shape,expected", [
    ((-1, 1, 1), (8, 1, 1)),
    ((-1, 2, 2), (2, 2, 2)),
    ((2, -1, 1), (2, 4, 1)),
    ((1, 2, -1), (1, 2, 4)),
    ((2, 2, 2), (2, 2, 2)),
])
def test_make_mesh_fill(shape, expected):
  mesh = par.make_mesh(*shape)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape[a] for a in mesh.axis_names) == expected
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_default_and_subset():
  assert par.make_mesh().devices.size == 8
  one = par.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  assert one.devices.size == 1 and one.devices.flat[0] == jax.devices()[0]
  assert par.make_mesh(-1, 2, 1, devices=jax.devices()[:4]).shape["data"] == 2


@pytest.mark.parametrize("shape,match", [
    ((3, 1, 1), "3 slots but there are 8 devices"),
    ((2, 2, 1), "4 slots but there are 8 devices"),
    ((-1, 3, 1), "do not divide the 8 devices"),
    ((-1, -1, 1), "at most one axis may be -1"),
    ((0, 1, 1), "MeshConfig.data"),
    ((1, 1, -2), "MeshConfig.tensor"),
])
def test_make_mesh_errors(shape, match):
  with pytest.raises(ValueError, match=match):
    par.make_mesh(*shape)


def test_logical_rules_map_names():
  mesh = par.make_mesh(2, 2, 2)
  rules = par.DEFAULT_RULES
  spec = lambda s, shape=None: par.logical_to_mesh_spec(P(*s), rules, mesh, shape)
  assert spec(("vocab", "embed"), (192, 64)) == P("tensor", "fsdp")
  assert spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert spec(("heads", "head_dim", "embed")) == P("tensor", None, "fsdp")
  assert spec(("batch",)) == P(("data", "fsdp"))
  assert spec(("norm",)) == P()
  assert spec(("latent", "embed")) == P(None, "fsdp")
  assert spec((None, "embed")) == P(None, "fsdp")
  assert spec(("unknown_name",)) == P()
  # A mesh axis is used at most once per array: the second 'embed' is replicated.
  assert spec(("embed", "embed")) == P("fsdp")
  # 'batch' uses fsdp, so 'embed' on the same array cannot.
  assert spec(("batch", "embed")) == P(("data", "fsdp"))


def test_non_divisible_dims_replicate():
  mesh = par.make_mesh(1, 2, 4)
  rules = par.DEFAULT_RULES
  # Tiny model: kv_heads=2 on tensor=4 -> replicated; embed=64 on fsdp=2 -> sharded.
  assert par.logical_to_mesh_spec(P("embed", "kv_heads", "head_dim"), rules, mesh,
                                  (64, 2, 16)) == P("fsdp")
  assert par.logical_to_mesh_spec(P("embed", "heads", "head_dim"), rules, mesh,
                                  (64, 4, 16)) == P("fsdp", "tensor")
  # 6 rows over batch axes of size 2 * 4 = 8? here data*fsdp = 2: divisible.
  assert par.logical_to_mesh_spec(P("batch"), rules, mesh, (6,)) == P("fsdp")
  mesh2 = par.make_mesh(2, 2, 2)
  assert par.logical_to_mesh_spec(P("batch"), rules, mesh2, (6,)) == P()  # 6 % 4 != 0
  # Axes of size 1 shard nothing and are dropped.
  mesh8 = par.make_mesh(8, 1, 1)
  assert par.logical_to_mesh_spec(P("vocab", "embed"), rules, mesh8, (192, 64)) == P()


def test_rules_override_and_validation():
  rules = par.normalize_rules([("embed", None), ("mlp", ["fsdp", "tensor"]), ("vocab", [])])
  assert dict(rules) == {"embed": None, "mlp": ("fsdp", "tensor"), "vocab": None}
  mesh = par.make_mesh(2, 2, 2)
  assert par.logical_to_mesh_spec(P("embed", "mlp"), rules, mesh, (64, 128)) == P(
      None, ("fsdp", "tensor"))
  assert par.normalize_rules(None) == par.DEFAULT_RULES
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    par.normalize_rules([("embed", "model")])
  # First rule wins (flax convention): overrides + defaults overrides the defaults.
  merged = dict(par.normalize_rules([("embed", None)] + list(par.DEFAULT_RULES)))
  assert merged["embed"] is None and merged["mlp"] == "tensor"
  assert dict(par.merge_rules([("vocab", "fsdp")]))["vocab"] == "fsdp"
  assert par.merge_rules(None) == par.DEFAULT_RULES
  with pytest.raises(ValueError, match="must be"):
    par.normalize_rules([("embed",)])


def test_create_sharded_model_matches_unsharded():
  cfg = get_preset("tiny")
  mesh = par.make_mesh(1, 2, 4)
  fast = {"xla_backend_optimization_level": 0}  # compiles dominate; values are exact anyway
  graphdef, state = par.create_sharded_model(cfg, 0, mesh, model_fn=UnifiedModel, compiler_options=fast)
  # Same seed on one device: the sharded init must give the same values, bit for bit
  # (partitionable threefry: random bits do not depend on the sharding).
  _, ref = par.create_sharded_model(cfg, 0, par.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                                    model_fn=UnifiedModel,
                                    compiler_options=fast)
  specs = {}
  for (path, leaf), (_, ref_leaf) in zip(jax.tree_util.tree_leaves_with_path(state),
                                         jax.tree_util.tree_leaves_with_path(ref)):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref_leaf))
    specs[jax.tree_util.keystr(path)] = leaf.sharding.spec
  assert specs["['embed'].value"] == P("tensor", "fsdp")
  assert specs["['layers'][0]['und']['q'].value"] == P("fsdp", "tensor")
  assert specs["['layers'][0]['gen']['k'].value"] == P("fsdp")  # kv_heads=2, tensor=4
  assert specs["['layers'][1]['gen']['mlp']['down'].value"] == P("tensor", "fsdp")
  assert specs["['gen_norm']['scale'].value"] == P()  # 'norm' -> replicated
  # The graphdef rebuilds the model from the sharded state.
  model = nnx.merge(graphdef, state)
  assert model.cfg == cfg


def test_batch_sharding():
  mesh = par.make_mesh(2, 2, 2)
  sh = par.batch_sharding(mesh)
  assert sh.spec == P(("data", "fsdp"))
  assert par.batch_parallelism(mesh) == 4
  x = jax.device_put(np.zeros((8, 3), np.float32), sh)
  assert len({str(s.index) for s in x.addressable_shards}) == 4
