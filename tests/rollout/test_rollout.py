"""The jitted rollout: on-policy image/text log-probs against the packed train-side forward,
determinism, group structure, no recompilation, and the evaluation sampler."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.rollout import flow
from unigrpo_jax.rollout.program import RolloutConfig, make_eval_sampler, make_rollout
from unigrpo_jax.rollout.trajectory import context_layout, token_logprobs

CFG = RolloutConfig(group_size=2, max_reasoning_len=5, stop_id=9, pad_id=0, vision_start_id=2,
                    num_steps=6, shift=3.0, noise_level=0.8, window_range=(0, 5), window_size=3)
PROMPTS = jnp.asarray([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]], jnp.int32)
MASK = PROMPTS > 0
# Low XLA optimisation: halves CPU compile time; numerics are still checked against references.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _perturb(state, seed):
  """Adds N(0, 0.05^2) to every leaf (host RNG: no per-shape PRNG kernels to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype),
                      state)


@pytest.fixture(scope="module")
def setup():
  """Tiny model with every parameter perturbed: the fresh llm2vae is zero (zero velocity), which
  would let an image-side check pass vacuously."""
  mcfg = get_preset("tiny")
  graphdef, state = nnx.split(UnifiedModel(mcfg, nnx.Rngs(0)))
  state = _perturb(state, 42)
  ae = PatchAutoencoder.for_model(mcfg)
  rollout = make_rollout(graphdef, CFG, ae, FAST_COMPILE)
  traj = rollout(state, PROMPTS, MASK, jax.random.key(0))
  return dict(mcfg=mcfg, graphdef=graphdef, state=state, ae=ae, rollout=rollout, traj=traj)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _packed_forward(graphdef, state, traj, reasoning_mask):
  """The train step's view: one packed forward over context_layout + the K window blocks.

  Returns text logits [B, P + T + 1, V], velocities [B, K, N, Dl], and per window step the
  recomputed SDE mean / std and step_logprob of the recorded x_next.
  """
  model, w = nnx.merge(graphdef, state), traj.window
  lay = context_layout(traj.prompt_tokens, traj.prompt_mask, traj.reasoning_tokens,
                       reasoning_mask, CFG.vision_start_id, CFG.pad_id)
  out = model(lay.tokens, lay.positions, lay.valid, latents=w.x_t, times=w.t,
              image_position=lay.image_position)
  v = out.velocity
  flat = lambda a: a.reshape(-1, *a.shape[2:])  # [B, K, ...] -> [B*K, ...]: one step per row
  _, mean, std = flow.sde_step(flat(w.x_t), flat(v), flat(w.t), flat(w.t_next),
                               jnp.zeros_like(flat(w.x_t)), CFG.noise_level,
                               first_step=flat(w.step_index) == 0)
  logp = flow.step_logprob(flat(w.x_next), mean, std)
  b, k = w.t.shape
  return out.logits, v, mean.reshape(w.mean.shape), std.reshape(b, k), logp.reshape(b, k)


def test_shapes_and_group_layout(setup):
  traj, mcfg = setup["traj"], setup["mcfg"]
  b, t, k = 4, CFG.max_reasoning_len, CFG.window_size
  n, dl = mcfg.num_image_tokens, mcfg.latent_dim
  assert traj.prompt_tokens.shape == (b, 5) and traj.reasoning_tokens.shape == (b, t)
  np.testing.assert_array_equal(traj.prompt_tokens, jnp.repeat(PROMPTS, 2, axis=0))
  assert traj.window.x_t.shape == (b, k, n, dl) and traj.window.logp.shape == (b, k)
  assert traj.latents.shape == (b, n, dl)
  assert traj.images.shape == (b, mcfg.image_size, mcfg.image_size, mcfg.image_channels)
  assert float(jnp.min(traj.images)) >= -1 and float(jnp.max(traj.images)) <= 1
  # Window: consecutive steps starting in [0, hi - size], times from the grid.
  idx = np.asarray(traj.window.step_index)
  assert np.all(idx[:, 0] >= 0) and np.all(idx[:, 0] <= 5 - k)
  np.testing.assert_array_equal(idx, idx[:, :1] + np.arange(k))
  grid = np.asarray(flow.timesteps(CFG.num_steps, CFG.shift))
  np.testing.assert_allclose(traj.window.t, grid[idx])
  np.testing.assert_allclose(traj.window.t_next, grid[idx + 1])
  # Members of a group share the prompt but not their randomness.
  for g in (0, 2):
    assert not np.array_equal(np.asarray(traj.reasoning_tokens[g]),
                              np.asarray(traj.reasoning_tokens[g + 1]))
    assert float(jnp.max(jnp.abs(traj.latents[g] - traj.latents[g + 1]))) > 1e-3


def test_image_and_text_on_policy(setup):
  """The train step's packed forward (context_layout + K window blocks) reproduces the rollout's
  velocities (via the SDE mean), image log-probs and text log-probs."""
  traj, w = setup["traj"], setup["traj"].window
  gs = setup["graphdef"], setup["state"]
  logits, v, mean, std, logp = _packed_forward(*gs, traj, traj.reasoning_mask)
  assert float(jnp.max(jnp.abs(v))) > 1e-2, "velocity is ~0: the image check would be vacuous"
  np.testing.assert_allclose(mean, w.mean, atol=1e-4)
  np.testing.assert_allclose(std, w.std, rtol=1e-6)
  np.testing.assert_allclose(logp, w.logp, atol=1e-4)
  # The step really moved: the mean is not just x_t, so a wrong velocity would show.
  assert float(jnp.max(jnp.abs(w.mean - w.x_t))) > 1e-3
  p, t = traj.prompt_tokens.shape[1], CFG.max_reasoning_len
  lp = token_logprobs(logits[:, p - 1:p + t - 1], traj.reasoning_tokens, CFG.temperature)
  np.testing.assert_allclose(jnp.where(traj.reasoning_mask, lp, 0.0), traj.reasoning_logp,
                             atol=2e-5)
  # A context with the reasoning dropped changes the velocity: the image really reads the text.
  _, v2, _, _, _ = _packed_forward(*gs, traj, jnp.zeros_like(traj.reasoning_mask))
  assert float(jnp.max(jnp.abs(v2 - v))) > 1e-4


def test_determinism_and_no_recompile(setup):
  rollout, state, traj = setup["rollout"], setup["state"], setup["traj"]
  again = rollout(state, PROMPTS, MASK, jax.random.key(0))
  for a, b in zip(jax.tree.leaves(traj), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  other_prompts = jnp.asarray([[31, 32, 33, 34, 35], [0, 0, 0, 41, 42]], jnp.int32)
  other = rollout(state, other_prompts, other_prompts > 0, jax.random.key(1))
  assert not np.array_equal(np.asarray(other.latents), np.asarray(traj.latents))
  assert rollout._cache_size() == 1  # same shapes, new data: one compiled executable


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_eval_sampler(setup, scale):
  mcfg = setup["mcfg"]
  sampler = make_eval_sampler(setup["graphdef"], CFG, setup["ae"], num_steps=8, cfg_scale=scale,
                              greedy_text=True, compiler_options=FAST_COMPILE)
  out = sampler(setup["state"], PROMPTS, MASK, jax.random.key(3))
  assert out.images.shape == (2, mcfg.image_size, mcfg.image_size, mcfg.image_channels)
  assert bool(jnp.all(jnp.isfinite(out.images)))
  assert float(jnp.min(out.images)) >= -1 and float(jnp.max(out.images)) <= 1
  assert out.reasoning_tokens.shape == (2, CFG.max_reasoning_len)
  setup.setdefault("eval_latents", {})[scale] = out.latents
  if len(setup["eval_latents"]) == 2:  # same key, same greedy text: CFG alone moves the image
    diff = setup["eval_latents"][3.0] - setup["eval_latents"][1.0]
    assert float(jnp.max(jnp.abs(diff))) > 1e-3


@pytest.mark.parametrize("bad, field", [
    (dict(window_range=(0, 8)), "window_range"),
    (dict(window_range=(0, 5), window_size=6), "window_size"),
    (dict(group_size=0), "group_size"),
    (dict(sde_type="ode"), "sde_type"),
    (dict(top_p=0.0), "top_p"),
    (dict(noise_level=0.0), "noise_level"),
])
def test_config_validation(bad, field):
  kwargs = dict(group_size=2, max_reasoning_len=4, stop_id=1, pad_id=0, vision_start_id=2,
                num_steps=6)
  kwargs.update(bad)
  with pytest.raises(ValueError, match=f"RolloutConfig.{field}"):
    RolloutConfig(**kwargs)
