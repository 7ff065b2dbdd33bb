"""The real-model path end to end on CPU: configs/bagel_tiny_cpu.py on a tiny random BAGEL
directory (tokenizer.json, ema.safetensors, FLUX ae.safetensors), free-text prompts, JPEG reward."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from unigrpo_jax.data.pipeline import PromptFileSource
from unigrpo_jax.data.qwen_tokenizer import QwenTokenizer
from unigrpo_jax.models.flux_vae.autoencoder import FluxAutoencoder
from unigrpo_jax.testing.tiny_bagel import write_tiny_bagel_dir
from unigrpo_jax.trainers import build
from unigrpo_jax.trainers.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from configs import bagel_tiny_cpu  # noqa: E402


@pytest.fixture(scope="module")
def bagel_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bagel_tiny"))
  write_tiny_bagel_dir(path)
  return path


def smoke_config(bagel_dir):
  c = bagel_tiny_cpu.get_config()
  c.init_checkpoint = bagel_dir
  c.tensorboard = False
  c.async_checkpointing = False
  return c


def test_tiny_dir_vae_matches_the_model_geometry(bagel_dir):
  """ae.safetensors loads with FLUX's defaults (GroupNorm 32) and gives the model's tokens."""
  c = smoke_config(bagel_dir)
  model_cfg, _ = build.model_and_params(c, build.tokenizer_for(c))
  ae = build.autoencoder_for(c, model_cfg)
  assert isinstance(ae, FluxAutoencoder)
  assert (ae.cfg.z_channels, ae.cfg.downsample, ae.cfg.num_groups) == (16, 8, 32)
  assert (ae.latent_dim, ae.num_tokens) == (model_cfg.latent_dim, model_cfg.num_image_tokens) \
      == (64, 16)
  images = np.asarray(ae.decode(np.zeros((1, 16, 64), np.float32)))
  assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_free_text_prompt_files(bagel_dir):
  """Plain prompts outside the ShapeWorld grammar load for BAGEL runs (no spec), are disjoint
  between train and eval, and still fail where a reward needs specs."""
  c = smoke_config(bagel_dir)
  tok = QwenTokenizer.from_file(bagel_dir)
  train = PromptFileSource(c.data.prompt_file, tok, free_text=True)
  evals = PromptFileSource(c.data.eval_prompt_file, tok, free_text=True)
  assert all(train[i]["spec"] == "" for i in range(len(train)))
  assert not {train[i]["prompt"] for i in range(len(train))} & \
      {evals[i]["prompt"] for i in range(len(evals))}
  with pytest.raises(ValueError, match="not in the explicit prompt grammar"):
    PromptFileSource(c.data.prompt_file, tok)   # the toy path keeps its strict check
  from unigrpo_jax.trainers.build import prompt_source
  c.rewards = {"shapeworld": 1.0}
  with pytest.raises(ValueError, match="line 1: .* no ShapeWorld spec, which reward 'shapeworld'"):
    prompt_source(c, tok)


def _main(args, workdir):
  cmd = [sys.executable, "-m", "unigrpo_jax.main", "--config=configs/bagel_tiny_cpu.py",
         f"--workdir={workdir}", "--config.tensorboard=False", *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_bagel_dir_without_ae_is_one_error_line(bagel_dir, tmp_path):
  no_ae = tmp_path / "no_ae"
  no_ae.mkdir()
  for name in os.listdir(bagel_dir):
    if name != "ae.safetensors":
      os.symlink(os.path.join(bagel_dir, name), no_ae / name)
  result = _main([f"--config.init_checkpoint={no_ae}"], str(tmp_path / "run"))
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ValueError:") and "has no ae.safetensors" in last, last
  assert not (tmp_path / "run" / "checkpoints").exists()
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


# In the default set (34 s on 2 quiet cores): the real-model path must run from a clean checkout.
def test_two_unigrpo_steps_on_the_tiny_bagel_dir(bagel_dir, tmp_path):
  """The README smoke command: 2 steps through main, then the eval mode on its checkpoint dir."""
  workdir = tmp_path / "run"
  result = _main([f"--config.init_checkpoint={bagel_dir}"], str(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = read_metrics(str(workdir))
  assert [r["step"] for r in rows] == [0, 1, 2]
  for row in rows[1:]:
    assert math.isfinite(row["train/loss"]) and math.isfinite(row["train/reward_mean"])
    assert row["train/reward_mean"] > 0          # JPEG kilobytes of decoded noise-ish pixels
    for part in ("text", "flow"):                 # first PPO epoch: the rollout's own policy
      for stat in ("ratio_min", "ratio_mean", "ratio_max"):
        assert abs(row[f"train/onpolicy/{part}/{stat}"] - 1.0) < 1e-4, (part, stat, row)
      assert row[f"train/onpolicy/{part}_logp_maxdiff"] < 1e-3
  assert "eval/reward_mean" in rows[0] and "eval/reward_mean" in rows[2]
  assert "eval/strict_accuracy" not in rows[2]     # no ShapeWorld metrics on free text
  assert os.listdir(workdir / "checkpoints") == ["2"]
  assert (workdir / "samples_step_000002.png").exists()
  # The eval / sample modes load the same directory (tokenizer, weights, FLUX VAE).
  result = _main([f"--config.init_checkpoint={bagel_dir}", "--config.mode=sample"],
                 str(tmp_path / "sample"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "sample" / "samples_eval.png").exists()
