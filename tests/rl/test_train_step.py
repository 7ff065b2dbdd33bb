"""The UniGRPO train step: on-policy ratios, update direction, frozen sides, mesh equivalence.

One real rollout of the tiny model (llm2vae perturbed: it is zero-initialised, which would make
every velocity 0) feeds all step tests. Compiles dominate the cost, so tests share compiled
steps through module-scoped fixtures.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unigrpo_jax import parallel as par
from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.rl import optim
from unigrpo_jax.rl import train_step as ts
from unigrpo_jax.rollout.program import RolloutConfig, make_rollout
from unigrpo_jax.rl import objective

STOP, PAD, VS = 1, 0, 2
NOISE = 0.8
B_PROMPTS, GROUP = 2, 4  # B = 8 rows: divisible by every batch split of the meshes below
# XLA:CPU compiles ~3x faster without backend optimisations; compiles dominate these tests.
FAST = {"xla_backend_optimization_level": 0}


def _fast_jit(fn, *args):
  """Compiles ``fn`` (jitted) for ``args`` with FAST options and calls it."""
  return fn.lower(*args).compile(FAST)(*args)


def _mesh1():
  return par.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _host(tree):
  return jax.device_get(tree)


def _leaves(state):
  return {jax.tree_util.keystr(p): np.asarray(l)
          for p, l in jax.tree_util.tree_leaves_with_path(state)}


@pytest.fixture(scope="module")
def world():
  """Tiny model (perturbed), two real rollouts of 8 rows, advantages."""
  cfg = get_preset("tiny")
  mesh = _mesh1()
  graphdef, state = par.create_sharded_model(cfg, 0, mesh, model_fn=UnifiedModel, compiler_options=FAST)
  # llm2vae is zero-initialised; give it weights so the velocity (and the flow logp's
  # dependence on the params) is not trivially zero.
  kernel = state["latent_io"]["llm2vae_kernel"]
  kernel.set_value(kernel.get_value()
                   + 0.1 * jax.random.normal(jax.random.key(1), kernel.get_value().shape))
  rcfg = RolloutConfig(group_size=GROUP, max_reasoning_len=6, stop_id=STOP, pad_id=PAD,
                       vision_start_id=VS, num_steps=6, noise_level=NOISE, window_range=(0, 4),
                       window_size=2)
  rollout = make_rollout(graphdef, rcfg, PatchAutoencoder.for_model(cfg))
  prompts = jax.random.randint(jax.random.key(2), (B_PROMPTS, 5), 3, cfg.vocab_size)
  prompt_mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)  # left padding in row 0
  rollout = rollout.lower(state, prompts, prompt_mask, jax.random.key(3)).compile(FAST)
  traj = rollout(state, prompts, prompt_mask, jax.random.key(3))
  traj2 = rollout(state, prompts, prompt_mask, jax.random.key(4))
  adv = jnp.array([1.0, -0.5, 0.3, -0.8, 1.2, -1.1, 0.4, -0.5], jnp.float32)
  return dict(cfg=cfg, graphdef=graphdef, state=_host(state), traj=_host(traj),
              traj2=_host(traj2), adv=np.asarray(adv))


def _put(world, mesh):
  """(params, trajectory, advantages) placed on ``mesh``."""
  params = jax.device_put(world["state"], par.state_shardings(world["state"], mesh))
  bsh = par.batch_sharding(mesh)
  return params, jax.device_put(world["traj"], bsh), jax.device_put(world["adv"], bsh)


BASE_OBJ = objective.ObjectiveConfig(vision_start_id=VS, pad_id=PAD, noise_level=NOISE)
BASE_OPT = optim.OptimConfig(ppo_epochs=2, num_minibatches=2)


def _run(world, mesh, obj=BASE_OBJ, opt=BASE_OPT, adv=None, key=5):
  params, traj, adv_d = _put(world, mesh)
  if adv is not None:
    adv_d = jax.device_put(np.asarray(adv, np.float32), par.batch_sharding(mesh))
  step = ts.make_train_step(world["graphdef"], params, obj, opt, mesh, compiler_options=FAST)
  state = ts.init_train_state(params, obj, opt, mesh, compiler_options=FAST)
  new_state, metrics = step(state, params, traj, adv_d, jax.random.key(key))
  return step, new_state, _host(metrics)


@pytest.fixture(scope="module")
def base_run(world):
  step, new_state, metrics = _run(world, _mesh1())
  return dict(step=step, state=new_state, params=_leaves(_host(new_state.params)),
              metrics=metrics)


# ------------------------------------------------------------------------------------------
# Configs and the optimizer.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(text_clip=-0.1), "ObjectiveConfig.text_clip"),
    (dict(text_clip=(0.1, 0.2, 0.3)), "ObjectiveConfig.text_clip"),
    (dict(flow_clip=0.0), "ObjectiveConfig.flow_clip"),
    (dict(text_aggregation="sum"), "ObjectiveConfig.text_aggregation"),
    (dict(regularizer="l2"), "ObjectiveConfig.regularizer"),
    (dict(sde_type="ode"), "ObjectiveConfig.sde_type"),
    (dict(reg_weight=-1.0), "ObjectiveConfig.reg_weight"),
    (dict(temperature=0.0), "ObjectiveConfig.temperature"),
    (dict(train_text=False, train_image=False), "nothing to train"),
    (dict(vision_start_id=-1), "ObjectiveConfig.vision_start_id"),
])
def test_objective_config_validation(kwargs, match):
  kw = dict(vision_start_id=VS)
  kw.update(kwargs)
  with pytest.raises(ValueError, match=match):
    objective.ObjectiveConfig(**kw)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr_und=-1e-6), "OptimConfig.lr_und"),
    (dict(b2=1.0), "OptimConfig.b2"),
    (dict(grad_clip=-1.0), "OptimConfig.grad_clip"),
    (dict(ppo_epochs=0), "OptimConfig.ppo_epochs"),
    (dict(num_minibatches=1.5), "OptimConfig.num_minibatches"),
    (dict(grad_accum=0), "OptimConfig.grad_accum"),
])
def test_optim_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optim.OptimConfig(**kwargs)


def test_clip_pair_and_defaults():
  cfg = objective.ObjectiveConfig(vision_start_id=VS, text_clip=[0.2, 0.28])
  assert cfg.text_clip == (0.2, 0.28)
  assert cfg.flow_clip == 1e-6 and cfg.ratio_norm and not cfg.reweight_by_dt
  assert cfg.regularizer == "velocity_mse" and cfg.reg_weight == 1.5e-5
  opt = optim.OptimConfig()
  assert (opt.lr_und, opt.lr_gen, opt.ppo_epochs, opt.grad_clip) == (1e-6, 3e-5, 2, 1.0)


@pytest.mark.parametrize("mot", [True, False])
def test_param_labels(mot):
  cfg = get_preset("tiny", mot=mot)
  _, abstract = nnx.split(nnx.eval_shape(lambda: UnifiedModel(cfg, nnx.Rngs(0))))
  labels = {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_leaves_with_path(
      optim.param_labels(abstract))}
  for path, lab in labels.items():
    if "['latent_io']" in path or "['gen_norm']" in path or "['gen']" in path:
      assert lab == "gen", path
    else:
      assert lab == "und", path
  assert labels["['embed'].value"] == "und" and labels["['lm_head'].value"] == "und"
  assert labels["['layers'][1]['und']['mlp']['up'].value"] == "und"
  if mot:
    assert labels["['layers'][0]['gen']['q'].value"] == "gen"
  # mot=False: the shared expert is the understanding side; only latent_io is generation.
  assert {p for p, l in labels.items() if l == "gen"} == (
      {p for p in labels if "gen" in p or "latent_io" in p} if mot else
      {p for p in labels if "latent_io" in p})
  with pytest.raises(ValueError, match="no optimizer side"):
    optim.label_for_path((jax.tree_util.DictKey("mystery"),))


# ------------------------------------------------------------------------------------------
# The step.
# ------------------------------------------------------------------------------------------

def test_rollout_is_usable(world):
  traj = world["traj"]
  assert traj.reasoning_mask.shape == (8, 6)
  assert (traj.window.step_index >= 0).all() and (traj.window.std > 0).all()
  # Velocity is not zero (else the flow log-probs would not depend on the params).
  assert np.abs(traj.window.mean - traj.window.x_t).max() > 0


def test_onpolicy_first_epoch(base_run):
  m = base_run["metrics"]
  assert m["onpolicy/text_logp_maxdiff"] < 1e-4, m["onpolicy/text_logp_maxdiff"]
  assert m["onpolicy/flow_logp_maxdiff"] < 1e-4, m["onpolicy/flow_logp_maxdiff"]
  for name in ("loss/total", "grad_norm/und", "grad_norm/gen", "text/ratio_mean",
               "flow/ratio_mean", "flow/velocity_mse", "onpolicy/text/ratio_min",
               "onpolicy/flow/clip_frac", "text/approx_kl", "reg/velocity_mse"):
    assert np.isfinite(m[name]), name
  assert m["grad_norm/und"] > 0 and m["grad_norm/gen"] > 0


def test_onpolicy_ratio_one_through_loss_fn(world):
  """loss_fn with the rollout params: ratios are 1 and the RatioNorm ratio too."""
  traj, adv = world["traj"], world["adv"]
  fn = jax.jit(lambda p, b, a: objective.loss_fn(p, p, world["graphdef"], b, a, BASE_OBJ))
  _, m = _fast_jit(fn, world["state"], traj, adv)
  for side in ("text", "flow"):
    assert abs(float(m[f"{side}/ratio_min"]) - 1) < 1e-4
    assert abs(float(m[f"{side}/ratio_max"]) - 1) < 1e-4
  assert float(m["flow/velocity_mse"]) == 0.0  # policy == reference


def test_step_compiles_once(world, base_run):
  step, state = base_run["step"], base_run["state"]
  mesh = _mesh1()
  params, _, _ = _put(world, mesh)
  bsh = par.batch_sharding(mesh)
  traj2 = jax.device_put(world["traj2"], bsh)
  adv2 = jax.device_put(-world["adv"], bsh)
  state2, m2 = step(state, params, traj2, adv2, jax.random.key(9))
  jax.block_until_ready(state2)
  assert step._cache_size() == 1
  assert int(state2.step) == 2
  # state was donated: its buffers were reused by the step.
  assert np.isfinite(float(m2["loss/total"]))


@pytest.mark.parametrize("shape", [
    # The fast suite keeps (2, 2, 2): every axis > 1 (batch over data+fsdp, params over fsdp
    # and tensor, minibatches of 4 rows split 4 ways).
    pytest.param((8, 1, 1), marks=pytest.mark.slow),
    pytest.param((2, 4, 1), marks=pytest.mark.slow),
    (2, 2, 2),
])
def test_same_update_on_meshes(world, base_run, shape):
  _, new_state, metrics = _run(world, par.make_mesh(*shape))
  got = _leaves(_host(new_state.params))
  ref = base_run["params"]
  assert got.keys() == ref.keys()
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=1e-5, err_msg=k)
  for k in ("loss/total", "grad_norm/und", "grad_norm/gen"):
    np.testing.assert_allclose(metrics[k], base_run["metrics"][k], rtol=1e-4, atol=1e-7,
                               err_msg=k)


# Big steps, no clipping, no regulariser: the update direction is all that matters.
DIR_OBJ = dataclasses.replace(BASE_OBJ, text_clip=10.0, flow_clip=10.0, regularizer="none")
DIR_OPT = optim.OptimConfig(lr_und=1e-3, lr_gen=1e-3, ppo_epochs=1, num_minibatches=1)


def _logprob_fn(world):
  """Compiled ``params -> (text logp summed over tokens [B], flow logp mean over steps [B])``."""
  fn = jax.jit(lambda p, b: objective.policy_logprobs(p, world["graphdef"], b, DIR_OBJ))
  compiled = fn.lower(world["state"], world["traj"]).compile(FAST)

  def run(params):
    text, flow_lp = compiled(params, world["traj"])
    return np.asarray(text).sum(1), np.asarray(flow_lp).mean(1)

  return run


def test_update_direction(world):
  mesh = _mesh1()
  params, traj, _ = _put(world, mesh)
  step = ts.make_train_step(world["graphdef"], params, DIR_OBJ, DIR_OPT, mesh,
                            compiler_options=FAST)
  logprobs = _logprob_fn(world)
  text0, flow0 = logprobs(world["state"])
  np.testing.assert_allclose(text0, np.where(world["traj"].reasoning_mask,
                                             world["traj"].reasoning_logp, 0).sum(1), atol=1e-4)
  for sign in (1.0, -1.0):
    state = ts.init_train_state(params, DIR_OBJ, DIR_OPT, mesh, compiler_options=FAST)
    adv = jax.device_put(np.full((8,), sign, np.float32), par.batch_sharding(mesh))
    # regularizer="none": the reference is never read, so it may be None.
    new_state, _ = step(state, None, traj, adv, jax.random.key(0))
    text1, flow1 = logprobs(_host(new_state.params))
    # Every row's trajectory becomes more likely with A > 0 and less likely with A < 0.
    assert np.all(sign * (text1 - text0) > 0), (sign, text1 - text0)
    assert np.all(sign * (flow1 - flow0) > 0), (sign, flow1 - flow0)
  assert step._cache_size() == 1


@pytest.mark.parametrize("frozen", ["text", "image"])
def test_frozen_side_bit_identical(world, frozen):
  obj = dataclasses.replace(DIR_OBJ, train_text=frozen != "text",
                            train_image=frozen != "image", regularizer="velocity_mse",
                            stop_context_grad=False)  # flow grads DO reach the und side
  opt = dataclasses.replace(DIR_OPT, weight_decay=0.1)  # decay would move frozen params
  _, new_state, metrics = _run(world, _mesh1(), obj, opt)
  before = _leaves(world["state"])
  after = _leaves(_host(new_state.params))
  labels = {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_leaves_with_path(
      optim.param_labels(world["state"]))}
  frozen_side = "und" if frozen == "text" else "gen"
  n_changed = 0
  for k in before:
    if labels[k] == frozen_side:
      assert np.array_equal(before[k], after[k]), k
    else:
      n_changed += not np.array_equal(before[k], after[k])
  assert n_changed > 10  # the trained side did move


@pytest.mark.slow
def test_grad_accum_matches(world, base_run):
  """2 micro-batches per minibatch give the same update as one (seq_mean / means)."""
  opt = dataclasses.replace(BASE_OPT, grad_accum=2)
  _, new_state, _ = _run(world, _mesh1(), opt=opt)
  got = _leaves(_host(new_state.params))
  for k, v in base_run["params"].items():
    np.testing.assert_allclose(got[k], v, atol=1e-5, rtol=1e-5, err_msg=k)


def test_onpolicy_metrics_are_the_first_minibatch_only(world):
  """With 2 minibatches the second runs after an update: only the first is on-policy, and the
  ``onpolicy/*`` ratios are exactly that minibatch's (1), while the epoch's are not."""
  obj = dataclasses.replace(BASE_OBJ, regularizer="none")
  opt = optim.OptimConfig(lr_und=1e-3, lr_gen=1e-3, ppo_epochs=1, num_minibatches=2)
  _, _, m = _run(world, _mesh1(), obj, opt)
  for side in ("text", "flow"):
    for name in ("ratio_min", "ratio_max", "ratio_mean"):
      got = m[f"onpolicy/{side}/{name}"]
      assert abs(got - 1) < 1e-5, (side, name, got)
    assert m[f"onpolicy/{side}/approx_kl"] < 1e-8
  # The first epoch includes the post-update minibatch: its ratios are not all 1.
  assert max(abs(m["text/ratio_max"] - 1), abs(m["text/ratio_min"] - 1)) > 1e-3, m
  assert not any(k.startswith("epoch0/") for k in m)


def test_latent_kl_in_the_loss_matches_flow_grpo(world):
  """loss_fn's reg/latent_kl against a float64 NumPy Flow-GRPO KL built from the two models'
  velocities: mean((mu_theta - mu_ref)^2) / (2 a^2 t / (1 - t')), t' = t_next at grid step 0."""
  graphdef, traj, params = world["graphdef"], world["traj"], world["state"]
  bump = lambda p, x: (x + 0.2 * jax.random.normal(jax.random.key(8), x.shape, x.dtype)
                       if "llm2vae" in jax.tree_util.keystr(p) else x)
  ref = jax.tree_util.tree_map_with_path(bump, params)
  obj = dataclasses.replace(BASE_OBJ, regularizer="latent_kl")

  def fn(p, r, b, a):
    lay = objective.context_layout(b.prompt_tokens, b.prompt_mask, b.reasoning_tokens,
                            b.reasoning_mask, VS, PAD)
    _, v = objective._forward(graphdef, p, lay, b.window, obj)
    _, v_ref = objective._forward(graphdef, r, lay, b.window, obj)
    return objective.loss_fn(p, r, graphdef, b, a, obj)[1]["reg/latent_kl"], v, v_ref

  kl, v, v_ref = _fast_jit(jax.jit(fn), params, ref, traj, world["adv"])
  w = traj.window
  x = np.asarray(w.x_t, np.float64)
  t = np.asarray(w.t, np.float64)[..., None, None]
  tn = np.asarray(w.t_next, np.float64)[..., None, None]
  tp = np.where(np.asarray(w.step_index)[..., None, None] == 0, tn, t)

  def mean(vel):
    vel = np.asarray(vel, np.float64)
    return x + (vel + NOISE**2 / (2 * (1 - tp)) * (x + (1 - t) * vel)) * (tn - t)

  per = np.mean((mean(v) - mean(v_ref)) ** 2, axis=(2, 3))
  want = np.mean(per / (2 * NOISE**2 * t[..., 0, 0] / (1 - tp[..., 0, 0])))
  assert want > 1e-6  # the two models do differ
  np.testing.assert_allclose(float(kl), want, rtol=1e-4)


def _dot_output_shapes(jaxpr) -> list[tuple]:
  """Shapes of every dot_general output in a (closed) jaxpr, nested jaxprs included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      shapes.append(tuple(eqn.outvars[0].aval.shape))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          shapes += _dot_output_shapes(inner)
  return shapes


def test_lm_head_runs_only_on_reasoning_slots(world):
  """The loss's LM head produces [B, T, V] logits, never [B, P + T, V] over the context."""
  traj, adv, v = world["traj"], world["adv"], world["cfg"].vocab_size
  b, p, t = traj.reasoning_tokens.shape[0], traj.prompt_tokens.shape[1], \
      traj.reasoning_tokens.shape[1]
  obj = dataclasses.replace(BASE_OBJ, text_kl_coef=0.1)  # the reference's LM head too
  jaxpr = jax.make_jaxpr(lambda pr, bt, a: objective.loss_fn(pr, pr, world["graphdef"], bt, a, obj))(
      world["state"], traj, adv).jaxpr
  vocab_dots = [s for s in _dot_output_shapes(jaxpr) if s and s[-1] == v]
  assert vocab_dots and all(s == (b, t, v) for s in vocab_dots), vocab_dots


def test_logits_slice_equals_slicing_full_logits(world):
  model = nnx.merge(world["graphdef"], world["state"])
  tokens = jax.random.randint(jax.random.key(0), (2, 7), 3, world["cfg"].vocab_size)
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  full = model(tokens, pos).logits
  part = model(tokens, pos, logits_slice=(2, 4)).logits
  np.testing.assert_array_equal(np.asarray(part), np.asarray(full[:, 2:6]))
  with pytest.raises(ValueError, match=r"logits_slice=\(5, 4\) is outside the 7 text slots"):
    model(tokens, pos, logits_slice=(5, 4))
