"""The pod configs: BAGEL-7B-MoT with the paper's Table 3 settings, and the ShapeWorld smoke
config that kept its old settings under a new name."""
import importlib

import pytest

from unigrpo_jax import config_validation
from unigrpo_jax.trainers import build, unigrpo


def _config(name):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", ["tpu_v5", "tpu_v4", "tpu_v5e"])
def test_bagel_pod_configs_carry_table3(name):
  c = _config(name)
  config_validation.validate(c)
  assert c.model.preset == "bagel_7b_mot" and c.model.vocab_size == 152064
  assert (c.model.scan_layers, c.model.remat, c.model.dtype) == (True, True, "bfloat16")
  r, o = c.rollout, c.objective
  assert (r.prompts_per_batch, r.group_size, r.num_steps, r.shift) == (32, 24, 25, 3.0)
  assert (tuple(r.window_range), r.window_size, r.noise_level) == ((0, 5), 3, 0.8)
  assert (c.optim.ppo_epochs, c.optim.lr_und, c.optim.lr_gen) == (2, 1e-6, 3e-5)
  assert (o.flow_clip, o.regularizer, o.reg_weight) == (1e-6, "velocity_mse", 1.5e-5)
  assert c.model.image_size == 1024 and r.cfg_scale == 1.0
  # Planning without weights gives BAGEL's shapes (scan and remat included).
  cfg, params = build.model_and_params(c, build.tokenizer_for(c))
  assert params is None and (cfg.num_layers, cfg.hidden, cfg.num_image_tokens) == (28, 3584, 4096)
  assert cfg.scan_layers and cfg.remat


def test_bagel_pod_config_refuses_to_train_without_weights(tmp_path):
  c = _config("tpu_v5")
  with pytest.raises(ValueError, match=r"init_checkpoint is empty.*bagel_7b_mot.*require_weights"):
    unigrpo.run_train(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # nothing written, nothing compiled


def test_shapeworld_pod_config_kept_under_new_name():
  c = _config("tpu_v5_shapes")
  config_validation.validate(c)
  assert c.model.preset == "shapes_large" and not c.model.get("require_weights")
