"""`DEQ(stateful=True)`: warm starts from the previous call's fixed point."""

import keras
import numpy as np
import pytest

import keras_deq

UNITS, FEATURES, BATCH = 4, 3, 5


def stateful_deq(batch=BATCH, **kwargs):
    """A stateful DEQ of a tanh `DenseCell` whose kernel has spectral norm 0.6."""
    cell = keras_deq.DenseCell(UNITS)
    deq = keras_deq.DEQ(cell, state_shape=(UNITS,), tol=1e-5, stateful=True, **kwargs)
    deq.build((batch, FEATURES))
    rng = np.random.default_rng(0)
    w = rng.normal(size=(UNITS, UNITS))
    cell.kernel.assign(0.6 * w / np.linalg.norm(w, 2))
    cell.injection_kernel.assign(rng.normal(size=(FEATURES, UNITS)))
    return deq


def inputs(seed=1, batch=BATCH):
    return np.random.default_rng(seed).normal(size=(batch, FEATURES)).astype("float32")


def call(layer, x, **kwargs):
    """The output and forward steps of one call (statistics of that call only)."""
    for metric in layer.metrics:
        metric.reset_state()
    out = np.asarray(layer(x, **kwargs))
    return out, layer.solver_statistics()["fwd_steps"]


def unrolled_fixed_point(layer, x, steps=80):
    """A long plain iteration of the cell from zeros (an independent fixed point)."""
    z = np.zeros((x.shape[0], UNITS), "float32")
    for _ in range(steps):
        z = keras.ops.convert_to_numpy(layer.cell(z, x))
    return z


def test_a_warm_start_from_the_fixed_point_converges_at_once():
    deq, x = stateful_deq(), inputs()
    cold, cold_steps = call(deq, x)
    warm, warm_steps = call(deq, x)
    assert cold_steps > 3 and warm_steps <= 1
    np.testing.assert_allclose(warm, cold, atol=1e-5)
    np.testing.assert_allclose(warm, unrolled_fixed_point(deq, x), atol=1e-4)
    # A call's `initial_state` wins over the kept state; `reset_states` forgets it.
    _, given_steps = call(deq, x, initial_state=np.zeros((BATCH, UNITS), "float32"))
    assert given_steps == cold_steps
    deq.reset_states()
    again, again_steps = call(deq, x)
    assert again_steps == cold_steps
    np.testing.assert_allclose(again, cold, atol=1e-6)


def test_predict_carries_the_state_across_batches():
    """In `predict`'s compiled step the state of the last batch is kept."""
    deq = stateful_deq(batch=2)
    model = keras.Sequential([keras.Input((FEATURES,), batch_size=2), deq])
    x = inputs(batch=4)
    out = model.predict(x, batch_size=2, verbose=0)
    np.testing.assert_allclose(np.asarray(deq._warm_states[0]), out[2:], atol=1e-6)
    np.testing.assert_allclose(out, unrolled_fixed_point(deq, x), atol=1e-4)


def test_stateful_needs_a_fixed_batch_size_and_round_trips():
    with pytest.raises(ValueError, match="batch"):
        stateful_deq(batch=None)
    with pytest.raises(ValueError, match="stateful"):
        keras_deq.DEQ(keras_deq.DenseCell(2), stateful=1)
    restored = keras_deq.DEQ.from_config(stateful_deq().get_config())
    assert restored.stateful is True
