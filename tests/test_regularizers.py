"""Feature regularizers (`keras_deq.regularizers`): values, gradients, Keras use, saving."""

import keras
import numpy as np
import pytest
from feature_references import (
    FLOAT_DTYPES,
    finite_difference_gradient,
    gradient,
    numpy_decorrelation,
)
from keras import ops

from keras_deq import regularizers

# (value rtol, gradient rtol, gradient atol) per dtype: float64 rounding, float32's.
TOLERANCES = {"float64": (1e-10, 1e-6, 1e-8), "float32": (1e-5, 1e-3, 1e-4)}


@pytest.fixture(autouse=True)
def _seed():
    """Unseeded initializers draw from Keras' global seed: fix it per test."""
    keras.utils.set_random_seed(0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_decorrelation_regularizer_value_gradient_and_descent(dtype):
    value_rtol, grad_rtol, grad_atol = TOLERANCES[dtype]
    z = np.random.default_rng(4).normal(size=(8, 3)) + 0.5
    regularizer = regularizers.DecorrelationRegularizer(strength=0.3)
    tensor = ops.convert_to_tensor(z, dtype)
    value = regularizer(tensor)
    assert keras.backend.standardize_dtype(value.dtype) == dtype
    grad = ops.convert_to_numpy(gradient(regularizer, tensor)[0]).astype("float64")
    assert float(value) == pytest.approx(0.3 * numpy_decorrelation(z), rel=value_rtol)
    np.testing.assert_allclose(
        grad,
        0.3 * finite_difference_gradient(numpy_decorrelation, z),
        rtol=grad_rtol,
        atol=grad_atol,
    )
    assert numpy_decorrelation(z - 0.05 * grad) < numpy_decorrelation(z)


def test_feature_regularizer_reuses_keras_l1_l2():
    pick = regularizers.feature_regularizer
    assert isinstance(pick("l1", 0.1), keras.regularizers.L1)
    assert isinstance(pick("l2", 0.1), keras.regularizers.L2)
    assert isinstance(pick("hsic", 0.1, sigma=2.0), regularizers.HSICRegularizer)
    assert isinstance(pick("decorrelation"), regularizers.DecorrelationRegularizer)
    with pytest.raises(ValueError, match="name"):
        pick("l3")


def test_regularizers_work_as_activity_regularizers_and_serialize():
    x = np.random.default_rng(8).normal(size=(16, 5)).astype("float32")
    for regularizer in (
        regularizers.DecorrelationRegularizer(0.5),
        regularizers.HSICRegularizer(0.5, 2.0),
    ):
        layer = keras.layers.Dense(4, activity_regularizer=regularizer)
        layer(x)
        assert len(layer.losses) == 1 and float(layer.losses[0]) > 0
        config = keras.saving.serialize_keras_object(regularizer)
        clone = keras.saving.deserialize_keras_object(config)
        assert type(clone) is type(regularizer) and clone.get_config() == regularizer.get_config()


def test_regularizers_refuse_bad_arguments():
    with pytest.raises(ValueError, match="strength"):
        regularizers.DecorrelationRegularizer(-0.1)
    with pytest.raises(ValueError, match="sigma"):
        regularizers.HSICRegularizer(0.1, sigma=0.0)
