"""The UniGRPO train step: PPO epochs over shuffled minibatches of one rollout batch, in one jit.

``make_train_step`` wraps the minibatch loss (``objective.loss_fn``: text GRPO + lambda *
Flow-GRPO + w * regulariser) in PPO epochs and minibatches (and optional gradient accumulation)
inside a single ``jax.jit`` with explicit shardings and the train state donated.
"""
from __future__ import annotations

import functools
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from unigrpo_jax import parallel
from unigrpo_jax.rl import objective
from unigrpo_jax.rl.objective import ObjectiveConfig, loss_fn
from unigrpo_jax.models.unified import attention, lora
from unigrpo_jax.rl.optim import GEN, UND, OptimConfig, make_optimizer, side_norms
from unigrpo_jax.rollout.trajectory import Trajectory


@flax.struct.dataclass
class TrainState:
  """params: the FULL model state (Params + constant Variables; ``nnx.merge(graphdef, params)``
  rebuilds the model, so the rollout reads it directly); opt_state: optax state of the Param
  part; step: [] int32, number of train_step calls (each = ppo_epochs * num_minibatches
  optimizer updates)."""
  params: nnx.State
  opt_state: optax.OptState
  step: jax.Array


def split_params(state: nnx.State, like: nnx.State = None):
  """Full model state -> (trainable part, the rest). Only the trainable part is optimised:
  every Param, or only the LoRA adapters when the model has any (``lora.trainable_filter``;
  ``like``: the model state that decides, when ``state`` is e.g. its tree of shardings)."""
  return nnx.split_state(state, lora.trainable_filter(state if like is None else like), ...)


# --------------------------------------------------------------------------------------------
# The loss of one minibatch.
# --------------------------------------------------------------------------------------------

def _reducer(name: str):
  if name.endswith("_min"):
    return jnp.min
  if name.endswith("_max") or name.endswith("maxdiff"):
    return jnp.max
  return jnp.mean


def _reduce(metrics: dict, axes=None) -> dict:
  return {k: _reducer(k)(v, axis=axes) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------
# Train state, shardings, the jitted step.
# --------------------------------------------------------------------------------------------

def train_state_shardings(abstract_params: nnx.State, objective_cfg: ObjectiveConfig,
                          optim_cfg: OptimConfig, mesh: Mesh, rules=None) -> TrainState:
  """TrainState of NamedShardings: params by the logical rules, optimizer moments like their
  params, scalars (counts, step) replicated."""
  params_sh = parallel.state_shardings(abstract_params, mesh, rules)
  param_part, _ = split_params(abstract_params)
  param_part_sh, _ = split_params(params_sh, like=abstract_params)
  tx = make_optimizer(optim_cfg, objective_cfg)
  abstract_opt = jax.eval_shape(tx.init, param_part)
  repl = parallel.replicated(mesh)
  masked = lambda x: isinstance(x, optax.MaskedNode)
  # multi_transform keeps MaskedNode placeholders for the other side's params: keep them.
  opt_sh = optax.tree_map_params(
      tx, lambda p, s: p if masked(p) else s, abstract_opt, param_part_sh,
      transform_non_params=lambda _: repl, is_leaf=masked)
  return TrainState(params=params_sh, opt_state=opt_sh, step=repl)


def _new_train_state(params: nnx.State, tx) -> TrainState:
  return TrainState(params=params, opt_state=tx.init(split_params(params)[0]),
                    step=jnp.zeros((), jnp.int32))


def init_train_state(params: nnx.State, objective_cfg: ObjectiveConfig, optim_cfg: OptimConfig,
                     mesh: Mesh, rules=None, *, compiler_options=None) -> TrainState:
  """Creates the TrainState (a copy of ``params``, fresh optimizer state) in its sharding."""
  shardings = train_state_shardings(params, objective_cfg, optim_cfg, mesh, rules)
  tx = make_optimizer(optim_cfg, objective_cfg)
  return jax.jit(functools.partial(_new_train_state, tx=tx), in_shardings=(shardings.params,),
                 out_shardings=shardings, compiler_options=compiler_options)(params)


def abstract_train_state(abstract_params: nnx.State, objective_cfg: ObjectiveConfig,
                         optim_cfg: OptimConfig, mesh: Mesh, rules=None) -> TrainState:
  """The TrainState ``init_train_state`` would create, as ShapeDtypeStructs with its shardings
  (no arrays: for ahead-of-time compilation)."""
  shardings = train_state_shardings(abstract_params, objective_cfg, optim_cfg, mesh, rules)
  tx = make_optimizer(optim_cfg, objective_cfg)
  shapes = jax.eval_shape(functools.partial(_new_train_state, tx=tx), abstract_params)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                      shardings)


def _take_rows(tree, idx):
  return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)


def make_train_step(graphdef: nnx.GraphDef, abstract_params: nnx.State,
                    objective_cfg: ObjectiveConfig, optim_cfg: OptimConfig, mesh: Mesh,
                    rules=None, *, donate: bool = True, compiler_options=None):
  """Builds ``train_step(train_state, ref_params, trajectory, advantages, key)``.

  ``ref_params`` is the frozen reference's full state, or None when the objective needs none or
  the model has LoRA adapters (the reference is then the base inside the train state).

  Args:
    graphdef: of the model (``parallel.create_sharded_model``).
    abstract_params: the full model state (concrete or ``jax.ShapeDtypeStruct``s; only shapes
      and logical sharding names are read) to derive the shardings.
    rules: logical-axis rules (``parallel.DEFAULT_RULES`` if None).
    donate: donate the train state's buffers to the step.
    compiler_options: XLA options for this jit (tests use
      ``{"xla_backend_optimization_level": 0}`` to compile ~3x faster on CPU).
  Returns:
    A function compiled once per input shape: ``trajectory`` a Trajectory of B rows and
    ``advantages`` [B] (both sharded over ("data", "fsdp"); B must be a multiple of
    ``num_minibatches * grad_accum``), ``key`` a PRNG key (minibatch shuffles). It returns
    ``(new_train_state, metrics)``; metrics (all [] f32) are the ``loss_fn`` metrics reduced
    over every (epoch, minibatch) iteration (mean; min for ``*_min``, max for ``*_max``),
    ``onpolicy/text/*``, ``onpolicy/flow/*`` and ``onpolicy/{text,flow}_logp_maxdiff`` of the
    FIRST minibatch of the first epoch only (before any update, so with the rollout params the
    ratios must be 1 and the maxdiffs ~0; later minibatches of the same epoch run after an
    update and would not test that), and ``grad_norm/{und,gen,total}`` (raw, before clipping,
    mean over iterations). With ``objective_cfg.recompute_old_logp`` the old log-probs come from
    this step's own forward before any update, and ``onpolicy/rollout_{text,flow}_logp_maxdiff``
    report how far the rollout's differed from it.
  """
  shardings = train_state_shardings(abstract_params, objective_cfg, optim_cfg, mesh, rules)
  tx = make_optimizer(optim_cfg, objective_cfg)
  batch_sh = parallel.batch_sharding(mesh)
  repl = parallel.replicated(mesh)
  n_shards = parallel.batch_parallelism(mesh)
  epochs, n_mb, n_acc = optim_cfg.ppo_epochs, optim_cfg.num_minibatches, optim_cfg.grad_accum
  # LoRA: the reference is the frozen base inside the train state (adapters zeroed), so the
  # caller passes no second copy of the weights (ref_params None).
  base_is_reference = lora.has_adapters(abstract_params)

  def constrain(tree):
    """Keeps gathered minibatch rows split over the batch axes (when they divide)."""
    def one(x):
      if x.shape[0] % n_shards:
        return x
      return jax.lax.with_sharding_constraint(x, batch_sh)
    return jax.tree.map(one, tree)

  def micro_grads(param_part, rest, ref_params, micro):
    traj, adv = micro

    def objective(p):
      full = nnx.merge_state(p, rest)
      return loss_fn(full, ref_params, graphdef, traj, adv, objective_cfg)

    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(param_part)
    return grads, metrics

  def minibatch_update(carry, rows, rest, ref_params, traj, adv):
    param_part, opt_state = carry
    mb = rows.shape[0]
    micro_rows = rows.reshape(n_acc, mb // n_acc)

    def acc_body(acc, r):
      micro = constrain(_take_rows((traj, adv), r))
      grads, metrics = micro_grads(param_part, rest, ref_params, micro)
      return jax.tree.map(jnp.add, acc, grads), metrics

    if n_acc == 1:
      grads, metrics = micro_grads(param_part, rest, ref_params,
                                   constrain(_take_rows((traj, adv), rows)))
    else:
      zeros = jax.tree.map(jnp.zeros_like, param_part)
      grads, metrics = jax.lax.scan(acc_body, zeros, micro_rows)
      # Equal-size micro-batches: the mean of their losses is the minibatch loss (exactly for
      # seq_mean / flow / MSE means; token_mean weights micro-batches equally instead).
      grads = jax.tree.map(lambda g: g / n_acc, grads)
      metrics = _reduce(metrics, axes=0)
    norms = side_norms(grads)
    metrics.update({"grad_norm/und": norms[UND], "grad_norm/gen": norms[GEN],
                    "grad_norm/total": norms["total"]})
    updates, opt_state = tx.update(grads, opt_state, param_part)
    param_part = optax.apply_updates(param_part, updates)
    return (param_part, opt_state), metrics

  def old_terms_from_train_path(params, traj):
    """``behaviour_terms`` over the batch in micro-batch-sized chunks (chunk c = rows c, c + n,
    ...: spread over the batch shards like the rows themselves) -> traj with its old log-probs
    and window means replaced, and the rollout-vs-train maxdiffs (``objective.recompute_old_logp``)."""
    batch = traj.reasoning_logp.shape[0]
    n = n_mb * n_acc
    rows = jnp.arange(batch).reshape(batch // n, n).T  # [n, micro]
    text_lp, flow_lp, mean = jax.lax.map(
        lambda r: objective.behaviour_terms(params, graphdef, constrain(_take_rows(traj, r)),
                                            objective_cfg), rows)
    unchunk = lambda a: jnp.zeros((batch,) + a.shape[2:], a.dtype).at[rows.reshape(-1)].set(
        a.reshape((-1,) + a.shape[2:]))
    text_lp, flow_lp, mean = unchunk(text_lp), unchunk(flow_lp), unchunk(mean)
    text_mask = traj.reasoning_mask
    flow_mask = objective.window_mask(traj.window) > 0
    diffs = {
        "onpolicy/rollout_text_logp_maxdiff": objective.masked_absmax(
            text_lp - traj.reasoning_logp, text_mask),
        "onpolicy/rollout_flow_logp_maxdiff": objective.masked_absmax(
            flow_lp - traj.window.logp, flow_mask),
    }
    traj = traj.replace(reasoning_logp=jnp.where(text_mask, text_lp, traj.reasoning_logp),
                        window=traj.window.replace(logp=jnp.where(flow_mask, flow_lp,
                                                                  traj.window.logp),
                                                   mean=mean))
    return traj, diffs

  def train_step(state: TrainState, ref_params, trajectory: Trajectory, advantages, key):
    batch = advantages.shape[0]
    if batch % (n_mb * n_acc):
      raise ValueError(f"rollout batch {batch} is not divisible by num_minibatches * "
                       f"grad_accum = {n_mb} * {n_acc}")
    # images / final latents are not needed by the loss: do not gather them every minibatch.
    traj = trajectory.replace(images=None, latents=None)
    rollout_diffs = {}
    if objective_cfg.recompute_old_logp:
      traj, rollout_diffs = old_terms_from_train_path(state.params, traj)
    adv = advantages.astype(jnp.float32)
    if base_is_reference and objective_cfg.needs_reference:
      ref_params = lora.reference_state(state.params)
    param_part, rest = split_params(state.params)

    def epoch_body(carry, epoch):
      if optim_cfg.shuffle:
        order = jax.random.permutation(jax.random.fold_in(key, epoch), batch)
      else:
        order = jnp.arange(batch)
      rows = order.reshape(n_mb, batch // n_mb)
      body = functools.partial(minibatch_update, rest=rest, ref_params=ref_params, traj=traj,
                               adv=adv)
      return jax.lax.scan(body, carry, rows)

    (param_part, opt_state), metrics = jax.lax.scan(
        epoch_body, (param_part, state.opt_state), jnp.arange(epochs))
    # metrics: name -> [epochs, num_minibatches]; [0, 0] is the only pre-update minibatch.
    out = _reduce(metrics)
    for name, val in metrics.items():
      if name.startswith(("text/", "flow/")):
        out[f"onpolicy/{name}"] = val[0, 0]
      if name.startswith("onpolicy/"):
        out[name] = val[0, 0]
    out.update(rollout_diffs)
    new_state = TrainState(params=nnx.merge_state(param_part, rest), opt_state=opt_state,
                           step=state.step + 1)
    return new_state, out

  # Without a regulariser / text KL the reference is never read and may be passed as None.
  ref_sh = shardings.params if objective_cfg.needs_reference and not base_is_reference else None
  return jax.jit(attention.traced_on(train_step, mesh),
                 in_shardings=(shardings, ref_sh, batch_sh, batch_sh, repl),
                 out_shardings=(shardings, repl),
                 donate_argnums=(0,) if donate else (), compiler_options=compiler_options)

