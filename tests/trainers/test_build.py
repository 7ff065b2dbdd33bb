"""trainers/build.py: the compiled programs on their default branches."""
import jax
import jax.numpy as jnp
import numpy as np

from unigrpo_jax.data.shapeworld.world import shapeworld_tokenizer
from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.trainers import build

from test_trainer import tiny_config


def test_build_programs_defaults_to_the_models_patch_autoencoder():
  """``autoencoder=None`` (as the AOT planner calls it) builds the model's PatchAutoencoder: the
  rollout traces to images of the model's size. (The default once named an unimported class.)"""
  config = tiny_config()
  tok = shapeworld_tokenizer()
  model_cfg, _ = build.model_and_params(config, tok)
  mesh, rules = build.mesh_and_rules(config)
  graphdef, params = build.build_params(config, model_cfg, None, mesh, rules)
  rcfg = build.rollout_config(config, tok)
  programs = build.build_programs(config, graphdef, params, model_cfg, mesh, rules, rcfg,
                                  build.objective_config(config, tok), build.optim_config(config),
                                  autoencoder=None)
  assert isinstance(programs, build.Programs)
  prompts = config.rollout.prompts_per_batch
  tokens = jax.ShapeDtypeStruct((prompts, config.data.max_prompt_len), jnp.int32)
  mask = jax.ShapeDtypeStruct(tokens.shape, jnp.bool_)
  traj = jax.eval_shape(programs.rollout, params, tokens, mask, jax.random.key(0))
  ae = PatchAutoencoder.for_model(model_cfg)
  rows = prompts * rcfg.group_size
  assert traj.images.shape == (rows, model_cfg.image_size, model_cfg.image_size,
                               model_cfg.image_channels)
  assert traj.latents.shape[1:] == (model_cfg.num_image_tokens, ae.latent_dim)
  assert np.dtype(traj.reasoning_tokens.dtype) == np.int32
