"""Shared set-up of the Keras unit tests: quiet TensorFlow, float64 on request, a fixed seed."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def float64():
    """Runs the test with ``keras.backend.floatx() == "float64"`` and restores the previous value."""
    previous, previous_policy = keras.backend.floatx(), keras.config.dtype_policy()
    keras.backend.set_floatx("float64")
    # Keras caches the global dtype policy from floatx the first time a layer is built:
    # set it too, or a test that runs after any float32 layer gets float32 variables.
    keras.config.set_dtype_policy("float64")
    keras.utils.set_random_seed(0)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous_policy)
        keras.backend.set_floatx(previous)
