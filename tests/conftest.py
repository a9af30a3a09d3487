"""Test set-up: 8 host devices for multi-device tests, set before JAX is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
