"""A LoRA run end to end (tiny model): the run checkpoint holds the adapters, their optimizer
state and the data position only, records its base, and a resume on another base is refused."""
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

import orbax.checkpoint as ocp

from unigrpo_jax import checkpointing
from unigrpo_jax.data.shapeworld.world import shapeworld_tokenizer
from unigrpo_jax.models.unified import lora
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.trainers.unigrpo import run_train
from test_trainer import tiny_config


def _lora_config(steps, eval_every=100):
  c = tiny_config(steps)
  c.model.lora.rank = 4
  c.model.lora.alpha = 8.0
  c.eval_every = eval_every  # 100: evaluations at the first and last step only
  return c


def test_lora_checkpoint_is_adapters_only_and_bound_to_its_base(tmp_path):
  workdir = str(tmp_path / "run")
  run_train(_lora_config(1), workdir)
  cfg = get_preset("tiny")
  _, params = nnx.split(UnifiedModel(cfg, nnx.Rngs(0)), nnx.Param)
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  # The arrays orbax saved (from its metadata): the adapters and their two AdamW moments (plus
  # scalar counters), not one copy of the base (full fine-tuning saves four: params, reference,
  # two moments).
  meta = ocp.StandardCheckpointer().metadata(os.path.join(workdir, "checkpoints", "1", "state"))
  leaves = [m for m in jax.tree.leaves(getattr(meta, "item_metadata", meta)) if hasattr(m, "shape")]
  saved = sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in leaves)
  lora_cfg = cfg.replace(lora_rank=4, lora_alpha=8.0)
  adapters = lora.adapter_count(nnx.state(nnx.eval_shape(lambda: UnifiedModel(lora_cfg,
                                                                              nnx.Rngs(0)))))
  assert 3 * 4 * adapters <= saved <= 3 * 4 * adapters + 1024, (saved, adapters)
  assert saved < base_bytes / 3, (saved, base_bytes)

  other_base = str(tmp_path / "other_base")
  checkpointing.save_model(other_base, params, cfg, shapeworld_tokenizer().to_json())
  c = _lora_config(2)
  c.init_checkpoint = other_base
  with pytest.raises(ValueError, match="trained on base '', but config.init_checkpoint is '"
                     + re.escape(other_base)):
    run_train(c, workdir)


def test_lora_resume_continues_the_same_run(tmp_path):
  """1 step + resume to 2 steps == 2 steps, metric for metric (adapters, moments, data)."""
  from unigrpo_jax.trainers.metrics import read_metrics
  ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
  run_train(_lora_config(2, eval_every=1), ref_dir)
  run_train(_lora_config(1, eval_every=1), run_dir)
  run_train(_lora_config(2, eval_every=1), run_dir)
  skip = lambda k: k.startswith("perf/")
  ref, resumed = read_metrics(ref_dir), read_metrics(run_dir)
  assert [r["step"] for r in resumed] == [r["step"] for r in ref]
  for a, b in zip(resumed, ref):
    for k in a:
      if not skip(k):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
