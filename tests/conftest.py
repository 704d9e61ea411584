"""What every test gets: a fixed seed, and the backend in the report header.

The fast tier (`-m "not slow"`) on JAX compiles with XLA's optimizations off
(`jax_disable_most_optimizations`): most of its time is XLA compiling each
test's fresh training step, and the unoptimized compile takes about a third
less. The full suite (CI) compiles as users do.

The helpers the tests share (networks, data, numpy references) are in
`helpers.py`.
"""

import keras
import pytest


def _unoptimized_jax(config):
    """True in the fast tier on JAX: compile without XLA's optimizations."""
    fast_tier = "not slow" in (config.option.markexpr or "")
    return fast_tier and keras.backend.backend() == "jax"


def pytest_configure(config):
    if _unoptimized_jax(config):
        import jax

        jax.config.update("jax_disable_most_optimizations", True)


def pytest_report_header(config):
    note = " (fast tier: XLA optimizations off)" if _unoptimized_jax(config) else ""
    return f"keras backend: {keras.backend.backend()}, keras {keras.__version__}{note}"


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
