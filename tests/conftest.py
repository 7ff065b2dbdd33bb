"""Test setup: 8 fake CPU devices so sharding tests run anywhere.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests, deselected by default (-m slow to run)")

# Tests live in folders that mirror the package; their shared helpers (local_server.py, the
# multihost config) stay here, importable from every folder.
import sys  # noqa: E402

_TESTS = os.path.dirname(os.path.abspath(__file__))
# tests/trainers/test_trainer.py (tiny_config) and tests/models/test_model.py (the module-scoped
# model fixture) are shared by tests in other folders.
sys.path[:0] = [_TESTS, os.path.join(_TESTS, "trainers"), os.path.join(_TESTS, "models")]
