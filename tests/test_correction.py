"""`FixedPointCorrection`: the sampled states against a hand-written unrolled iteration,
their gradient against a hand-written unrolled loss, the weights, the settings."""

import json

import keras
import numpy as np
import pytest
from feature_references import layer_gradients
from keras import ops

import keras_deq
from keras_deq.backward import OneStep, Phantom
from keras_deq.solvers import FixedPoint
from keras_deq.solvers.base import Solver, recording
from keras_deq.solvers.common import per_entry

UNITS, FEATURES, BATCH = 4, 3, 5


def contractive_cell(seed=0):
    """A tanh `DenseCell` whose kernel has spectral norm 0.6, built."""
    cell = keras_deq.DenseCell(UNITS)
    cell.build((None, UNITS), (None, FEATURES))
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(UNITS, UNITS))
    cell.kernel.assign(0.6 * w / np.linalg.norm(w, 2))
    cell.injection_kernel.assign(rng.normal(size=(FEATURES, UNITS)))
    cell.bias.assign(rng.normal(size=(UNITS,)))
    return cell


def data(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, FEATURES)).astype("float32")
    targets = [rng.normal(size=(BATCH, UNITS)).astype("float32") for _ in range(3)]
    return x, targets


class UnrolledReference(keras.layers.Layer):
    """The correction written out: plain iteration from zeros with a Python loop, the
    iterates `z_i` at `indexing` and a long-run `z*` as constants, each refined by
    `steps` damped steps `z <- (1 - damping) z + damping f(z, x)` (one undamped step:
    the one-step gradient), differentiated by autodiff."""

    def __init__(self, cell, indexing, steps, damping, **kwargs):
        super().__init__(**kwargs)
        self.cell, self.indexing, self.steps, self.damping = cell, indexing, steps, damping

    def refine(self, z, x):
        z = ops.stop_gradient(z)
        for _ in range(self.steps):
            z = (1 - self.damping) * z + self.damping * self.cell(z, x)
        return z

    def call(self, x, training=None):
        z, kept = ops.zeros((ops.shape(x)[0], UNITS)), []
        for i in range(1, 80):
            z = self.cell(ops.stop_gradient(z), ops.stop_gradient(x))
            if i in self.indexing:
                kept.append(z)
        return [self.refine(s, x) for s in kept] + [self.refine(z, x)]


# ------------------------------------------------------------------ the solver loop
def test_recording_keeps_the_iterates_of_plain_iteration():
    """`z_i` after `i` iterations (a tuple in `recorded`), the returned state past the stop;
    with `per_entry`, in the state's shape."""
    w = np.random.default_rng(0).normal(size=(3, 3)).astype("float32") * 0.3
    f = lambda z: ops.tanh(ops.matmul(z, w) + 1.0)  # noqa: E731
    z0 = np.zeros((2, 3), "float32")
    want, z = [], z0
    for _ in range(6):
        z = np.tanh(z @ w + 1.0)
        want.append(z)
    solver = FixedPoint(max_iter=40, tol=1e-5)
    with recording((1, 4, 39)):
        result = solver(f, z0)
    assert 4 < int(result.steps) < 39
    np.testing.assert_allclose(np.asarray(result.recorded[0]), want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(result.recorded[1]), want[3], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(result.recorded[2]), np.asarray(result.state))
    assert solver(f, z0).recorded is None  # outside the scope nothing is kept
    f3 = lambda z: ops.tanh(ops.matmul(z, w) + 1.0)  # noqa: E731
    with recording((1,)):
        entries = per_entry(FixedPoint(max_iter=40, tol=1e-5), 2)(f3, np.zeros((2, 2, 3), "f4"))
    assert tuple(entries.recorded[0].shape) == (2, 2, 3)
    np.testing.assert_allclose(np.asarray(entries.recorded[0])[1, 0], want[0][0], rtol=1e-6)


class NaNAtStep2(Solver):
    """Plain iteration whose step (not the map) makes sample 1's third iterate NaN."""

    def step(self, f, z, fz, state, k):
        row = ops.arange(ops.shape(z)[0])[:, None]
        return ops.where((k == 2) & (row == 1), float("nan"), fz), state


def test_a_non_finite_iterate_is_not_recorded():
    """Sample 1's third iterate is NaN: its record there is one of its finite iterates
    (0, 1, 2); sample 0 keeps `z_3 = 3`."""
    f = lambda z: z + 1.0  # noqa: E731
    with recording((3,)):
        result = NaNAtStep2(max_iter=6, tol=1e-9)(f, np.zeros((2, 1), "float32"))
    kept = np.asarray(result.recorded[0])
    assert kept[0, 0] == 3.0
    assert kept[1, 0] in (0.0, 1.0, 2.0)


# ------------------------------------------------------------------------- gradient
@pytest.mark.parametrize(
    "gradient, steps, damping",
    [
        (OneStep(), 1, 1.0),
        # The same code path as `OneStep` with more steps; 7 s on JAX (compiling).
        pytest.param(Phantom(steps=3, damping=0.7), 3, 0.7, marks=pytest.mark.slow),
    ],
)
def test_correction_gradient_matches_a_hand_written_unrolled_loss(gradient, steps, damping):
    cell = contractive_cell()
    correction = keras_deq.FixedPointCorrection(states=2, indexing=[2, 5], gradient=gradient)
    deq = keras_deq.DEQ(
        cell,
        solver="fixed_point",
        max_iter=60,
        tol=1e-7,
        state_shape=(UNITS,),
        backward=gradient,
        correction=correction,
        on_failure="ignore",
    )
    deq.build((None, FEATURES))
    reference = UnrolledReference(cell, (2, 5), steps, damping)
    x, targets = data()
    weights = correction.loss_weights()

    def loss(outputs):
        return sum(
            w * ops.sum(ops.square(o - ops.convert_to_tensor(t)))
            for w, o, t in zip(weights, outputs, targets, strict=True)
        )

    values = [np.asarray(v) for v in deq(x)]
    for got, want in zip(values, reference(x), strict=True):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
    got = layer_gradients(deq, x, loss, cell.trainable_variables)
    want = layer_gradients(reference, x, loss, cell.trainable_variables)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)
    # The sampled states carry gradient: without them the loss's gradient differs.
    assert not np.allclose(np.asarray(got[1]), np.asarray(want[1]) * 0)


def test_evenly_spaced_states_and_states_past_the_stop():
    """`states=3` with `max_iter=8` samples iterations 2, 4, 6; an iteration the solver
    never reached (it converged first) gets the fixed point."""
    assert keras_deq.FixedPointCorrection(states=3).indices(8) == (2, 4, 6)
    cell = contractive_cell()
    correction = keras_deq.FixedPointCorrection(states=2, indexing=[1, 59])
    deq = keras_deq.DEQ(
        cell, solver="anderson", max_iter=60, tol=1e-6, correction=correction, state_shape=(UNITS,)
    )
    x, _ = data()
    first, late, z_star = (np.asarray(v) for v in deq(x))
    np.testing.assert_allclose(first, np.asarray(cell(cell(ops.zeros((BATCH, UNITS)), x), x)))
    np.testing.assert_allclose(late, z_star, rtol=1e-4, atol=1e-5)  # f(z*) = z*


def test_loss_weights():
    n2 = dict(states=2)
    assert keras_deq.FixedPointCorrection(**n2, gamma=0.5).loss_weights() == [0.25, 0.5, 1.0]
    linear = keras_deq.FixedPointCorrection(**n2, weighting="linear").loss_weights()
    np.testing.assert_allclose(linear, [1 / 3, 2 / 3, 1.0])
    assert keras_deq.FixedPointCorrection(**n2, weighting="constant").loss_weights() == [1.0] * 3


@pytest.mark.slow  # 9 s on JAX (compiling `fit`); the tutorial runs it on TensorFlow
def test_fit_with_weighted_heads():
    """A functional model with one shared head per returned state trains under
    `compile(loss_weights=...)`, and the correction round-trips in the config."""
    correction = keras_deq.FixedPointCorrection(states=2, weighting="linear")
    inputs = keras.Input((FEATURES,))
    deq = keras_deq.DEQ(
        keras_deq.DenseCell(UNITS), max_iter=9, correction=correction, state_shape=(UNITS,)
    )
    head = keras.layers.Dense(2)
    model = keras.Model(inputs, [head(s) for s in deq(inputs)])
    model.compile("sgd", loss=["mse"] * 3, loss_weights=correction.loss_weights())
    x = np.random.default_rng(0).normal(size=(8, FEATURES)).astype("float32")
    y = np.ones((8, 2), "float32")
    history = model.fit(x, [y] * 3, epochs=2, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_config_round_trip():
    """Every setting survives `DEQ.get_config` through JSON and `from_config`."""
    correction = keras_deq.FixedPointCorrection(
        states=2, indexing=[3, 7], gradient=Phantom(4, 0.3), weighting="linear", gamma=0.5
    )
    deq = keras_deq.DEQ(keras_deq.DenseCell(UNITS), max_iter=9, correction=correction)
    config = json.loads(json.dumps(deq.get_config()))
    restored = keras_deq.DEQ.from_config(config).correction
    assert restored.get_config() == correction.get_config()
    assert (restored.gradient.steps, restored.gradient.damping) == (4, 0.3)
    assert restored.indices(9) == (3, 7) and restored.loss_weights() == [1 / 3, 2 / 3, 1.0]
    assert (
        keras_deq.DEQ.from_config(keras_deq.DEQ(keras_deq.DenseCell(2)).get_config()).correction
        is None
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"states": 0}, "states"),
        ({"states": 2, "indexing": [3, 3]}, "indexing"),
        ({"states": 2, "indexing": [3]}, "indexing"),
        ({"gradient": "implicit"}, "gradient"),
        ({"weighting": "cosine"}, "weighting"),
        ({"gamma": 0.0}, "gamma"),
    ],
)
def test_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_deq.FixedPointCorrection(**kwargs)


def test_deq_refuses_samples_outside_the_budget():
    cell = keras_deq.DenseCell(UNITS)
    with pytest.raises(ValueError, match="states"):
        keras_deq.DEQ(cell, max_iter=3, correction=keras_deq.FixedPointCorrection(states=3))
    with pytest.raises(ValueError, match="indexing"):
        keras_deq.DEQ(cell, max_iter=3, correction=keras_deq.FixedPointCorrection(1, [4]))
    with pytest.raises(ValueError, match="correction"):
        keras_deq.DEQ(cell, correction="exponential")
