"""The ablation configs pass the trainer's validation and change only what they ablate."""
import glob
import importlib
import os

import pytest

from configs import shapes_cpu
from configs.ablations import hackable
from unigrpo_jax import config_validation

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ABLATIONS = sorted(os.path.basename(f)[:-3]
                   for f in glob.glob(os.path.join(REPO, "configs", "ablations", "*.py"))
                   if not f.endswith("__init__.py"))


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_config_validates(name):
  config_validation.validate(importlib.import_module(f"configs.ablations.{name}").get_config())


@pytest.mark.parametrize("regularizer,weight", [("velocity_mse", 1.5e-5), ("latent_kl", 0.04),
                                                ("none", None)])
def test_hackable_config_is_the_default_run_plus_jpeg_with_the_text_policy_frozen(regularizer,
                                                                                   weight):
  c, base = hackable.get_config(regularizer), shapes_cpu.get_config()
  config_validation.validate(c)
  assert dict(c.rewards) == {"shapeworld": 1.0, "jpeg_compressibility": hackable.JPEG_WEIGHT}
  assert c.objective.regularizer == regularizer and not c.objective.train_text
  if weight is not None:
    assert c.objective.reg_weight == weight
  assert base.rollout.group_initial_noise and not c.rollout.group_initial_noise  # per-row x_1
  c.rollout.group_initial_noise = True
  for key in ("rollout", "optim", "total_steps", "init_checkpoint", "data"):
    assert c[key] == base[key], key


def test_hackable_config_refuses_an_unknown_regularizer():
  with pytest.raises(ValueError, match="choose one of"):
    hackable.get_config("kl")
