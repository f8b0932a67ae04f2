"""`RandomStart`: which rows start at noise, the seed, path independence in a `DEQ`."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_deq

UNITS, FEATURES, BATCH = 4, 3, 6


def contractive_deq(**kwargs):
    """A DEQ of a tanh `DenseCell` whose kernel has spectral norm 0.6."""
    cell = keras_deq.DenseCell(UNITS)
    deq = keras_deq.DEQ(cell, state_shape=(UNITS,), on_failure="ignore", **kwargs)
    deq.build((None, FEATURES))
    rng = np.random.default_rng(0)
    w = rng.normal(size=(UNITS, UNITS))
    cell.kernel.assign(0.6 * w / np.linalg.norm(w, 2))
    cell.injection_kernel.assign(rng.normal(size=(FEATURES, UNITS)))
    return deq


def inputs(seed=1):
    return np.random.default_rng(seed).normal(size=(BATCH, FEATURES)).astype("float32")


def unrolled_fixed_point(layer, x, steps=80):
    """A long plain iteration of the cell from zeros (an independent fixed point)."""
    z = np.zeros((x.shape[0], UNITS), "float32")
    for _ in range(steps):
        z = keras.ops.convert_to_numpy(layer.cell(z, x))
    return z


def test_a_fraction_of_the_rows_start_at_noise():
    """Counted against the binomial law: 400 rows, fraction 0.25, stddev 3."""
    start = keras_deq.RandomStart(fraction=0.25, stddev=3.0)
    z0 = ops.ones((400, 5))
    z = np.asarray(start(z0, keras.random.SeedGenerator(3)))
    noisy = ~np.all(z == 1.0, axis=1)
    assert abs(noisy.mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 400)
    assert np.all(z[~noisy] == 1.0)
    assert abs(z[noisy].std() - 3.0) < 0.3
    every = np.asarray(keras_deq.RandomStart(fraction=1.0)(z0, keras.random.SeedGenerator(3)))
    assert not np.any(every == 1.0)


def test_the_seed_fixes_the_sequence_and_each_call_draws_anew():
    start, z0 = keras_deq.RandomStart(1.0), ops.zeros((2, 3))
    first, second = keras.random.SeedGenerator(7), keras.random.SeedGenerator(7)
    a1, a2 = np.asarray(start(z0, first)), np.asarray(start(z0, first))
    np.testing.assert_array_equal(np.asarray(start(z0, second)), a1)
    assert not np.allclose(a1, a2)


def test_random_starts_reach_the_zero_start_fixed_point():
    """Path independence of a contractive cell: from noise (stddev 3) or zeros, the same
    fixed point within the tolerance; the training calls did start elsewhere (2 steps
    from each start differ) and differ per call; inference ignores `start`."""
    x = inputs()
    random = contractive_deq(tol=1e-6, max_iter=100, start=keras_deq.RandomStart(1.0, 3.0), seed=4)
    cold = np.asarray(random(x, training=False))  # from zeros
    np.testing.assert_allclose(cold, unrolled_fixed_point(random, x), atol=1e-5)
    np.testing.assert_allclose(np.asarray(random(x, training=True)), cold, atol=1e-5)
    short = dict(solver="fixed_point", max_iter=2, tol=1e-6)
    plain = np.asarray(contractive_deq(**short)(x, training=True))
    started = contractive_deq(**short, start=keras_deq.RandomStart(1.0, 3.0), seed=4)
    first, second = (np.asarray(started(x, training=True)) for _ in range(2))
    assert np.abs(first - plain).max() > 1e-2
    assert np.abs(first - second).max() > 1e-2
    np.testing.assert_array_equal(np.asarray(started(x, training=False)), np.asarray(plain))


def test_config_round_trip_in_a_deq():
    deq = contractive_deq(start=keras_deq.RandomStart(0.3, 0.5))
    config = deq.get_config()
    restored = keras_deq.DEQ.from_config(config)
    assert restored.start.get_config() == {"fraction": 0.3, "stddev": 0.5}
    assert restored.get_config()["start"] == config["start"]
    assert keras_deq.DEQ.from_config(contractive_deq().get_config()).start is None


@pytest.mark.parametrize(
    "kwargs, match", [({"fraction": 0.0}, "fraction"), ({"stddev": -1.0}, "stddev")]
)
def test_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_deq.RandomStart(**kwargs)
    with pytest.raises(ValueError, match="start"):
        keras_deq.DEQ(keras_deq.DenseCell(2), start="normal")
