"""Install unigrpo_jax: `pip install -e .` (runtime) or `pip install -e ".[test]"`."""
import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (HERE / "requirements.txt").read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


setup(
    name="unigrpo_jax",
    version="0.1.0",
    description="UniGRPO in JAX/Flax NNX: joint GRPO on the text and flow-matching image policies of one unified model.",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["unigrpo_jax", "unigrpo_jax.*"]),
    package_data={"unigrpo_jax": ["assets/**/*", "assets/*"]},
    include_package_data=True,
    install_requires=_requirements(),
    # tpu: libtpu for TPU pods, and for `python -m unigrpo_jax.aot` to compile for any TPU slice
    # on a CPU machine. Pinned to the jax version of requirements.txt.
    # test: pyflakes runs the static check for undefined names
    # (tests/integration/test_static_checks.py); gcp-storage-emulator (a GCS API server on
    # 127.0.0.1) and gcsfs (the client etils.epath uses with EPATH_USE_TF=false) run the gs://
    # workdir tests (tests/integration/test_gcs_workdir.py).
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3", "pyflakes>=3",
                             "gcp-storage-emulator>=2024.8.3", "gcsfs>=2024.2"],
                    "tpu": ["jax[tpu]==0.10.2"]},
)
