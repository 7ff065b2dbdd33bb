"""Ablation: TextGRPO only (the image policy is frozen), otherwise the shapes_cpu run."""
from configs import shapes_cpu


def get_config():
  c = shapes_cpu.get_config()
  c.objective.train_image = False
  return c
