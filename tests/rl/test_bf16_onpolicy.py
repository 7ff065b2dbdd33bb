"""bf16 on-policy check on a BAGEL-format model (tiny random directory, flow_clip 1e-6, the
paper's clip at 1024 px): the rollout's cached forward and the train step's packed forward
differ by more than the clip in bf16 (here up to 5e-5 in a window step's log-prob), so with the
rollout's log-probs as PPO's "old" ones the first minibatch already clips those steps (no
gradient from them before any update); ``objective.recompute_old_logp`` takes the old values
from the train path instead and every first ratio is exactly 1."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from unigrpo_jax import parallel as par
from unigrpo_jax.data.encoding import encode_prompts
from unigrpo_jax.data.qwen_tokenizer import QwenTokenizer
from unigrpo_jax.models.unified.loading import load_bagel
from unigrpo_jax.rl import objective, optim
from unigrpo_jax.rl import train_step as ts
from unigrpo_jax.rollout.program import RolloutConfig, make_rollout
from unigrpo_jax.testing.tiny_bagel import write_tiny_bagel_dir
from test_bagel_dir import FAST_COMPILE, _RawLatents


@pytest.fixture(scope="module")
def bf16_world(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bagel"))
  write_tiny_bagel_dir(path, image_size=32, max_latent_size=4)
  tok = QwenTokenizer.from_file(path)
  model = load_bagel(path, image_size=32, dtype="bfloat16", compute_dtype="bfloat16")
  graphdef, state = nnx.split(model)
  prompts, mask = encode_prompts(tok, ["a red apple", "two blue cats under a tree"], 128)
  rcfg = RolloutConfig(group_size=2, max_reasoning_len=4, stop_id=tok.think_end_id,
                       pad_id=tok.pad_id, vision_start_id=tok.vision_start_id, num_steps=4,
                       window_range=(0, 3), window_size=2)
  # The rollout and the train step are two XLA programs whose bf16 arithmetic is fused and
  # rounded differently (on a TPU: different kernels for the cached decode and the packed
  # forward). On this CPU the same options happen to round both paths alike, so the rollout is
  # compiled here at optimisation level 0 and the train step with the defaults.
  traj = make_rollout(graphdef, rcfg, _RawLatents(model.cfg), FAST_COMPILE)(
      state, jnp.asarray(prompts), jnp.asarray(mask), jax.random.key(0))
  return tok, graphdef, state, traj


@pytest.mark.parametrize("recompute", [False, True])
def test_first_minibatch_ratios_in_bf16(bf16_world, recompute):
  tok, graphdef, state, traj = bf16_world
  mesh = par.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  obj = objective.ObjectiveConfig(vision_start_id=tok.vision_start_id, pad_id=tok.pad_id,
                                  flow_clip=1e-6, recompute_old_logp=recompute)
  opt = optim.OptimConfig(ppo_epochs=1, num_minibatches=1, lr_und=1e-6, lr_gen=1e-6)
  step = ts.make_train_step(graphdef, state, obj, opt, mesh, donate=False)
  train_state = ts.init_train_state(state, obj, opt, mesh)
  adv = jnp.array([1.0, -1.0, 0.5, -0.5], jnp.float32)
  _, m = step(train_state, state, traj, adv, jax.random.key(1))
  m = jax.device_get(m)
  if not recompute:  # the problem, measured: window steps outside the 1e-6 band at step 0
    assert float(m["onpolicy/flow_logp_maxdiff"]) > 1e-6
    assert float(m["onpolicy/flow/ratio_out_frac"]) > 0
  else:
    assert float(m["onpolicy/rollout_flow_logp_maxdiff"]) > 1e-6  # still reported
    assert float(m["onpolicy/flow_logp_maxdiff"]) == 0.0
    assert float(m["onpolicy/flow/ratio_out_frac"]) == 0.0
    assert float(m["onpolicy/text/ratio_out_frac"]) == 0.0
  print(recompute, {k: float(v) for k, v in m.items() if "onpolicy" in k and ("maxdiff" in k
                                                                             or "out_frac" in k)})
