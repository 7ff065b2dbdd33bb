"""BAGEL's conventions in the one UnifiedModel: unscaled timesteps, the stored latent position
table, and the image block ``<|vision_start|> latents <|vision_end|>`` at one RoPE position.

Numerical parity against an independent torch implementation lives in test_pretrained.py; here:
the conventions' formulas, that the markers really take part (through the understanding
expert), and that the rollout and the train step's packed forward agree on the new layout.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.models.unified.latent_io import (bagel_sincos_table, latent_position_ids, timestep_sinusoid)
from unigrpo_jax.rl import train_step as ts
from unigrpo_jax.rollout.program import RolloutConfig, make_eval_sampler, make_rollout
from unigrpo_jax.rollout.trajectory import context_layout
from unigrpo_jax.rl import objective

VS, VE = 5, 6
MCFG = get_preset("tiny", timestep_scale=1.0, max_latent_size=6, vision_start_id=VS,
                  vision_end_id=VE)
CFG = RolloutConfig(group_size=2, max_reasoning_len=4, stop_id=9, pad_id=0, vision_start_id=2,
                    num_steps=6, shift=3.0, noise_level=0.8, window_range=(0, 5), window_size=2)
PROMPTS = jnp.asarray([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]], jnp.int32)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _perturbed_model(seed=0):
  graphdef, state = nnx.split(UnifiedModel(MCFG, nnx.Rngs(seed)))
  rng = np.random.default_rng(seed + 1)
  state = jax.tree.map(lambda x: x + jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype),
                       state)
  return graphdef, state


def test_timestep_embedding_is_bagels():
  t = jnp.asarray([0.0, 0.25, 0.9])
  feats = np.asarray(timestep_sinusoid(t, 256, 1.0))
  freqs = np.exp(-np.log(1e4) * np.arange(128) / 128)
  args = np.asarray(t)[:, None] * freqs[None]
  np.testing.assert_allclose(feats, np.concatenate([np.cos(args), np.sin(args)], 1), atol=1e-6)


def test_latent_positions_read_the_stored_table():
  ids = latent_position_ids(3, 64)
  np.testing.assert_array_equal(ids, [0, 1, 2, 64, 65, 66, 128, 129, 130])
  table = bagel_sincos_table(4, 8)
  # First half encodes the column (BAGEL meshgrids (w, h)); row 1*4+2 = (row 1, col 2).
  omega = 1.0 / 10000 ** (np.arange(2) / 2)
  want = np.concatenate([np.sin(2 * omega), np.cos(2 * omega), np.sin(omega), np.cos(omega)])
  np.testing.assert_allclose(table[6], want, rtol=1e-6)
  model = UnifiedModel(MCFG, nnx.Rngs(0))
  assert model.latent_io.pos_embed[...].shape == (36, MCFG.hidden)
  assert not isinstance(model.latent_io.pos_embed, nnx.Param)  # frozen, as in BAGEL
  new = jax.random.normal(jax.random.key(1), (36, MCFG.hidden))
  model.latent_io.pos_embed[...] = new
  grid = MCFG.latent_grid  # 4x4 tokens read rows r * 6 + c
  want = np.asarray(new)[latent_position_ids(grid, 6)]
  np.testing.assert_array_equal(model.latent_io.positions(), want)


def test_markers_take_part_through_the_understanding_expert():
  graphdef, state = _perturbed_model()
  fresh = lambda: nnx.merge(graphdef, jax.tree.map(jnp.copy, state))  # edits must not leak
  model = fresh()
  ctx = jnp.asarray([[11, 12, 13]], jnp.int32)
  pos = jnp.arange(3)[None]
  x = jax.random.normal(jax.random.key(0), (1, MCFG.num_image_tokens, MCFG.latent_dim))
  t = jnp.asarray([0.4])

  def velocity(m):
    return m(ctx, pos, latents=x, times=t, image_position=jnp.asarray([3])).velocity

  base = velocity(model)
  # The <|vision_end|> embedding row moves the velocity; an unrelated row does not.
  for row, moves in ((VE, True), (40, False)):
    m = fresh()
    m.embed[...] = m.embed[...].at[row].add(1.0)
    assert (float(jnp.max(jnp.abs(velocity(m) - base))) > 1e-4) == moves, row
  # The last layer's und MLP changes only text outputs (markers' last outputs are unused) ...
  m = fresh()
  m.layers[-1].und.mlp.down[...] = m.layers[-1].und.mlp.down[...] * 2
  np.testing.assert_allclose(velocity(m), base, atol=1e-6)
  # ... but the first layer's und MLP reaches the latents through the markers (and the context).
  m = fresh()
  m.layers[0].und.mlp.down[...] = m.layers[0].und.mlp.down[...] * 2
  without_ctx = lambda mm: mm(latents=x, times=t, image_position=jnp.asarray([0])).velocity
  assert float(jnp.max(jnp.abs(without_ctx(m) - without_ctx(model)))) > 1e-4
  # Text never sees the block: logits with and without latents are identical.
  out = model(ctx, pos, latents=x, times=t, image_position=jnp.asarray([3]))
  np.testing.assert_allclose(out.logits, model(ctx, pos).logits, atol=1e-6)


def test_image_position_is_shared_by_markers_and_latents():
  """Shifting the whole (context, block) by a constant leaves RoPE-relative results unchanged,
  while moving only the block by one position changes them: the block has ONE position."""
  graphdef, state = _perturbed_model()
  model = nnx.merge(graphdef, state)
  ctx = jnp.asarray([[11, 12, 13]], jnp.int32)
  x = jax.random.normal(jax.random.key(0), (1, MCFG.num_image_tokens, MCFG.latent_dim))
  t = jnp.asarray([0.7])
  v = lambda off, p: model(ctx, jnp.arange(3)[None] + off, latents=x, times=t,
                           image_position=jnp.asarray([p])).velocity
  np.testing.assert_allclose(v(0, 3), v(7, 10), atol=2e-5)
  assert float(jnp.max(jnp.abs(v(0, 3) - v(0, 4)))) > 1e-4


def test_context_layout_with_block_markers():
  pm = PROMPTS > 0
  rt = jnp.asarray([[7, 9, 0, 0], [7, 8, 8, 9]])
  rm = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  lay = context_layout(PROMPTS, pm, rt, rm, 2, 0, block_markers=True)
  np.testing.assert_array_equal(lay.image_position, [3 + 2, 5 + 4])
  assert not bool(jnp.any(lay.valid[:, -1]))  # the spare slot is padding
  np.testing.assert_array_equal(lay.tokens[:, -1], [0, 0])
  toy = context_layout(PROMPTS, pm, rt, rm, 2, 0)
  np.testing.assert_array_equal(toy.image_position, lay.image_position + 1)


@functools.lru_cache(maxsize=1)
def _rollout():
  graphdef, state = _perturbed_model(3)
  ae = PatchAutoencoder.for_model(MCFG)
  traj = make_rollout(graphdef, CFG, ae, FAST_COMPILE)(state, PROMPTS, PROMPTS > 0,
                                                       jax.random.key(0))
  return graphdef, state, ae, traj


def test_train_step_reproduces_bagel_rollout_logprobs():
  graphdef, state, _, traj = _rollout()
  obj = objective.ObjectiveConfig(vision_start_id=CFG.vision_start_id, pad_id=0,
                           noise_level=CFG.noise_level)
  text_lp, flow_lp = jax.jit(objective.policy_logprobs, static_argnums=(1, 3),
                             compiler_options=FAST_COMPILE)(state, graphdef, traj, obj)
  np.testing.assert_allclose(text_lp, traj.reasoning_logp, atol=2e-5)
  np.testing.assert_allclose(flow_lp, traj.window.logp, atol=1e-4)
  assert float(jnp.max(jnp.abs(traj.window.mean - traj.window.x_t))) > 1e-3


def test_bagel_eval_sampler_with_cfg():
  graphdef, state, ae, _ = _rollout()
  sampler = make_eval_sampler(graphdef, CFG, ae, num_steps=3, cfg_scale=3.0, greedy_text=True,
                              compiler_options=FAST_COMPILE)
  out = sampler(state, PROMPTS, PROMPTS > 0, jax.random.key(1))
  assert bool(jnp.all(jnp.isfinite(out.latents)))


@pytest.mark.parametrize("kw, field", [
    (dict(vision_start_id=5), "vision_end_id"),
    (dict(vision_start_id=5, vision_end_id=999), "vision_end_id"),
    (dict(max_latent_size=2), "max_latent_size"),
])
def test_bad_bagel_fields(kw, field):
  with pytest.raises(ValueError, match=field):
    get_preset("tiny", **kw)
