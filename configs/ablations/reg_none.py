"""Ablation: no regulariser on the image policy."""
from configs import shapes_cpu


def get_config():
  c = shapes_cpu.get_config()
  c.objective.regularizer = "none"
  return c
