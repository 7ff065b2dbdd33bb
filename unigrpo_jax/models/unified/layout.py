"""The two layouts of the layer stack's parameters, and conversions between them.

``scan_layers=False``: ``layers.<i>.<expert>.<name>``, one array per layer (nnx.List). This is
the layout on disk (our ``params.msgpack``, BAGEL's per-layer keys) and of the toy world.
``scan_layers=True``: ``layers.<expert>.<name>`` with a leading [num_layers] axis (one stacked
MoTLayer; ``unified.stack_layers``), what ``lax.scan`` runs over.

Loaders read the per-layer layout and convert; exporters convert back. The values are the same
(stacking is exact), so a run may switch layouts between checkpoints of the model weights (not
of the optimizer state: an orbax train-state checkpoint keeps the layout it was written in).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from unigrpo_jax.models.unified.config import ModelConfig
from unigrpo_jax.models.unified.model import UnifiedModel, abstract_model


def _stack(pure: dict, num_layers: int) -> dict:
  out = dict(pure)
  per_layer = [out["layers"][i] for i in range(num_layers)]
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return out


def _unstack(pure: dict, num_layers: int) -> dict:
  out = dict(pure)
  stacked = out["layers"]
  out["layers"] = {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers)}
  return out


def convert_state(state: nnx.State, cfg: ModelConfig, scan_layers: bool, *, mesh=None,
                  rules=None, var_filter=nnx.Param) -> nnx.State:
  """A model state (``var_filter`` variables, default Params) of a ``cfg`` model, in the layout
  of ``cfg.replace(scan_layers=scan_layers)``. With ``mesh`` the result is placed in that
  layout's shardings (``parallel.state_shardings``)."""
  if cfg.scan_layers == scan_layers:
    return state
  target_cfg = cfg.replace(scan_layers=scan_layers)
  abstract = nnx.state(abstract_model(target_cfg), var_filter)
  convert = _stack if scan_layers else _unstack
  pure = convert(nnx.to_pure_dict(state), cfg.num_layers)
  if mesh is not None:
    from unigrpo_jax import parallel
    shardings = nnx.to_pure_dict(parallel.state_shardings(abstract, mesh, rules))
    pure = jax.tree.map(jax.device_put, pure, shardings)
  nnx.replace_by_pure_dict(abstract, pure)
  return abstract


def convert_model(model: UnifiedModel, scan_layers: bool, *, mesh=None,
                  rules=None) -> UnifiedModel:
  """``model`` in the other layout (itself when it already has it)."""
  if model.cfg.scan_layers == scan_layers:
    return model
  target_cfg = model.cfg.replace(scan_layers=scan_layers)
  graphdef = nnx.split(abstract_model(target_cfg))[0]
  state = convert_state(nnx.state(model), model.cfg, scan_layers, mesh=mesh, rules=rules,
                        var_filter=...)
  return nnx.merge(graphdef, state)


def per_layer(cfg: ModelConfig) -> ModelConfig:
  """``cfg`` in the on-disk (per-layer) layout."""
  return cfg.replace(scan_layers=False)


def load_layout(state: Optional[nnx.State], cfg: ModelConfig) -> Optional[nnx.State]:
  """Per-layer params read from disk -> the layout ``cfg`` runs in (None stays None)."""
  return None if state is None else convert_state(state, per_layer(cfg), cfg.scan_layers)
