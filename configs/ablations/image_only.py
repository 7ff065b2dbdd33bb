"""Ablation: Flow-GRPO only (the text policy is frozen), otherwise the shapes_cpu run."""
from configs import shapes_cpu


def get_config():
  c = shapes_cpu.get_config()
  c.objective.train_text = False
  return c
