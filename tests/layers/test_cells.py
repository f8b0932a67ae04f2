"""Tests of `keras_deq.layers.DenseCell`, against NumPy."""

import json

import keras
import numpy as np
import pytest

import keras_deq
from keras_deq.layers import DenseCell


def numpy_inputs(batch=3, units=4, features=5, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(batch, units)).astype("float32"),
        rng.normal(size=(batch, features)).astype("float32"),
    )


def test_is_exported_at_top_level():
    assert keras_deq.DenseCell is DenseCell


@pytest.mark.parametrize(
    ("activation", "np_fn"),
    [("tanh", np.tanh), ("linear", lambda a: a), ("relu", lambda a: np.maximum(a, 0))],
)
def test_output_matches_numpy(activation, np_fn):
    z, x = numpy_inputs()
    cell = DenseCell(4, activation=activation)
    cell(z, x)
    rng = np.random.default_rng(1)
    cell.bias.assign(rng.normal(size=(4,)))
    w, u, b = cell.kernel.numpy(), cell.injection_kernel.numpy(), cell.bias.numpy()
    out = keras.ops.convert_to_numpy(cell(z, x))
    np.testing.assert_allclose(out, np_fn(z @ w + x @ u + b), rtol=1e-5, atol=1e-6)


def test_callable_activation():
    z, x = numpy_inputs()
    cell = DenseCell(4, activation=lambda a: 2.0 * a)
    out = keras.ops.convert_to_numpy(cell(z, x))
    w, u = cell.kernel.numpy(), cell.injection_kernel.numpy()
    np.testing.assert_allclose(out, 2.0 * (z @ w + x @ u), rtol=1e-5, atol=1e-6)


def test_weights_and_shapes():
    z, x = numpy_inputs(units=4, features=5)
    cell = DenseCell(4)
    out = cell(z, x)
    assert tuple(out.shape) == (3, 4)
    assert [tuple(v.shape) for v in cell.trainable_weights] == [(4, 4), (5, 4), (4,)]
    assert cell.compute_output_shape((None, 4), (None, 5)) == (None, 4)


def test_default_kernel_is_a_contraction():
    cell = DenseCell(16)
    cell.build((None, 16), (None, 3))
    singular_values = np.linalg.svd(cell.kernel.numpy(), compute_uv=False)
    np.testing.assert_allclose(singular_values, 0.5, rtol=1e-4)


def test_use_injection_false_adds_the_input_as_is():
    z, x = numpy_inputs(units=4, features=4)
    cell = DenseCell(4, activation="linear", use_injection=False)
    out = keras.ops.convert_to_numpy(cell(z, x))
    assert not hasattr(cell, "injection_kernel")
    assert len(cell.trainable_weights) == 2
    np.testing.assert_allclose(
        out, z @ cell.kernel.numpy() + x + cell.bias.numpy(), rtol=1e-5, atol=1e-6
    )


def test_use_injection_false_in_a_deq():
    x = np.random.default_rng(2).normal(size=(3, 4)).astype("float32")
    cell = DenseCell(4, activation="linear", use_injection=False)
    layer = keras_deq.DEQ(cell, tol=1e-6, max_iter=100, on_failure="ignore")
    z = keras.ops.convert_to_numpy(layer(x))
    assert layer.solver_statistics()["converged"] == 1.0
    w = cell.kernel.numpy()
    np.testing.assert_allclose(z, np.linalg.solve((np.eye(4) - w).T, x.T).T, atol=1e-4)


@pytest.mark.parametrize("units", [0, -3, 2.0, "4", True, None])
def test_bad_units(units):
    with pytest.raises(ValueError, match="units"):
        DenseCell(units)


def test_state_width_must_equal_units():
    z, x = numpy_inputs(units=3, features=5)
    with pytest.raises(ValueError, match=r"units.*4.*z_shape"):
        DenseCell(4)(z, x)


def test_use_injection_false_needs_matching_input_width():
    z, x = numpy_inputs(units=4, features=5)
    with pytest.raises(ValueError, match="use_injection"):
        DenseCell(4, use_injection=False)(z, x)


def test_regularizer_and_constraint_are_applied():
    z, x = numpy_inputs()
    cell = DenseCell(
        4,
        kernel_regularizer=keras.regularizers.L2(0.1),
        kernel_constraint=keras.constraints.NonNeg(),
    )
    cell(z, x)
    w = cell.kernel.numpy()
    np.testing.assert_allclose(
        float(keras.ops.convert_to_numpy(keras.ops.sum(cell.losses))),
        0.1 * np.sum(w**2),
        rtol=1e-5,
    )
    optimizer = keras.optimizers.SGD(1.0)
    optimizer.apply([keras.ops.ones((4, 4))], [cell.kernel])
    assert np.all(cell.kernel.numpy() >= 0)
    assert np.any(w < 0)  # the constraint did change something


def test_config_round_trip():
    cell = DenseCell(
        6,
        activation="relu",
        use_injection=False,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01, seed=3),
        injection_initializer="zeros",
        kernel_constraint=keras.constraints.MaxNorm(2.0),
        kernel_regularizer=keras.regularizers.L2(0.01),
        name="my_cell",
        dtype="float64",
    )
    config = cell.get_config()
    assert config["units"] == 6
    assert config["use_injection"] is False
    clone = DenseCell.from_config(config)
    assert clone.get_config() == config
    assert clone.name == "my_cell"
    assert clone.activation is keras.activations.relu
    assert clone.compute_dtype == "float64"
    assert isinstance(clone.kernel_constraint, keras.constraints.MaxNorm)
    assert isinstance(clone.kernel_regularizer, keras.regularizers.L2)

    # Through the registered serializer and JSON, as in a `.keras` file.
    payload = json.loads(json.dumps(keras.saving.serialize_keras_object(cell)))
    restored = keras.saving.deserialize_keras_object(payload)
    assert isinstance(restored, DenseCell)
    assert restored.get_config() == config


def test_default_config_round_trip_gives_same_outputs():
    z, x = numpy_inputs()
    cell = DenseCell(4)
    out = cell(z, x)
    clone = DenseCell.from_config(cell.get_config())
    clone.build((None, 4), (None, 5))
    clone.set_weights(cell.get_weights())
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(clone(z, x)), keras.ops.convert_to_numpy(out)
    )
    assert clone.get_config() == cell.get_config()
