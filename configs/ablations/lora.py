"""Ablation: the shapes_cpu run with LoRA adapters (rank 8, alpha 16, every projection of both
experts) instead of full fine-tuning: the base (the shipped warm start) is frozen and is the
velocity-MSE reference. Adapters take 10x the full-fine-tuning learning rates."""
from configs import shapes_cpu


def get_config():
  c = shapes_cpu.get_config()
  c.model.lora.rank = 8
  c.model.lora.alpha = 16.0
  c.model.lora.targets = "q,k,v,o,gate,up,down"
  c.model.lora.experts = "und,gen"
  c.optim.lr_und = 3e-4
  c.optim.lr_gen = 1e-4
  return c
