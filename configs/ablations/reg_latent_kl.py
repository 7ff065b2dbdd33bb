"""Ablation: the original Flow-GRPO latent KL instead of the velocity MSE."""
from configs import shapes_cpu


def get_config():
  c = shapes_cpu.get_config()
  c.objective.regularizer = "latent_kl"
  c.objective.reg_weight = 0.04  # Flow-GRPO's KL beta
  return c
