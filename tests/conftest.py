"""Test set-up: 8 host devices for multi-device tests, set before JAX is imported anywhere."""

import os

# The suite's time is XLA's compiles of small programs: LLVM's back-end optimizations are off
# (`TEST_XLA_FLAGS`, for the subprocesses too). They change how fast the CPU code runs, not what
# it computes: no fast-math, so every equality and parity test checks the same arithmetic.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# XLA's persistent compilation cache: the suite's modules (and the subprocesses they start) build
# the same tiny-model programs many times over; each is compiled once per run and read back after.
# Under .pytest_cache (git-ignored): a fresh clone starts cold.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
    from nitsum_jax.config import preset

    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    import jax

    from nitsum_jax.model import init_params

    return init_params(tiny_cfg, jax.random.key(1234))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each module, JAX's in-memory caches of compiled programs are dropped (a module's
    engines are gone by then): a worker's memory stays that of its current module. A later
    module that builds the same programs reads them back from the persistent cache above."""
    yield
    import gc
    import sys

    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
