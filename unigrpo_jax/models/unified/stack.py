"""Running the layer stack: a Python loop over per-layer modules or one ``lax.scan`` over their
stacked parameters, with optional rematerialisation. Knows nothing of the model around it:
each layer is called as ``layer(text_x, ..., stop_context_grad)`` (see ``MoTLayer.__call__``).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from unigrpo_jax.models.unified.config import ModelConfig
from unigrpo_jax.models.unified.kv_cache import KVCache


def _call_layer(layer, text_x, text_pos, text_mask, text_valid, image_x, marker_x, image_pos,
                prefix_k, prefix_v, prefix_valid, stop_context_grad):
  return layer(text_x, text_pos, text_mask, text_valid, image_x, marker_x, image_pos, prefix_k,
               prefix_v, prefix_valid, stop_context_grad)


def loop_layers(layers, cfg: ModelConfig, carry, inputs, cache: Optional[KVCache],
                 stop_context_grad: bool):
  """The layer stack as a Python loop (one HLO copy of the layer per layer).

  carry: (text_x [B, Lt, D] | None, image_x [B, K, N, D] | None, marker_x [B, K, M, D] | None);
  inputs: (positions, text_mask, text_valid, image_position), read by every layer.
  Returns (text_x, image_x, marker_x, text_k, text_v) with text_k / text_v [L, B, Lt, Hkv, D]
  (None without text).
  """
  text_x, image_x, marker_x = carry
  positions, text_mask, text_valid, image_position = inputs
  new_k, new_v = [], []
  for i, layer in enumerate(layers):
    prefix = (None, None, None) if cache is None else (cache.k[i], cache.v[i], cache.valid)
    call = functools.partial(_remat_layer, policy=remat_policy(cfg)) if cfg.remat else _call_layer
    text_x, image_x, marker_x, tk, tv = call(layer, text_x, positions, text_mask, text_valid,
                                             image_x, marker_x, image_position, *prefix,
                                             stop_context_grad)
    new_k.append(tk), new_v.append(tv)
  if text_x is None:
    return text_x, image_x, marker_x, None, None
  return text_x, image_x, marker_x, jnp.stack(new_k), jnp.stack(new_v)


def scan_layers(layers, cfg: ModelConfig, carry, inputs, cache: Optional[KVCache],
                 stop_context_grad: bool):
  """``loop_layers`` as one ``lax.scan`` over the layers' stacked state (same result).

  The compiler sees one layer body whatever the depth, so compile time stays flat in the number
  of layers (28 layers compile like one), and with ``remat`` only the [B, L, D] carry of each
  layer is saved for the backward pass. ``layers`` is the stacked MoTLayer (``stack_layers``):
  its params are [num_layers, ...] arrays, sliced per iteration by the scan (so the optimizer
  and the gradient clipping also see one array per weight, not one per layer). A read-only
  cache is stacked here (a copy of a few MB: its per-layer buffers exist for the decode loop,
  which never scans, see ``_text_into_cache``).
  """
  graphdef, stacked = nnx.split(layers)
  positions, text_mask, text_valid, image_position = inputs
  if cache is None:
    prefix_kv, prefix_valid = (None, None), None
  else:
    prefix_kv, prefix_valid = (jnp.stack(cache.k), jnp.stack(cache.v)), cache.valid

  def body(carry, xs):
    text_x, image_x, marker_x = carry
    state, (prefix_k, prefix_v) = xs
    text_x, image_x, marker_x, tk, tv = _call_layer(
        nnx.merge(graphdef, state), text_x, positions, text_mask, text_valid, image_x, marker_x,
        image_position, prefix_k, prefix_v, prefix_valid, stop_context_grad)
    return (text_x, image_x, marker_x), (tk, tv)

  if cfg.remat:
    body = jax.checkpoint(body, policy=remat_policy(cfg))
  (text_x, image_x, marker_x), (text_k, text_v) = jax.lax.scan(body, carry,
                                                               (stacked, prefix_kv))
  return text_x, image_x, marker_x, text_k, text_v


def _stack_leaves(*xs):
  """Per-layer values -> [L, ...]: arrays stacked, ShapeDtypeStructs (abstract params) likewise."""
  if isinstance(xs[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs),) + tuple(xs[0].shape), xs[0].dtype)
  return jnp.stack(xs)


def stack_layers(layers: list) -> nnx.Module:
  """Identical MoTLayers -> one MoTLayer whose params are stacked along a new leading axis.

  Each param's logical sharding names get "layers" in front (unsharded by every rule set: a
  layer's weights are sharded inside the layer, e.g. FSDP over "embed").
  """
  graphdef, first = nnx.split(layers[0])
  states = [first] + [nnx.split(layer)[1] for layer in layers[1:]]
  stacked = nnx.merge(graphdef, jax.tree.map(_stack_leaves, *states))
  for _, var in nnx.iter_graph(stacked):
    if isinstance(var, nnx.Variable) and var.get_metadata().get("out_sharding") is not None:
      var.set_metadata(out_sharding=("layers",) + tuple(var.get_metadata()["out_sharding"]))
  return stacked


def layer_list(layers, cfg: ModelConfig) -> list:
  """The layers one by one: the list itself, or views of the stacked layer's slices (static
  indices: the decode loop runs unrolled over per-layer cache buffers in both layouts)."""
  if not cfg.scan_layers:
    return list(layers)
  graphdef, stacked = nnx.split(layers)
  return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
          for i in range(cfg.num_layers)]


def remat_policy(cfg: ModelConfig):
  """``cfg.remat_policy`` as a ``jax.checkpoint`` policy (what the backward may keep).

  nothing_saveable: only each layer's input is kept, everything else is recomputed (least
  memory, one extra forward). dots_saveable / dots_with_no_batch_dims_saveable: matmul outputs
  are kept (less recompute, more memory). offload_dots: matmul outputs without batch dims go to
  host memory (TPU; pinned host) instead of HBM.
  """
  policies = jax.checkpoint_policies
  if cfg.remat_policy == "offload_dots":
    return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  return getattr(policies, cfg.remat_policy)


def _remat_layer(layer, *args, policy=None):
  """``_call_layer`` under ``jax.checkpoint`` over the layer's split state.

  Not ``nnx.remat``: that writes the layer's state back after the call, which raises
  TraceContextError when the layer belongs to a model created outside the current trace (the
  frozen reference merged inside the train step's ``value_and_grad``). A layer call never
  mutates its state, so checkpointing a pure function of (state, inputs) is equivalent.
  The last argument (stop_context_grad) is a Python bool: static.
  """
  graphdef, state = nnx.split(layer)

  def pure(state, *args):
    return _call_layer(nnx.merge(graphdef, state), *args)

  return jax.checkpoint(pure, static_argnums=(len(args),), policy=policy)(state, *args)

