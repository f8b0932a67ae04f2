"""Test set-up: the Keras backend, quiet logs, two logical CPUs for distribution tests.

The backend is `KERAS_BACKEND` (TensorFlow when unset); `.ci/run` runs the suite once
per backend. On TensorFlow every file is collected; on JAX and PyTorch the files
matched by `PORTABLE` (and that backend's own directory, `tests/jax`, `tests/torch`),
see `pytest_ignore_collect`. Markers for tests that cannot run on every backend
(registered here, applied in `pytest_collection_modifyitems`):

- `@pytest.mark.tensorflow_only(reason)`: the test exercises TensorFlow itself
  (`tf.function` tracing, XLA, `tf.distribute`, ...); skipped on other backends.
- `@pytest.mark.float64`: the test needs float64 tensors, and is skipped where the
  backend does not compute them in float64 (see `float64_available`) rather than run
  silently in float32.
"""

import fnmatch
import functools
import os
import pathlib

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

if BACKEND == "torch":
    import torch

    # The tests read results with `np.asarray` / `np.testing` (as on the other
    # backends); a torch tensor that requires a gradient refuses that. Read such
    # tensors as `keras.ops.convert_to_numpy` does: detached, on the CPU.
    _torch_array = torch.Tensor.__array__

    def _detached_array(self, *args, **kwargs):
        return _torch_array(self.detach().cpu(), *args, **kwargs)

    torch.Tensor.__array__ = _detached_array

    # ... and numpy functions of a tensor (`np.isfinite(t)`) return numpy arrays, as
    # they do for JAX arrays, rather than tensors wrapped back by torch.
    def _numpy_result(self, array, *args, **kwargs):
        return array

    torch.Tensor.__array_wrap__ = _numpy_result

# The backend matrix: the test files (globs relative to tests/) collected on JAX and
# PyTorch besides their own directory (`tests/jax`, `tests/torch`). The others test
# TensorFlow itself (`tf.distribute`, `tf.function` tracing, SavedModel export), the
# documentation, the packaging, or benchmarks and examples measured on TensorFlow; a
# few more pass on JAX but take minutes there (compiling), see BACKEND_EXTRA.
PORTABLE = (
    "solvers/test_*.py",
    "backward/test_*.py",
    "layers/test_multiscale*.py",
    "layers/test_opteq*.py",
    "layers/test_cell.py",
    "layers/test_cell_state.py",
    "layers/test_cell_state_dropout.py",
    "layers/test_weight_normalization.py",
    "layers/test_spectral_reparametrization.py",
    "layers/test_cells.py",
    "layers/test_deq.py",
    "layers/test_deq_trace.py",
    "layers/test_pcdeq.py",
    "layers/test_monotone*.py",
    "layers/test_lipschitz_multiscale_cell.py",
    "layers/test_transformer.py",
    "test_linalg.py",
    "test_correction.py",
    "test_random_start.py",
    "layers/test_deq_start.py",
    "test_constraints.py",
    "test_features.py",
    "test_jacobian.py",
    "test_regularizers.py",
    "test_jacobian_penalty.py",
    "test_callbacks.py",
    "test_divergence.py",
    "test_mixed_precision.py",
    "test_resume.py",
    "examples/test_language.py",
    "examples/test_digits.py",
    "examples/test_synthetic.py",
    "examples/test_vision_data.py",
)
# Collected on one backend besides PORTABLE: on JAX these pass but compile for ~10 min
# on 2 cores (every layer's serialization case, fit in every mode), too long for CI.
BACKEND_EXTRA = {
    "torch": (
        "layers/test_layer_cases.py",
        "layers/test_deq_training.py",
        "layers/test_monitor.py",
        "test_backward.py",
    ),
}
# Left out on one backend although PORTABLE matches them: they pass there but compile for
# minutes on 2 cores (JAX compiles each eager GMRES solve), and run on the two others.
BACKEND_LEAVE_OUT = {
    # GMRES: minutes of compiling on JAX; the same code runs on TF and torch.
    "jax": ("backward/test_gmres_adjoint.py", "solvers/test_gmres_entries.py"),
}
_TESTS = pathlib.Path(__file__).parent


def pytest_ignore_collect(collection_path, config):
    """On JAX and PyTorch, leaves out the test files outside the backend matrix."""
    if BACKEND == "tensorflow" or not collection_path.name.startswith("test_"):
        return None
    if collection_path.suffix != ".py":
        return None
    relative = collection_path.relative_to(_TESTS).as_posix()
    if any(fnmatch.fnmatch(relative, p) for p in BACKEND_LEAVE_OUT.get(BACKEND, ())):
        return True
    patterns = (*PORTABLE, *BACKEND_EXTRA.get(BACKEND, ()), f"{BACKEND}/test_*.py")
    return None if any(fnmatch.fnmatch(relative, p) for p in patterns) else True


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
