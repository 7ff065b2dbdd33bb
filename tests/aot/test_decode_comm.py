"""The rollout's decode layout (``text.DecodeLayout``) on the 8 fake CPU devices.

The trainer's layout (weights FSDP over all 8 chips) makes every chip compute a slice of every
row's contractions and all-reduce all rows' activations and logits; the decode layout (rows over
4 groups of 2 chips, the understanding expert split inside a group) must sample the same tokens
with the same log-probs while moving fewer bytes per step, in groups of 2.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unigrpo_jax import config_defaults
from unigrpo_jax import parallel as par
from unigrpo_jax.aot import comm
from unigrpo_jax.data.shapeworld.world import shapeworld_tokenizer
from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.rollout import program
from unigrpo_jax.trainers.build import rollout_config

FAST = {"xla_backend_optimization_level": 0}
T = 8


@pytest.fixture(scope="module")
def runs():
  tok = shapeworld_tokenizer()
  c = config_defaults.base()
  c.rollout.group_size, c.rollout.max_reasoning_len, c.rollout.num_steps = 4, T, 2
  c.rollout.window_range, c.rollout.window_size = (0, 2), 1
  cfg = get_preset("tiny")  # 4 heads, 2 KV heads
  mesh = par.make_mesh(1, -1, 1)
  graphdef, state = par.create_sharded_model(cfg, 0, mesh, model_fn=UnifiedModel,
                                             compiler_options=FAST)
  rows = par.rows_sharding(mesh, 8)
  prompts = jax.device_put(jax.random.randint(jax.random.key(2), (8, 5), 7, tok.vocab_size), rows)
  mask = jax.device_put(jnp.ones((8, 5), bool).at[0, :2].set(False), rows)
  out = {}
  for tensor in (1, -1):
    rcfg = dataclasses.replace(rollout_config(c, tok), decode_tensor=tensor)
    fn = program.make_rollout(graphdef, rcfg, PatchAutoencoder.for_model(cfg), mesh=mesh)
    args = (state, prompts, mask, jax.random.key(3))
    compiled = fn.lower(*args).compile(FAST)
    analysis = comm.analyze(compiled.as_text(), hints={T: T})
    decode = [lp for lp in analysis.loops.values() if lp.trip_source == "hint"]
    assert len(decode) == 1 and decode[0].trips == T
    step = [c for c in analysis.collectives if decode[0].name in analysis.loop_chain(c.loop)]
    out[tensor] = (jax.device_get(compiled(*args)), step)
  return out


def test_auto_layout_is_two_chips_per_group():
  mesh = par.make_mesh(1, -1, 1)
  assert par.auto_decode_tensor(mesh, 32, 4, 2) == 2
  assert par.auto_decode_tensor(mesh, 768, 28, 4) == 4  # BAGEL-7B's heads
  assert par.auto_decode_tensor(mesh, 32, 3, 1) == 1
  assert par.auto_decode_tensor(par.make_mesh(1, 4, 2), 32, 4, 2) == 1  # a tensor axis already
  layout = program.decode_layout(mesh, 32, get_preset("tiny"))
  assert dict(layout.mesh.shape) == {"rows": 4, "model": 2}
  assert list(layout.mesh.devices.flat) == list(mesh.devices.flat)
  assert program.decode_layout(mesh, 32, get_preset("tiny"), decode_tensor=1) is None


def test_same_samples_in_both_layouts(runs):
  a, b = runs[1][0], runs[-1][0]
  np.testing.assert_array_equal(a.reasoning_tokens, b.reasoning_tokens)
  np.testing.assert_array_equal(a.reasoning_mask, b.reasoning_mask)
  np.testing.assert_allclose(a.reasoning_logp, b.reasoning_logp, atol=1e-5)
  np.testing.assert_allclose(a.latents, b.latents, atol=1e-4)


def test_decode_step_moves_fewer_bytes_in_small_groups(runs):
  per_step = lambda cs: sum(c.operand_bytes * c.executions for c in cs) / T
  before, after = runs[1][1], runs[-1][1]
  assert {c.group_size for c in before} == {8}
  # Inside a row group only; the loop condition still asks every chip whether all rows are done.
  assert {c.group_size for c in after if "/cond/" not in c.op_name} == {2}
  assert {c.operand_bytes for c in after if "/cond/" in c.op_name} == {1}
  assert per_step(after) * 4 < per_step(before), (per_step(after), per_step(before))
  # No collective of a decode step carries every row's logits any more (32 rows x 192 ids).
  assert max(c.operand_bytes for c in after) < 32 * 192 * 4 / 4
