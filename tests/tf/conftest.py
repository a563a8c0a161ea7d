"""Shared set-up of the Keras unit tests: quiet TensorFlow, float64 on request, a fixed seed."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
from keras.src.backend.common import global_state  # noqa: E402


@pytest.fixture
def float64():
    """Runs the test with ``keras.backend.floatx() == "float64"`` and restores the previous value."""
    previous = keras.backend.floatx()
    # Read without creating it: keras.config.dtype_policy() would cache a float32 policy.
    previous_policy = global_state.get_global_attribute("dtype_policy", None)
    keras.backend.set_floatx("float64")
    # Keras caches the global dtype policy from floatx the first time a layer is built:
    # set it too, or a test that runs after any float32 layer gets float32 variables.
    keras.config.set_dtype_policy("float64")
    keras.utils.set_random_seed(0)
    try:
        yield
    finally:
        global_state.set_global_attribute("dtype_policy", previous_policy)
        keras.backend.set_floatx(previous)
