"""Variational (shared-mask) dropout inside a DEQ cell is `keras.layers.Dropout`: the
`DEQ` holds the cell's state for one call (`layers/cell_state.py`), so one training
call draws one mask, used at every solver iteration and in the backward pass, and the
next call (or batch of `fit`) draws the next.

The reference draws the masks independently, from a `keras.random.SeedGenerator` with
the dropout layer's seed, and solves `z = tanh(m * (z W) + x)` and its implicit
gradient with numpy."""

import keras
import numpy as np
import pytest
from feature_references import layer_gradients
from keras import ops

import keras_deq

UNITS, BATCH, RATE, SEED = 6, 5, 0.5, 3


class DropoutCell(keras.layers.Layer):
    """`tanh(dropout(z W) + x)`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        init = keras.initializers.Orthogonal(
            0.4, seed=2
        )  # 0.8 with the 1 / (1 - rate) scale: a contraction
        self.dense = keras.layers.Dense(UNITS, use_bias=False, kernel_initializer=init)
        self.dropout = keras.layers.Dropout(RATE, seed=SEED)

    def build(self, z_shape, x_shape):
        self.dense.build(z_shape)

    def call(self, z, x, training=None):
        return ops.tanh(self.dropout(self.dense(z), training=training) + x)


def masks(count):
    """The first `count` masks (scaled by 1 / (1 - rate)) the dropout layer draws."""
    generator = keras.random.SeedGenerator(SEED)
    ones = ops.ones((BATCH, UNITS))
    return [
        ops.convert_to_numpy(keras.random.dropout(ones, RATE, seed=generator)) for _ in range(count)
    ]


def numpy_fixed_point(w, mask, x, steps=300):
    z = np.zeros_like(x)
    for _ in range(steps):
        z = np.tanh(mask * (z @ w) + x)
    return z


def make_deq(backward="implicit"):
    return keras_deq.DEQ(
        DropoutCell(), state_shape=(UNITS,), max_iter=100, tol=1e-7, backward=backward
    )


def inputs(seed=0):
    return np.random.default_rng(seed).normal(size=(BATCH, UNITS)).astype("float64")


def test_each_training_call_solves_with_one_mask_and_the_next_call_draws_the_next():
    deq, x = make_deq(), inputs()
    deq.build(x.shape)
    w = ops.convert_to_numpy(deq.cell.dense.kernel).astype("float64")
    first, second = masks(2)
    assert 0 < (first == 0).sum() < first.size and not np.array_equal(first, second)
    for mask in (first, second):
        z = ops.convert_to_numpy(deq(x.astype("float32"), training=True))
        assert deq.solver_statistics()["converged"] == 1.0
        np.testing.assert_allclose(z, numpy_fixed_point(w, mask, x), atol=2e-5)
    no_dropout = numpy_fixed_point(w, np.ones_like(first), x)
    np.testing.assert_allclose(
        ops.convert_to_numpy(deq(x.astype("float32"))), no_dropout, atol=2e-5
    )


@pytest.mark.parametrize(
    "backward",
    ["implicit", keras_deq.backward.Unrolled(remat=True)],
    ids=["implicit", "unrolled_remat"],
)
def test_the_backward_pass_uses_the_forward_mask(backward):
    deq, x = make_deq(backward), inputs(1)
    deq.build(x.shape)
    w = ops.convert_to_numpy(deq.cell.dense.kernel).astype("float64")
    (mask,) = masks(1)
    t = np.random.default_rng(2).normal(size=(BATCH, UNITS))
    target = ops.convert_to_tensor(t.astype("float32"))
    grad_x, grad_w = layer_gradients(
        deq, x.astype("float32"), lambda z: ops.sum(z * target), [deq.cell.dense.kernel]
    )
    # Implicit function theorem, per sample: z = tanh(a), a = m * (z W) + x.
    z = numpy_fixed_point(w, mask, x)
    want_x, want_w = np.zeros_like(x), np.zeros_like(w)
    for i in range(BATCH):
        d = 1 - z[i] ** 2
        jacobian = (d * mask[i])[:, None] * w.T  # d z_j / d z_k
        u = np.linalg.solve((np.eye(UNITS) - jacobian).T, t[i])  # adjoint
        want_x[i] = d * u
        want_w += np.outer(z[i], d * mask[i] * u)
    np.testing.assert_allclose(np.asarray(grad_x), want_x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_w), want_w, rtol=1e-4, atol=1e-5)


def test_fit_draws_one_mask_per_batch():
    model = keras.Sequential([keras.Input((UNITS,)), make_deq()])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = np.concatenate([inputs(3), inputs(4)]).astype("float32")
    model.fit(x, np.zeros_like(x), batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    generator = keras.random.SeedGenerator(SEED)
    for _ in range(2):  # two batches: the seed advanced twice
        generator.next()
    state = model.layers[0].cell.dropout.seed_generator.state
    np.testing.assert_array_equal(
        ops.convert_to_numpy(state), ops.convert_to_numpy(generator.state)
    )
