"""The deep OptEq cell (`OptEqCell`): its contraction bound, fixed point and config."""

import keras
import numpy as np
import pytest
from keras import ops
from opteq_references import iterate, random_weights

from keras_deq.layers.opteq_cell import OptEqCell


@pytest.fixture(autouse=True)
def _seed():
    """Unseeded initializers draw from Keras' global seed: fix it per test."""
    keras.utils.set_random_seed(0)


def set_norms(cell, norms, rng):
    for unit, norm in zip(cell.unit_layers, norms, strict=True):
        kernel, injection, bias = random_weights(rng, *unit.kernel.shape, norm)
        unit.kernel.assign(kernel)
        unit.injection_kernel.assign(injection)
        unit.bias.assign(bias)


@pytest.mark.float64
def test_deep_cell_obeys_the_contraction_bound_and_has_one_fixed_point():
    rng = np.random.default_rng(6)
    cell = OptEqCell([7, 9, 5], alpha=0.6, dtype="float64")
    cell.build((None, 6), (None, 6))
    norms = (0.95, 1.0, 0.8)
    set_norms(cell, norms, rng)
    bound = np.prod([0.6 * n**2 + 0.4 for n in norms])
    assert float(cell.lipschitz_bound()) == pytest.approx(bound, rel=1e-6)
    x = np.repeat(rng.normal(size=(1, 6)), 5000, axis=0)
    a, b = rng.normal(size=(2, 5000, 6)) * 3
    ratio = np.linalg.norm(
        np.asarray(cell(a, x)) - np.asarray(cell(b, x)), axis=1
    ) / np.linalg.norm(a - b, axis=1)
    assert ratio.max() <= bound and ratio.max() > 0.3 * bound
    starts = rng.normal(size=(3, 1, 6)) * 10
    ends = [iterate(lambda z: cell(z, ops.convert_to_tensor(x[:1])), s, 400) for s in starts]
    np.testing.assert_allclose(ends[1], ends[0], atol=1e-10)
    np.testing.assert_allclose(ends[2], ends[0], atol=1e-10)


@pytest.mark.float64
def test_conv_cell_obeys_the_contraction_bound():
    rng = np.random.default_rng(7)
    cell = OptEqCell([4, 6], kind="conv", alpha=0.5, dtype="float64")
    cell.build((None, 5, 5, 3), (None, 5, 5, 3))
    bound = float(cell.lipschitz_bound())
    assert bound < 1
    x = np.repeat(rng.normal(size=(1, 5, 5, 3)), 500, axis=0)
    a, b = rng.normal(size=(2, 500, 5, 5, 3))
    diff = (np.asarray(cell(a, x)) - np.asarray(cell(b, x))).reshape(500, -1)
    ratio = np.linalg.norm(diff, axis=1) / np.linalg.norm((a - b).reshape(500, -1), axis=1)
    assert ratio.max() <= bound


def test_cell_config_round_trip_with_a_prior():
    layer = OptEqCell([3, 4], kind="conv", prior="decorrelation", prior_strength=0.3)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is type(layer) and clone.get_config() == layer.get_config()
