"""Benchmarks of the rollout and the train step (run.py); analytic FLOP counts (flops.py)."""
