"""``objective.separate_window_blocks``: one rematerialised forward per window block gives the
same loss, metrics and gradients as the packed forward of all K blocks."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unigrpo_jax import parallel as par
from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.rl import objective
from unigrpo_jax.rollout.program import RolloutConfig, make_rollout

FAST = {"xla_backend_optimization_level": 0}


def test_separate_blocks_equal_the_packed_forward():
  cfg = get_preset("tiny")
  mesh = par.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  graphdef, state = par.create_sharded_model(cfg, 0, mesh, model_fn=UnifiedModel,
                                             compiler_options=FAST)
  kernel = state["latent_io"]["llm2vae_kernel"]  # zero at init: make the velocity non-zero
  kernel.set_value(0.1 * jax.random.normal(jax.random.key(1), kernel.get_value().shape))
  rcfg = RolloutConfig(group_size=2, max_reasoning_len=4, stop_id=1, pad_id=0,
                       vision_start_id=2, num_steps=5, window_range=(0, 4), window_size=3)
  rollout = make_rollout(graphdef, rcfg, PatchAutoencoder.for_model(cfg))
  prompts = jax.random.randint(jax.random.key(2), (2, 4), 3, cfg.vocab_size)
  mask = jnp.ones((2, 4), bool)
  traj = rollout.lower(state, prompts, mask, jax.random.key(3)).compile(FAST)(
      state, prompts, mask, jax.random.key(3))
  assert traj.window.x_t.shape[1] == 3
  adv = jnp.array([1.0, -0.5, 0.3, -0.8], jnp.float32)
  params, rest = nnx.split_state(state, nnx.Param, ...)
  ref = jax.tree.map(lambda x: x * 1.01, state)  # a reference that differs from the policy
  results = []
  for separate in (False, True):
    ocfg = objective.ObjectiveConfig(vision_start_id=2, pad_id=0, noise_level=0.8,
                                     separate_window_blocks=separate)

    def loss(p, ocfg=ocfg):
      return objective.loss_fn(nnx.merge_state(p, rest), ref, graphdef, traj, adv, ocfg)

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    results.append((value, metrics, grads))
  (v0, m0, g0), (v1, m1, g1) = results
  np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-7)
  for k in m0:
    np.testing.assert_allclose(m1[k], m0[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g0))
