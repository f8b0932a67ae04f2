"""Feature regularizers (`keras_deq.regularizers`): values, gradients, Keras use, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from feature_references import finite_difference_gradient, numpy_decorrelation

from keras_deq import regularizers

F64 = tf.float64


@pytest.fixture(autouse=True)
def _seed():
    """Unseeded initializers draw from Keras' global seed: fix it per test."""
    keras.utils.set_random_seed(0)


def test_decorrelation_regularizer_value_gradient_and_descent():
    z = np.random.default_rng(4).normal(size=(8, 3)) + 0.5
    regularizer = regularizers.DecorrelationRegularizer(strength=0.3)
    variable = tf.Variable(z, dtype=F64)
    with tf.GradientTape() as tape:
        value = regularizer(variable)
    grad = tape.gradient(value, variable).numpy()
    assert float(value) == pytest.approx(0.3 * numpy_decorrelation(z), rel=1e-10)
    np.testing.assert_allclose(
        grad, 0.3 * finite_difference_gradient(numpy_decorrelation, z), rtol=1e-6, atol=1e-8
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
