"""``abstract_model``: the structure ``nnx.eval_shape`` gives, built without tracing."""
import jax
import pytest
from flax import nnx

from unigrpo_jax.models.unified import layers
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.models.unified.model import UnifiedModel, abstract_model


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_abstract_model_matches_eval_shape(scan_layers, lora_rank):
  cfg = get_preset("shapes").replace(scan_layers=scan_layers, lora_rank=lora_rank)
  traced_graph, traced = nnx.split(nnx.eval_shape(lambda: UnifiedModel(cfg, nnx.Rngs(0))))
  graph, state = nnx.split(abstract_model(cfg))
  assert graph == traced_graph
  flat, traced_flat = nnx.to_flat_state(state), nnx.to_flat_state(traced)
  assert [p for p, _ in flat] == [p for p, _ in traced_flat]
  for (path, var), (_, traced_var) in zip(flat, traced_flat):
    assert type(var) is type(traced_var), path  # Param / LoRAParam
    assert var.get_metadata() == traced_var.get_metadata(), path  # logical axes
  assert jax.tree.leaves(state) == jax.tree.leaves(traced)  # ShapeDtypeStructs, equal


def test_abstract_mode_ends_with_its_block_even_on_error():
  with pytest.raises(RuntimeError):
    with layers.abstract_params():
      raise RuntimeError("boom")
  param = layers.annotated_param(nnx.Rngs(0), layers.ones_init, (2,), ("norm",), "float32")
  assert isinstance(param[...], jax.Array) and float(param[...].sum()) == 2.0
