"""DistributedOptimizer in one process, without Horovod running: the wrapper keeps the wrapped optimizer's face.

The averaging itself is tested under ``horovodrun`` in tests/parallel.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from hvd_largebatch.errors import HorovodNotInitialisedError
from hvd_largebatch.tf import LARS, DistributedOptimizer


@pytest.mark.parametrize(
    "inner",
    [LARS(learning_rate=0.3, weight_decay=1e-3), keras.optimizers.SGD(learning_rate=0.2, momentum=0.9),
     keras.optimizers.Adam(learning_rate=1e-3)],
    ids=["lars", "keras-sgd", "keras-adam"],
)
def test_the_wrapper_passes_learning_rate_iterations_config_and_variables_through(inner):
    wrapper = DistributedOptimizer(inner, op="sum", compression="fp16", backward_passes_per_step=2)
    assert float(wrapper.learning_rate.numpy()) == pytest.approx(float(inner.learning_rate.numpy()))
    wrapper.learning_rate = 0.05
    assert float(inner.learning_rate.numpy()) == pytest.approx(0.05)
    variables = [keras.Variable(np.ones((3, 2)), name="kernel"), keras.Variable(np.zeros(2), name="bias")]
    wrapper.build(variables)
    assert inner.built
    assert wrapper.iterations is inner.iterations
    # The accumulators (two) and the pass counter, then everything of the wrapped optimizer.
    assert wrapper.variables[3:] == inner.variables
    assert [v.shape for v in wrapper.variables[:3]] == [(3, 2), (2,), ()]
    config = wrapper.get_config()
    assert config["optimizer"]["config"] == inner.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(wrapper))
    assert type(restored.inner_optimizer) is type(inner)
    assert restored.get_config() == config


def test_apply_without_horovod_initialised_says_so(monkeypatch):
    import horovod.tensorflow as hvd

    monkeypatch.setattr(hvd, "is_initialized", lambda: False)  # as in a process that never called hvd.init()
    wrapper = DistributedOptimizer(LARS())
    w = keras.Variable(np.ones((2, 2)), name="kernel")
    with pytest.raises(HorovodNotInitialisedError, match=r"Horovod is not initialised: call horovod.tensorflow.init\(\)"):
        wrapper.apply([np.ones((2, 2))], [w])
