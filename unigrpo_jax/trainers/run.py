"""Dispatch on ``config.mode``."""
from __future__ import annotations

import ml_collections


def run(config: ml_collections.ConfigDict, workdir: str):
  if config.mode == "sft":
    from unigrpo_jax.trainers import sft
    return sft.run_sft(config, workdir)
  if config.mode == "train":
    from unigrpo_jax.trainers import unigrpo
    return unigrpo.run_train(config, workdir)
  if config.mode in ("eval", "sample"):
    from unigrpo_jax.trainers import evaluate
    return evaluate.run_eval(config, workdir, save_only_samples=config.mode == "sample")
  raise ValueError(f"config.mode={config.mode!r} is not one of train, sft, eval, sample")
