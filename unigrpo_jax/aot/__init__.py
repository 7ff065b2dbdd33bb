"""Ahead-of-time planning for TPU pods from any machine: ``python -m unigrpo_jax.aot``.

``topology``: accelerator names -> compile-only devices and chip limits; ``memory``: what XLA
says a compiled program needs; ``plan``: compiles the trainer's rollout and train step for a
slice and reports bytes per chip, FLOPs, roofline time and whether they fit.
"""
