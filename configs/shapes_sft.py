"""Reproduces the shipped warm start unigrpo_jax/assets/shapes_sft (see README)."""
from unigrpo_jax import config_defaults


def get_config():
  c = config_defaults.base()
  c.mode = "sft"
  c.model.preset = "shapes"
  c.log_every = 50
  return c
