"""Checkpoints: a portable params file for model weights, and orbax managers for training runs.

* ``save_model`` / ``load_model``: one directory ``{meta.json, params.msgpack}`` holding the model
  config, the tokenizer and the params (this is how the SFT warm start ships in the package).
  Loading checks every key and shape and fails naming the first mismatch.
* ``RunCheckpointer``: orbax ``CheckpointManager`` over the train state (params, optimizer state,
  step), the reference params, the data-iterator state and the host RNG; keep-last-N, async.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from unigrpo_jax.models.unified import layout as layer_layout
from unigrpo_jax.models.unified.config import ModelConfig
from unigrpo_jax import paths
from unigrpo_jax.paths import resolve_path



class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or does not fit the model."""


def save_model(path: str, params: nnx.State, model_cfg: ModelConfig, tokenizer_json: str,
               extra: Optional[dict] = None) -> None:
  """Writes ``path/meta.json`` and ``path/params.msgpack`` (float32 values, per-layer layout
  whatever ``model_cfg.scan_layers``: see ``models/unified/layout.py``)."""
  params = layer_layout.convert_state(params, model_cfg, scan_layers=False)
  paths.makedirs(path)
  pure = jax.tree.map(lambda a: np.asarray(a, np.float32), params.to_pure_dict())
  paths.write_bytes(paths.join(path, "params.msgpack"), flax.serialization.msgpack_serialize(pure))
  meta = {"model_config": dataclasses.asdict(model_cfg), "tokenizer": json.loads(tokenizer_json),
          "extra": extra or {}}
  paths.write_text(paths.join(path, "meta.json"), json.dumps(meta, indent=1, sort_keys=True))


def read_meta(path: str) -> dict:
  """The ``meta.json`` of a model directory, with clear errors."""
  real = resolve_path(path)
  meta_path = paths.join(real, "meta.json")
  if not paths.isdir(real):
    raise CheckpointError(f"checkpoint {path!r} does not exist (looked for directory {real})")
  try:
    meta = json.loads(paths.read_text(meta_path))
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"checkpoint {path!r}: cannot read {meta_path}: {e}") from e
  for key in ("model_config", "tokenizer"):
    if key not in meta:
      raise CheckpointError(f"checkpoint {path!r}: {meta_path} has no {key!r}")
  return meta


def model_config_from_meta(meta: dict, **overrides) -> ModelConfig:
  fields = dict(meta["model_config"])
  fields.update(overrides)
  return ModelConfig(**fields)


def load_params(path: str, abstract: nnx.State) -> nnx.State:
  """Reads ``params.msgpack`` into the structure of ``abstract`` (shapes and keys checked).

  Values are cast to each abstract leaf's dtype. Raises CheckpointError naming the problem.
  """
  real = resolve_path(path)
  params_path = paths.join(real, "params.msgpack")
  try:
    raw = flax.serialization.msgpack_restore(paths.read_bytes(params_path))
  except Exception as e:  # msgpack raises several types on corrupt data
    raise CheckpointError(f"checkpoint {path!r}: cannot read {params_path}: {e}") from e
  want = abstract.to_pure_dict()
  want_flat = dict(_flatten(want))
  got_flat = dict(_flatten(raw))
  missing = sorted(set(want_flat) - set(got_flat))
  unexpected = sorted(set(got_flat) - set(want_flat))
  if missing or unexpected:
    raise CheckpointError(f"checkpoint {path!r} does not fit the model: missing keys "
                          f"{missing[:5]}, unexpected keys {unexpected[:5]}")
  for key, leaf in want_flat.items():
    if tuple(got_flat[key].shape) != tuple(leaf.shape):
      raise CheckpointError(f"checkpoint {path!r}: {key} has shape {got_flat[key].shape}, "
                            f"the model expects {tuple(leaf.shape)}")
  restored = jax.tree.map(lambda w, g: np.asarray(g).astype(w.dtype), want, raw)
  state = jax.tree.map(lambda x: x, abstract)
  state.replace_by_pure_dict(restored)
  return state


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (str(k),))
  else:
    yield "/".join(prefix), tree


class RunCheckpointer:
  """Saves and restores a training run in ``workdir/checkpoints`` with orbax.

  Items: ``state`` (any pytree of arrays: params, opt state, step, reference params) and
  ``host`` (JSON: data-iterator state, host RNG state, counters).
  """

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    # gs:// (or any URL) is left as is: orbax writes there from every process.
    self.directory = paths.join(resolve_path(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "host"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, host: dict, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    host=ocp.args.JsonSave(host)), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """abstract_state: pytree of jax.ShapeDtypeStruct (with shardings) to restore into."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore()))
    return restored.state, restored.host

  def restore_host(self, step: int) -> dict:
    """Only the JSON host record of ``step`` (cheap: for checks before any array is read)."""
    return self.manager.restore(step, args=ocp.args.Composite(
        host=ocp.args.JsonRestore())).host

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
