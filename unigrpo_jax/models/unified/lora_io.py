"""LoRA adapters in and out: fresh sharded adapters over a loaded base, Hugging Face PEFT files
(``save_lora`` / ``load_lora``) and the merged weights (``merge_adapters``) for ``save_bagel``.

PEFT's layout for BAGEL's own module names: for a base weight ``<module>.weight`` [out, in]
(e.g. ``language_model.model.layers.0.self_attn.q_proj_moe_gen.weight``), the adapter is
``base_model.model.<module>.lora_A.weight`` [r, in] and ``....lora_B.weight`` [out, r], with
``adapter_config.json`` giving ``r`` and ``lora_alpha`` (delta W = alpha / r * B A). Our A is
[in..., r] and B [r, out...] in the base weight's own axes (q: in D, out (H, hd)), so
``lora_A = A.reshape(-1, r).T`` and ``lora_B = B.reshape(r, -1).T``: the flattening order is the
one ``weights.py`` uses for the base (heads major, head_dim minor).
"""
from __future__ import annotations

import json
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unigrpo_jax import parallel, paths
from unigrpo_jax.models.safetensors_io import CheckpointFormatError, TensorIndex, write_file
from unigrpo_jax.models.unified import layout, lora
from unigrpo_jax.models.unified.config import ModelConfig
from unigrpo_jax.models.unified.model import UnifiedModel, abstract_model
from unigrpo_jax.models.unified.weights import bagel_key_map, flat_state, leaf_value

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# Our projection name -> its path under an expert (the base weight the adapter sits on).
_BASE_OF = {"q": "q", "k": "k", "v": "v", "o": "o", "gate": "mlp.gate", "up": "mlp.up",
            "down": "mlp.down"}


def with_adapters(graph_and_state: tuple, cfg: ModelConfig, seed: int, mesh=None, rules=None):
  """A base model's (graphdef, state) -> the ``cfg`` (LoRA) model's (graphdef, state): the base
  arrays unchanged (not copied), fresh adapters (A fan-in init, B zero) created directly in
  their shardings."""
  _, base_state = graph_and_state
  graphdef, abstract = nnx.split(abstract_model(cfg))
  abstract_adapters = nnx.state(nnx.merge(graphdef, abstract), nnx.LoRAParam)

  def init():  # the base's init is traced but unused: XLA drops it
    return nnx.state(UnifiedModel(cfg, nnx.Rngs(seed)), nnx.LoRAParam)

  shardings = (parallel.state_shardings(abstract_adapters, mesh, rules) if mesh is not None
               else None)
  adapters = jax.jit(init, out_shardings=shardings)()
  return graphdef, nnx.merge_state(base_state, adapters)


def _adapter_rows(cfg: ModelConfig) -> list:
  """[(our A path, our B path, PEFT module name)] per adapted projection, per-layer layout."""
  per = layout.per_layer(cfg)
  modules = {our: key[:-len(".weight")] for our, key, _ in bagel_key_map(lora.base_config(per))
             if key.endswith(".weight")}
  rows = []
  for i in range(cfg.num_layers):
    for expert in ("und", "gen"):
      if not cfg.lora_on(expert) or (expert == "gen" and not cfg.mot):
        continue
      for t in cfg.lora_targets:
        base = f"layers.{i}.{expert}.{_BASE_OF[t]}"
        rows.append((f"layers.{i}.{expert}.lora.{t}_a", f"layers.{i}.{expert}.lora.{t}_b",
                     modules[base]))
  return rows


def _per_layer_adapters(state: nnx.State, cfg: ModelConfig) -> dict:
  """{our per-layer path: numpy array} of the adapters of a (possibly stacked) model state."""
  adapters = nnx.split_state(state, nnx.LoRAParam, ...)[0]
  if cfg.scan_layers:
    adapters = layout.convert_state(adapters, cfg, False, var_filter=nnx.LoRAParam)
  return {k: np.asarray(jax.device_get(leaf_value(v))) for k, v in flat_state(adapters).items()}


def save_lora(model: UnifiedModel, path: str, *, state: Optional[nnx.State] = None,
              base_model: str = "") -> list:
  """Writes ``path/adapter_model.safetensors`` + ``path/adapter_config.json`` (PEFT's LoRA
  layout, BAGEL's module names; float32). ``state`` (e.g. a trained ``TrainState.params``)
  overrides the model's arrays; ``base_model`` is recorded as ``base_model_name_or_path``.
  Returns the written keys."""
  cfg = model.cfg
  if not cfg.lora_rank:
    raise ValueError("save_lora: the model has no adapters (ModelConfig.lora_rank=0)")
  arrays = _per_layer_adapters(state if state is not None else nnx.state(model), cfg)
  r = cfg.lora_rank
  tensors = {}
  for a_path, b_path, module in _adapter_rows(cfg):
    tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = arrays[a_path].reshape(-1, r).T
    tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = arrays[b_path].reshape(r, -1).T
  if jax.process_index() == 0:
    paths.makedirs(path)
    target = sorted({m.rsplit(".", 1)[-1] for _, _, m in _adapter_rows(cfg)})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": cfg.lora_alpha,
              "target_modules": target, "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "task_type": None,
              "base_model_name_or_path": base_model,
              "unigrpo_jax": {"lora_targets": list(cfg.lora_targets),
                              "lora_experts": list(cfg.lora_experts)}}
    local_tmp = None
    if paths.is_remote(path):  # safetensors writes a local file: stage it, then upload
      import tempfile
      local_tmp = tempfile.mkdtemp()
      out = f"{local_tmp}/{PEFT_WEIGHTS}"
    else:
      out = paths.join(path, PEFT_WEIGHTS)
    write_file(out, tensors, metadata={"format": "pt"})
    if local_tmp:
      import shutil
      with open(out, "rb") as f:  # local-path: the staged file
        paths.write_bytes(paths.join(path, PEFT_WEIGHTS), f.read())
      shutil.rmtree(local_tmp)
    paths.write_text(paths.join(path, PEFT_CONFIG), json.dumps(config, indent=2) + "\n")
  return sorted(tensors)


def load_lora(path: str, state: nnx.State, cfg: ModelConfig, mesh=None, rules=None):
  """A PEFT adapter directory (``save_lora``'s) -> ``state`` with its adapters replaced.

  Every adapter the config expects must be in the file with PEFT's shapes and the file's ``r``
  / ``lora_alpha`` must be the config's; errors name the file and the key.
  """
  conf_path = paths.join(path, PEFT_CONFIG)
  if not paths.isfile(conf_path):
    raise CheckpointFormatError(f"{conf_path}: file not found (a PEFT adapter directory holds "
                                f"{PEFT_CONFIG} and {PEFT_WEIGHTS})")
  conf = json.loads(paths.read_text(conf_path))
  if conf.get("r") != cfg.lora_rank or float(conf.get("lora_alpha", -1)) != cfg.lora_alpha:
    raise CheckpointFormatError(f"{conf_path}: r={conf.get('r')}, lora_alpha="
                                f"{conf.get('lora_alpha')}; the config has model.lora.rank="
                                f"{cfg.lora_rank}, alpha={cfg.lora_alpha}")
  index = TensorIndex([paths.join(path, PEFT_WEIGHTS)])
  per = _per_layer_adapters(state, cfg)  # shapes (and the values of any unlisted adapter)
  r = cfg.lora_rank
  for a_path, b_path, module in _adapter_rows(cfg):
    for our, kind in ((a_path, "A"), (b_path, "B")):
      key = f"{PEFT_PREFIX}{module}.lora_{kind}.weight"
      shape = per[our].shape
      want = (r, int(np.prod(shape[:-1]))) if kind == "A" else (int(np.prod(shape[1:])), r)
      if key not in index.shapes:
        raise CheckpointFormatError(f"{index.file_of.get(key, path)}: missing adapter {key!r}")
      if tuple(index.shapes[key]) != want:
        raise CheckpointFormatError(f"{path}/{PEFT_WEIGHTS}: {key!r} has shape "
                                    f"{list(index.shapes[key])}, expected {list(want)}")
      per[our] = index.read(key).astype(np.float32).T.reshape(shape)
  index.close()
  per_cfg = layout.per_layer(cfg)
  adapters = nnx.state(abstract_model(per_cfg),
                       nnx.LoRAParam)
  pure = nnx.to_pure_dict(adapters)
  for dotted, value in per.items():
    node = pure
    parts = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  nnx.replace_by_pure_dict(adapters, pure)
  adapters = layout.convert_state(adapters, per_cfg, cfg.scan_layers, var_filter=nnx.LoRAParam)
  if mesh is not None:
    sh = parallel.state_shardings(adapters, mesh, rules)
    adapters = jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), adapters, sh)
  _, rest = nnx.split_state(state, nnx.LoRAParam, ...)
  return nnx.merge_state(rest, adapters)


def merge_adapters(state: nnx.State, cfg: ModelConfig) -> tuple[ModelConfig, nnx.State]:
  """A LoRA model state -> (base config, a new base state with W + alpha / r * A B folded in).
  ``state`` is not modified."""
  pure = nnx.to_pure_dict(state)
  layers = [pure["layers"]] if cfg.scan_layers else [pure["layers"][i]
                                                      for i in range(cfg.num_layers)]
  for layer in layers:
    for expert in ("und", "gen"):
      adapters = layer.get(expert, {}).get("lora") if layer.get(expert) else None
      if not adapters:
        continue
      for t in cfg.lora_targets:
        owner = layer[expert]["mlp"] if t in ("gate", "up", "down") else layer[expert]
        owner[t] = lora.merged_weight(owner[t], adapters[f"{t}_a"], adapters[f"{t}_b"],
                                      cfg.lora_scale, cfg.scan_layers)
      del layer[expert]["lora"]
  base_cfg = lora.base_config(cfg)
  _, base_state = nnx.split_state(state, nnx.LoRAParam, ...)
  base_state = jax.tree.map(lambda x: x, base_state)  # a new container, same leaves
  nnx.replace_by_pure_dict(base_state, pure)
  return base_cfg, base_state
