"""In-process parts of unigrpo_jax.distributed and of multi-host checkpointing (8 CPU devices)."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from unigrpo_jax import checkpointing, distributed, parallel


def test_checkpoint_restores_onto_a_different_mesh_shape(tmp_path):
  saved_mesh = parallel.make_mesh(8, 1, 1)
  x = np.arange(64, dtype=np.float32).reshape(8, 8)
  state = {"w": distributed.global_array(NamedSharding(saved_mesh, P("data")), x),
           "step": distributed.global_array(parallel.replicated(saved_mesh), np.int32(3))}
  distributed.assert_global(state, "state ")
  ckpt = checkpointing.RunCheckpointer(str(tmp_path), async_save=False)
  ckpt.save(3, state, {"data_iter": [{"next_index": 3}], "num_processes": 1})
  ckpt.close()
  new_mesh = parallel.make_mesh(2, 1, 4)
  target = {"w": jax.ShapeDtypeStruct((8, 8), np.float32,
                                      sharding=NamedSharding(new_mesh, P(None, "tensor"))),
            "step": jax.ShapeDtypeStruct((), np.int32, sharding=parallel.replicated(new_mesh))}
  ckpt = checkpointing.RunCheckpointer(str(tmp_path), async_save=False)
  restored, host = ckpt.restore(3, target)
  ckpt.close()
  assert restored["w"].sharding == target["w"].sharding
  np.testing.assert_array_equal(np.asarray(restored["w"]), x)
  assert int(restored["step"]) == 3 and host["data_iter"] == [{"next_index": 3}]


def test_assert_global_names_a_host_local_leaf():
  with pytest.raises(ValueError, match=r"state \['n'\] is not a global array"):
    distributed.assert_global({"n": jax.device_put(np.int32(1), jax.devices()[0])}, "state ")


def test_local_rows_reads_this_process_block():
  mesh = parallel.make_mesh(2, 1, 4)
  x = np.arange(24, dtype=np.float32).reshape(8, 3)
  arr = distributed.global_array(parallel.batch_sharding(mesh), x)
  np.testing.assert_array_equal(distributed.local_rows(arr, 2, 6), x[2:6])
  assert distributed.process_block(8) == (0, 8)  # one process: all rows


@pytest.mark.parametrize("fields, message", [
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"},
     "distributed.process_id=2"),
    ({"num_processes": 0}, "distributed.num_processes=0"),
    ({"num_processes": 2}, "needs distributed.coordinator_address"),
    ({"coordinator_address": "nohost"}, "coordinator_address='nohost'"),
    ({"barrier_timeout_s": 0}, "distributed.barrier_timeout_s=0"),
])
def test_distributed_config_errors_name_the_value(fields, message):
  with pytest.raises(distributed.DistributedError, match=message):
    distributed.DistributedConfig(**fields).validate()


def test_exchange_and_barrier_are_local_with_one_process():
  assert distributed.exchange("x", {"a": 1}) == [{"a": 1}]
  np.testing.assert_array_equal(distributed.allgather_rows(np.ones((2, 3)), "r"), np.ones((2, 3)))
  distributed.barrier("nothing to wait for")
  distributed.check_same_everywhere("value", 3)
