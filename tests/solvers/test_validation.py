"""Argument checks: every bad argument raises ValueError naming that argument."""

import numpy as np
import pytest
from keras import ops

from .helpers import SOLVER_NAMES, dtype_of, solver


def _never_called(z):
    raise AssertionError("f must not be evaluated when the arguments are invalid")


Z0 = ops.zeros((2, 3))


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("max_iter", [0, -1, 1.5, True, False, "10", None, np.float64(3.0)])
def test_bad_max_iter(name, max_iter):
    with pytest.raises(ValueError, match="max_iter"):
        solver(name)(_never_called, Z0, max_iter=max_iter)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("tol", [0, 0.0, -1, -1e-6, True, float("nan"), "1e-3", None])
def test_bad_tol(name, tol):
    with pytest.raises(ValueError, match="tol"):
        solver(name)(_never_called, Z0, tol=tol)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("stop_mode", ["foo", "REL", "", None, 1])
def test_bad_stop_mode(name, stop_mode):
    with pytest.raises(ValueError, match="stop_mode"):
        solver(name)(_never_called, Z0, stop_mode=stop_mode)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("f", [None, 3, "tanh", [lambda z: z]])
def test_non_callable_f(name, f):
    with pytest.raises(ValueError, match="`f`"):
        solver(name)(f, Z0)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("dtype", ["int32", "int64", "bool"])
def test_non_float_state(name, dtype):
    z0 = ops.zeros((2, 3), dtype)  # int64 is int32 on JAX: the message names the real one
    with pytest.raises(ValueError, match=f"floating-point.*dtype={dtype_of(z0)}"):
        solver(name)(_never_called, z0)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_integer_numpy_state(name):
    with pytest.raises(ValueError, match="floating-point"):
        solver(name)(_never_called, np.zeros((2, 3), np.int64))


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_empty_state(name):
    with pytest.raises(ValueError, match="at least one tensor"):
        solver(name)(_never_called, [])


@pytest.mark.parametrize("z0", [np.zeros((2, 3), np.int32), []], ids=["int32", "empty"])
def test_bad_state_message_names_z0(z0):
    # Every other argument error names its argument (`max_iter`, `tol`, ...); the
    # state's errors should too, so a user of a DEQ layer knows which input is meant.
    with pytest.raises(ValueError, match="z0"):
        solver("fixed_point")(_never_called, z0)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize(
    "z0, match",
    [
        (np.float32(1.0), "a scalar has no batch dimension"),
        ([np.zeros((2, 3), "float32"), np.zeros((3, 3), "float32")], "share the batch"),
    ],
    ids=["scalar", "two_batch_sizes"],
)
def test_unbatched_state(name, z0, match):
    with pytest.raises(ValueError, match=match) as info:
        solver(name)(_never_called, z0)
    assert "Received: z0 with shapes" in str(info.value)


@pytest.mark.tensorflow_only("tensors of unknown rank exist only in TensorFlow graphs")
def test_state_of_unknown_rank():
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)])
    def run(z0):
        return solver("fixed_point")(_never_called, z0)

    with pytest.raises(ValueError, match="`z0` must be .* of known rank"):
        run(tf.zeros([2, 3]))


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_map_returning_another_shape(name):
    with pytest.raises(ValueError, match="`f` must return a structure of tensors shaped like"):
        solver(name)(lambda z: ops.concatenate([z, z], axis=1), Z0)
    with pytest.raises(ValueError, match="`f` must return a structure of tensors shaped like"):
        solver(name)(lambda z: [z, z], Z0)


@pytest.mark.parametrize(
    "name, option, value",
    [
        ("fixed_point", "damping", 0),
        ("fixed_point", "damping", 0.0),
        ("fixed_point", "damping", 1.5),
        ("fixed_point", "damping", -0.5),
        ("fixed_point", "damping", True),
        ("fixed_point", "damping", float("nan")),
        ("anderson", "window", 0),
        ("anderson", "window", -2),
        ("anderson", "window", 2.5),
        ("anderson", "window", True),
        ("anderson", "beta", 0),
        ("anderson", "beta", 1.01),
        ("anderson", "beta", -1.0),
        ("anderson", "ridge", -1),
        ("anderson", "ridge", -1e-12),
        ("anderson", "ridge", float("nan")),
        ("anderson", "ridge", True),
        ("broyden", "memory", 0),
        ("broyden", "memory", -1),
        ("broyden", "memory", 1.0),
        ("broyden", "memory", False),
    ],
)
def test_bad_option(name, option, value):
    with pytest.raises(ValueError, match=option):
        solver(name)(_never_called, Z0, **{option: value})


@pytest.mark.parametrize(
    "name, options",
    [
        ("fixed_point", {"damping": 1}),
        ("fixed_point", {"damping": 0.05}),
        ("anderson", {"window": 1, "beta": 1, "ridge": 0}),
        ("anderson", {"window": np.int64(3), "beta": 0.5, "ridge": 1e-2}),
        ("broyden", {"memory": 1}),
        ("broyden", {"memory": np.int32(4)}),
    ],
)
def test_valid_edge_options_accepted(name, options):
    result = solver(name)(lambda z: 0.5 * z + 1.0, Z0, max_iter=1000, tol=1e-4, **options)
    assert np.all(np.asarray(result.converged))


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_unknown_keyword_rejected(name):
    with pytest.raises(TypeError):
        solver(name)(lambda z: z, Z0, not_an_option=1)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_max_iter_accepts_numpy_integer(name):
    result = solver(name)(lambda z: 0.5 * z + 1.0, Z0, max_iter=np.int64(3), tol=1e-12)
    assert int(result.steps) == 3
