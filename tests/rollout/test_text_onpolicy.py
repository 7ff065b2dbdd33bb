"""The text policy is on-policy in the first PPO epoch for every sampling knob.

The rollout and the train step are built from one ConfigDict through the trainer's own mapping
(``rollout_config`` / ``objective_config``), so a knob the objective does not receive (as top_k /
top_p once were) shows up as a first-epoch text ratio != 1. The tiny model's embedding table has
192 rows for the ShapeWorld tokenizer's 78 words (as the first shipped warm start had), so the default
``rollout.vocab_limit`` (-1: the tokenizer's size) must keep every sampled id below 78.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unigrpo_jax import config_defaults
from unigrpo_jax import parallel as par
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.data.tokenizer import Tokenizer
from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.rl import train_step as ts
from unigrpo_jax.rollout import distribution
from unigrpo_jax.rollout.program import make_rollout
from unigrpo_jax.trainers.build import objective_config, optim_config, rollout_config
from unigrpo_jax.data.shapeworld.world import shapeworld_tokenizer

FAST = {"xla_backend_optimization_level": 0}
TOK = shapeworld_tokenizer()


def _config(**rollout):
  c = config_defaults.base()
  c.rollout.group_size = 4
  c.rollout.max_reasoning_len = 8
  c.rollout.num_steps = 4
  c.rollout.window_range = (0, 3)
  c.rollout.window_size = 1
  c.optim.ppo_epochs = 1
  c.objective.regularizer = "none"  # no reference forward: only the ratios matter here
  for k, v in rollout.items():
    c.rollout[k] = v
  return c


@pytest.fixture(scope="module")
def model():
  cfg = get_preset("tiny")  # 192 embedding rows > the tokenizer's 78 words
  assert cfg.vocab_size > TOK.vocab_size
  mesh = par.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  graphdef, state = par.create_sharded_model(cfg, 0, mesh, model_fn=UnifiedModel, compiler_options=FAST)
  return dict(cfg=cfg, mesh=mesh, graphdef=graphdef, state=state)


def _first_step(model, config):
  rcfg, ocfg = rollout_config(config, TOK), objective_config(config, TOK)
  rollout = make_rollout(model["graphdef"], rcfg, PatchAutoencoder.for_model(model["cfg"]))
  prompts = jax.random.randint(jax.random.key(2), (2, 5), 7, TOK.vocab_size)
  mask = jnp.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
  args = (model["state"], prompts, mask, jax.random.key(3))
  traj = rollout.lower(*args).compile(FAST)(*args)
  mesh, optcfg = model["mesh"], optim_config(config)
  step = ts.make_train_step(model["graphdef"], model["state"], ocfg, optcfg, mesh,
                            donate=False)
  state = ts.init_train_state(model["state"], ocfg, optcfg, mesh, compiler_options=FAST)
  adv = jnp.linspace(-1.0, 1.0, traj.reasoning_tokens.shape[0])
  step_args = (state, None, traj, adv, jax.random.key(4))
  _, metrics = step.lower(*step_args).compile(FAST)(*step_args)
  return jax.device_get(traj), jax.device_get(metrics)


# ~10-25 s each on 2 CPU cores (two compiles): the filter cases, which were off-policy before,
# stay in the fast suite.
@pytest.mark.parametrize("knobs", [
    pytest.param({}, marks=pytest.mark.slow, id="default"),
    pytest.param({"temperature": 0.7}, marks=pytest.mark.slow, id="temperature"),
    pytest.param({"top_k": 5}, id="top_k"),
    pytest.param({"top_p": 0.9}, id="top_p"),
    pytest.param({"temperature": 0.7, "top_k": 5, "top_p": 0.9, "vocab_limit": 40},
                 marks=pytest.mark.slow, id="all"),
])
def test_first_epoch_text_ratio_is_one(model, knobs):
  traj, m = _first_step(model, _config(**knobs))
  for name in ("ratio_min", "ratio_max", "ratio_mean"):
    assert abs(m[f"onpolicy/text/{name}"] - 1.0) < 1e-5, (name, m[f"onpolicy/text/{name}"])
  assert m["onpolicy/text_logp_maxdiff"] < 1e-5, m["onpolicy/text_logp_maxdiff"]
  # Every sampled id is a word of the tokenizer (or of the explicit smaller limit).
  limit = knobs.get("vocab_limit", TOK.vocab_size)
  valid = np.asarray(traj.reasoning_mask)
  assert valid.sum() > 10
  assert np.asarray(traj.reasoning_tokens)[valid].max() < limit


def test_filtered_log_probs_match_numpy():
  """masked_logits / sampling_log_probs against a float64 NumPy filter, [B, L, V] inputs."""
  logits = np.asarray(2.0 * jax.random.normal(jax.random.key(0), (3, 4, 30)), np.float32)
  got = np.asarray(distribution.sampling_log_probs(logits, temperature=0.8, top_k=6, top_p=0.7,
                                                   vocab_limit=25))
  x = logits.astype(np.float64)
  x[..., 25:] = -np.inf
  x = x / 0.8
  kth = np.sort(x, -1)[..., -6:-5]
  x = np.where(x < kth, -np.inf, x)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  order = np.argsort(-p, -1)
  sp = np.take_along_axis(p, order, -1)
  keep_sorted = (np.cumsum(sp, -1) - sp) < 0.7
  keep = np.zeros_like(keep_sorted)
  np.put_along_axis(keep, order, keep_sorted, -1)
  want = np.where(keep, np.log(np.where(keep, p, 1.0) / np.sum(np.where(keep, p, 0), -1,
                                                                 keepdims=True)), -np.inf)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], atol=1e-5)
  assert np.all(np.isinf(got[..., 25:]))
  # token_logprobs scores a target with exactly these values.
  targets = np.argmax(got, -1)
  np.testing.assert_allclose(
      distribution.token_logprobs(logits, targets, 0.8, top_k=6, top_p=0.7, vocab_limit=25),
      np.take_along_axis(got, targets[..., None], -1)[..., 0], atol=1e-6)
