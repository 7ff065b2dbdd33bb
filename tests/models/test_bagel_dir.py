"""The real-model path on a random tiny BAGEL-format directory: the trainer's setup builds the
tokenizer and the sharded model from it, and a rollout in BAGEL's thinking layout is on-policy
for the train step. (The FLUX VAE is not part of this check: latents are decoded as-is.)"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unigrpo_jax import parallel
from unigrpo_jax.data.encoding import encode_prompts
from unigrpo_jax.data.qwen_tokenizer import QwenTokenizer
from unigrpo_jax.models.autoencoder import Autoencoder
from unigrpo_jax.testing.tiny_bagel import write_tiny_bagel_dir
from unigrpo_jax.rl import train_step as ts
from unigrpo_jax.rollout.program import RolloutConfig, make_rollout
from unigrpo_jax.trainers import build
from unigrpo_jax.rl import objective

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class _RawLatents(Autoencoder):
  """Latent tokens shown as a [B, g, g, Dl] 'image' (no VAE in this test)."""

  def __init__(self, cfg):
    self.grid, self.latent_dim = cfg.latent_grid, cfg.latent_dim
    self.num_tokens = self.grid ** 2

  def encode(self, images):
    return images.reshape(images.shape[0], -1, self.latent_dim)

  def decode(self, tokens):
    return tokens.reshape(tokens.shape[0], self.grid, self.grid, self.latent_dim)


@pytest.fixture(scope="module")
def bagel_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bagel"))
  write_tiny_bagel_dir(path, image_size=32, max_latent_size=4)
  return path


def _bagel_7b_config():
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "bagel_7b.py")
  spec = importlib.util.spec_from_file_location("bagel_7b_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_setup_builds_tokenizer_and_sharded_model(bagel_dir):
  config = _bagel_7b_config()
  config.init_checkpoint = bagel_dir
  config.model.image_size = 32
  config.model.param_dtype = config.model.dtype = "float32"
  config.model.remat = False
  tok = build.tokenizer_for(config)
  assert isinstance(tok, QwenTokenizer)
  model_cfg, params = build.model_and_params(config, tok)
  assert params is None and model_cfg.block_markers
  assert model_cfg.vision_start_id == tok.vision_start_id
  assert tok.vocab_size < model_cfg.vocab_size  # padding rows, as in the real model
  mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1)
  graphdef, state = build.build_params(config, model_cfg, None, mesh)
  embed = state["embed"].get_value()
  assert embed.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_thinking_rollout_is_on_policy(bagel_dir):
  from unigrpo_jax.models.unified.loading import load_bagel
  from flax import nnx
  tok = QwenTokenizer.from_file(bagel_dir)
  model = load_bagel(bagel_dir, image_size=32)
  graphdef, state = nnx.split(model)
  prompts, mask = encode_prompts(tok, ["a red apple", "two blue cats under a tree"], 128)
  rcfg = RolloutConfig(group_size=2, max_reasoning_len=4, stop_id=tok.think_end_id,
                       pad_id=tok.pad_id, vision_start_id=tok.vision_start_id, num_steps=4,
                       window_range=(0, 3), window_size=2)
  traj = make_rollout(graphdef, rcfg, _RawLatents(model.cfg), FAST_COMPILE)(
      state, jnp.asarray(prompts), jnp.asarray(mask), jax.random.key(0))
  obj = objective.ObjectiveConfig(vision_start_id=tok.vision_start_id, pad_id=tok.pad_id)
  text_lp, flow_lp = jax.jit(objective.policy_logprobs, static_argnums=(1, 3),
                             compiler_options=FAST_COMPILE)(state, graphdef, traj, obj)
  np.testing.assert_allclose(text_lp, traj.reasoning_logp, atol=2e-5)
  np.testing.assert_allclose(flow_lp, traj.window.logp, atol=1e-4)
  assert float(jnp.max(jnp.abs(traj.window.mean - traj.window.x_t))) > 1e-3
