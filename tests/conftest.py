"""Test set-up: the Keras backend, quiet logs, two logical CPUs for distribution tests.

The backend is `KERAS_BACKEND` (TensorFlow when unset). Markers for tests that cannot
run on every backend (registered here, applied in `pytest_collection_modifyitems`):

- `@pytest.mark.tensorflow_only(reason)`: the test exercises TensorFlow itself
  (`tf.function` tracing, XLA, `tf.distribute`, ...); skipped on other backends.
- `@pytest.mark.float64`: the test needs float64 tensors, and is skipped where the
  backend does not compute them in float64 (see `float64_available`) rather than run
  silently in float32.
"""

import functools
import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BACKEND = os.environ["KERAS_BACKEND"]

if BACKEND == "tensorflow":
    import tensorflow as tf

    # Must happen before TensorFlow initializes its devices: MirroredStrategy tests use
    # two logical CPU devices on one physical CPU.
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )


@functools.cache
def float64_available():
    """Whether float64 inputs stay float64 through the Keras ops the tests use.

    On JAX they do not: without x64 mode (`JAX_ENABLE_X64=1`) JAX makes every array
    float32, and even with it Keras 3 promotes float64 to float32 in some ops (its
    type promotion maps float64 to float32 on every backend but TensorFlow, so
    `ops.tanh` of a float64 tensor is float32). Probed rather than assumed.
    """
    import keras
    import numpy as np
    from keras import ops

    x = ops.convert_to_tensor(np.ones(2))
    probes = (x, ops.tanh(x), ops.sqrt(x), ops.where(x > 0, x, -x), ops.matmul(x, x))
    return all(keras.backend.standardize_dtype(t.dtype) == "float64" for t in probes)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "tensorflow_only(reason): exercises TensorFlow itself; skipped on other Keras backends",
    )
    config.addinivalue_line(
        "markers",
        "float64: needs float64 tensors; skipped where the backend computes them in float32",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("tensorflow_only")
        if marker is not None and BACKEND != "tensorflow":
            why = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"TensorFlow only: {why}"))
        if item.get_closest_marker("float64") is not None and not float64_available():
            item.add_marker(
                pytest.mark.skip(
                    reason=f"needs float64, which Keras on {BACKEND} computes in float32 "
                    "(without x64 mode every JAX array is float32; with it, Keras still "
                    "promotes float64 to float32 in ops such as ops.tanh)"
                )
            )
