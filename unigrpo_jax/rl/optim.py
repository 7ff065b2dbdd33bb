"""Optimizer of the UniGRPO train step: two learning rates, one per expert side.

Every parameter of the unified model is labelled ``"und"`` (understanding / text policy) or
``"gen"`` (generation / image policy) from its path:

=========================================  =======
``embed``, ``lm_head``, ``und_norm``        und
``layers.<i>.und.*``                        und  (``layers.und.*`` when stacked)
``layers.<i>.gen.*``, ``gen_norm``          gen  (``layers.gen.*`` when stacked)
``latent_io.*`` (vae2llm, time MLP, ...)    gen
=========================================  =======

With ``ModelConfig.mot=False`` there is no ``gen`` expert: image tokens run through the shared
``layers.<i>.und`` expert and ``und_norm``. Those shared params keep the label ``und`` (they ARE
the language model; the paper's small understanding lr protects it), so then only ``latent_io``
is on the generation side, and ``train_image=False`` freezes only ``latent_io``.

The transformation is
``zero the frozen side -> clip by global norm (trainable grads only) -> per-side AdamW``, where a
frozen side uses ``optax.set_to_zero()`` in the last stage: its update is exactly 0.0 (AdamW's
weight decay would otherwise still move it), so its params stay bit-identical.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import optax

@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  """Optimizer and PPO loop. lr_und / lr_gen: AdamW learning rates of the understanding and
  generation sides (paper 1e-6 / 3e-5); grad_clip: global-norm clip over trainable grads
  (None or 0 disables); ppo_epochs: passes over each rollout batch; num_minibatches: optimizer
  steps per pass; grad_accum: micro-batches per minibatch (gradients averaged); shuffle:
  re-permute the rows every epoch."""
  lr_und: float = 1e-6
  lr_gen: float = 3e-5
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: Optional[float] = 1.0
  ppo_epochs: int = 2
  num_minibatches: int = 1
  grad_accum: int = 1
  shuffle: bool = True

  def __post_init__(self):
    for name in ("lr_und", "lr_gen", "weight_decay", "eps"):
      if getattr(self, name) < 0:
        raise ValueError(f"OptimConfig.{name} must be >= 0, got {getattr(self, name)}")
    for name in ("b1", "b2"):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"OptimConfig.{name} must be in [0, 1), got {getattr(self, name)}")
    if self.grad_clip is not None and self.grad_clip < 0:
      raise ValueError(f"OptimConfig.grad_clip must be >= 0 or None, got {self.grad_clip}")
    for name in ("ppo_epochs", "num_minibatches", "grad_accum"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"OptimConfig.{name} must be an int >= 1, got {v!r}")



UND, GEN = "und", "gen"
_UND_TOP = ("embed", "lm_head", "und_norm")
_GEN_TOP = ("gen_norm", "latent_io")


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def label_for_path(path) -> str:
  """Side ("und" / "gen") of the param at a pytree key path of the model state."""
  names = [_key_name(k) for k in path]
  top = names[0]
  if top in _UND_TOP:
    return UND
  if top in _GEN_TOP:
    return GEN
  if top == "layers" and len(names) > 2 and names[2] in (UND, GEN):
    return names[2]
  if top == "layers" and len(names) > 1 and names[1] in (UND, GEN):  # stacked (scan_layers)
    return names[1]
  raise ValueError(f"no optimizer side for parameter {'.'.join(names)}; extend "
                   "unigrpo_jax/rl/optim.py:label_for_path")


def param_labels(params):
  """Same-structure pytree of "und"/"gen" strings (as optax.multi_transform wants)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: label_for_path(p), params)


def side_masks(params):
  """(und_mask, gen_mask): same-structure pytrees of Python bools."""
  labels = param_labels(params)
  return (jax.tree.map(lambda l: l == UND, labels), jax.tree.map(lambda l: l == GEN, labels))


def side_norms(tree) -> dict[str, jax.Array]:
  """Global L2 norms of a gradient pytree, per side: {"und": [], "gen": [], "total": []}."""
  labels = param_labels(tree)
  sq = {UND: jnp.float32(0.0), GEN: jnp.float32(0.0)}
  for lab, g in zip(jax.tree.leaves(labels), jax.tree.leaves(tree)):
    sq[lab] = sq[lab] + jnp.sum(jnp.square(g.astype(jnp.float32)))
  return {UND: jnp.sqrt(sq[UND]), GEN: jnp.sqrt(sq[GEN]), "total": jnp.sqrt(sq[UND] + sq[GEN])}


def make_optimizer(optim_cfg, objective_cfg) -> optax.GradientTransformation:
  """The full transformation for the Param state of the model (see module docstring).

  optim_cfg: OptimConfig (lr_und, lr_gen, weight_decay, b1, b2, eps, grad_clip);
  objective_cfg: ObjectiveConfig (train_text, train_image select the frozen sides).
  """
  trainable = {UND: objective_cfg.train_text, GEN: objective_cfg.train_image}
  lrs = {UND: optim_cfg.lr_und, GEN: optim_cfg.lr_gen}

  def side_opt(side):
    if not trainable[side]:
      return optax.set_to_zero()
    return optax.adamw(lrs[side], b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                       weight_decay=optim_cfg.weight_decay)

  def keep_or_zero(side):
    return optax.identity() if trainable[side] else optax.set_to_zero()

  stages = [
      # Frozen-side grads are zeroed BEFORE the clip so they do not eat the clip budget.
      optax.multi_transform({s: keep_or_zero(s) for s in (UND, GEN)}, param_labels),
  ]
  if optim_cfg.grad_clip is not None and optim_cfg.grad_clip > 0:
    stages.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  stages.append(optax.multi_transform({s: side_opt(s) for s in (UND, GEN)}, param_labels))
  # An update whose gradients hold a NaN/inf is skipped (params and moments untouched); the
  # trainer counts such steps and stops after config.max_nonfinite_in_row in a row.
  return optax.apply_if_finite(optax.chain(*stages), max_consecutive_errors=2**31 - 1)
