"""Ahead-of-time planning for TPU pods from any machine: ``python -m unigrpo_jax.aot``.

``topology``: accelerator names -> compile-only devices and chip limits (HBM, peak FLOP/s, HBM
and ICI bandwidth); ``memory``: what XLA says a compiled program needs; ``hlo``: a reader of the
partitioned HLO (computations, loops and their trip counts); ``comm``: the collectives per chip,
by kind and by loop; ``time_model``: compute, HBM and ICI seconds per call and per loop
iteration; ``plan``: compiles the trainer's rollout and train step for a slice and reports bytes
per chip, FLOPs, communication, the time model and whether they fit.
"""
