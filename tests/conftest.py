import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_report_header(config):
    import keras

    return f"keras {keras.__version__}, backend: {keras.backend.backend()}"


# Modules whose tests check float64 inputs against float64 references (1e-9 tolerances).
FLOAT64_MODULES = {"test_process", "test_operators", "test_ddim"}


@pytest.fixture(autouse=True)
def _jax_x64_for_float64_references(request):
    """jax computes float64 inputs in float32 unless x64 is on; it is off by default (and
    ssd_keras leaves it off: models are float32). Switch it on only around the tests that
    compare float64 math with float64 references."""
    import keras

    if keras.backend.backend() != "jax" or request.module.__name__.split(".")[-1] not in FLOAT64_MODULES:
        yield
        return
    import jax

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
