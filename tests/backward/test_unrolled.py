"""`Unrolled(remat=True)` and `Unrolled(checkpoint_every=k)`: the gradient of the
rematerialized (or segment-checkpointed) unrolled solve is that of the plain unrolled
solve (same weights, same iterations), for a plain and a nested state, with a solver
that keeps a history (Anderson) and one that does not, and with a solve that stops
inside a segment."""

import keras
import numpy as np
import pytest
from feature_references import layer_gradients
from keras import ops

import keras_deq
from keras_deq.backward import Unrolled

UNITS, FEATURES, BATCH = 4, 3, 5


class PairCell(keras.layers.Layer):
    """A two-part state `(a, b)`: `a <- tanh(b W + x)`, `b <- tanh(a V)`."""

    def build(self, z_shape, x_shape):
        init = keras.initializers.Orthogonal(0.6, seed=4)
        self.w = self.add_weight(shape=(UNITS, UNITS), initializer=init, name="w")
        self.v = self.add_weight(shape=(UNITS, UNITS), initializer=init, name="v")

    def call(self, z, x):
        a, b = z
        return ops.tanh(ops.matmul(b, self.w) + x), ops.tanh(ops.matmul(a, self.v))

    def compute_output_shape(self, z_shape, x_shape):
        return z_shape


def gradients(remat, solver, nested, checkpoint_every=None, tol=1e-30, max_iter=9):
    """The gradients of a loss of `DEQ(..., backward=Unrolled(...))` with respect to the
    input and the cell's weights, and the forward steps run."""
    keras.utils.set_random_seed(0)
    if nested:
        cell, state_shape = PairCell(), [(UNITS,), (UNITS,)]
    else:
        cell, state_shape = keras_deq.DenseCell(UNITS), (UNITS,)
    # tol=1e-30 is never met: the solve runs exactly max_iter steps.
    layer = keras_deq.DEQ(
        cell,
        solver=solver,
        max_iter=max_iter,
        tol=tol,
        on_failure="ignore",
        backward=Unrolled(remat=remat, checkpoint_every=checkpoint_every),
        state_shape=state_shape,
    )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, UNITS if nested else FEATURES)).astype("float32")
    layer.build(x.shape)
    t = ops.convert_to_tensor(rng.normal(size=(BATCH, UNITS)).astype("float32"))

    def loss(out):
        out = out[0] + 2.0 * out[1] if nested else out
        return ops.sum(ops.square(out - t))

    grads = layer_gradients(layer, x, loss, layer.cell.trainable_variables)
    layer(x)  # the forward steps of this solve, for the statistics
    return [np.asarray(g) for g in grads], int(layer.solver_statistics()["fwd_steps"])


@pytest.mark.parametrize(
    ("solver", "nested"),
    [
        ("fixed_point", False),
        ("fixed_point", True),
        pytest.param("anderson", False, marks=pytest.mark.slow),  # 14-23 s (compilation)
    ],
    ids=["tensor", "pair", "anderson"],
)
def test_remat_gradient_equals_the_plain_unrolled_gradient(solver, nested):
    (plain, _), (remat, _) = gradients(False, solver, nested), gradients(True, solver, nested)
    assert len(plain) == len(remat) >= 2
    for a, b in zip(plain, remat, strict=True):
        assert np.abs(a).max() > 1e-3  # the gradient reaches every weight and the input
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def assert_same_gradients(plain, other):
    assert len(plain) == len(other) >= 2
    for a, b in zip(plain, other, strict=True):
        assert np.abs(a).max() > 1e-3  # the gradient reaches every weight and the input
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("solver", "nested", "every", "remat", "tol"),
    [
        # 9 iterations in segments of 4: the last segment runs one iteration of four.
        ("fixed_point", False, 4, False, 1e-30),
        pytest.param("fixed_point", True, 2, False, 1e-30, marks=pytest.mark.slow),
        # Both: each recomputed segment rematerializes its cell evaluations too.
        ("fixed_point", False, 3, True, 1e-30),
        # A segment longer than the solve: one segment, its iterations all recomputed.
        pytest.param("fixed_point", False, 20, False, 1e-30, marks=pytest.mark.slow),
        # tol=1e-2 stops the solve before max_iter, inside a segment (checked below).
        ("fixed_point", False, None, False, 1e-2),
        pytest.param("anderson", False, 4, False, 1e-30, marks=pytest.mark.slow),  # 15-30 s
        pytest.param("anderson", False, None, False, 1e-2, marks=pytest.mark.slow),
    ],
    ids=["tensor", "pair", "remat", "one-segment", "early-stop", "anderson", "anderson-stop"],
)
def test_checkpointed_gradient_equals_the_plain_unrolled_gradient(
    solver, nested, every, remat, tol
):
    max_iter = 9 if tol == 1e-30 else 12
    plain, steps = gradients(False, solver, nested, tol=tol, max_iter=max_iter)
    if every is None:  # segments of 3 or 4 iterations: the stop (< 12) falls inside one
        every = 3 if steps % 3 else 4
    checkpointed, steps_checkpointed = gradients(
        remat, solver, nested, checkpoint_every=every, tol=tol, max_iter=max_iter
    )
    assert steps_checkpointed == steps
    if tol > 1e-30:  # the stop falls inside a segment, before max_iter
        assert steps < max_iter and steps % every != 0, steps
    else:
        assert steps == max_iter
    assert_same_gradients(plain, checkpointed)


@pytest.mark.slow  # two models compiled: 20-60 s
def test_fit_with_checkpointed_segments_takes_the_plain_unrolled_step():
    """One compiled training step (Keras' `train_on_batch`, its default compilation on
    each backend) updates the weights as the plain unrolled gradient does."""

    def trained(backward):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras_deq.DEQ(
                    keras_deq.DenseCell(UNITS),
                    max_iter=7,
                    tol=1e-3,
                    on_failure="ignore",
                    backward=backward,
                    state_shape=(UNITS,),
                ),
                keras.layers.Dense(2),
            ]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        rng = np.random.default_rng(2)
        x = rng.normal(size=(BATCH, FEATURES)).astype("float32")
        y = rng.normal(size=(BATCH, 2)).astype("float32")
        model.train_on_batch(x, y)
        return [np.asarray(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]

    plain, checkpointed = trained(Unrolled()), trained(Unrolled(checkpoint_every=3))
    for a, b in zip(plain, checkpointed, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_remat_and_checkpoint_every_are_checked_serialized_settings():
    assert Unrolled(remat=True).get_config() == {"remat": True, "checkpoint_every": None}
    assert keras_deq.backward.get("unrolled", remat=True).remat is True
    backward = Unrolled(checkpoint_every=np.int64(8))
    assert backward.get_config() == {"remat": False, "checkpoint_every": 8}
    restored = keras_deq.backward.deserialize(keras_deq.backward.serialize(backward))
    assert isinstance(restored, Unrolled) and restored.checkpoint_every == 8
    assert keras_deq.backward.get("unrolled", checkpoint_every=4).checkpoint_every == 4
    with pytest.raises(ValueError, match="`remat` must be a boolean. Received: remat=1"):
        Unrolled(remat=1)
    for bad in (0, -2, 2.5, True, "8"):
        with pytest.raises(ValueError, match="`checkpoint_every` must be a positive integer"):
            Unrolled(checkpoint_every=bad)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's XLA path")
def test_unrolled_anderson_under_xla_has_the_graph_gradient():
    """Under XLA (`jit_compile=True`) Anderson keeps its history in a ring buffer written
    with a slice update, which TensorFlow cannot differentiate by itself ("No gradient
    defined for XlaDynamicUpdateSlice"); outside XLA it keeps a tuple. Both gradients of
    the unrolled solve agree."""
    import tensorflow as tf  # noqa: PLC0415

    keras.utils.set_random_seed(0)
    layer = keras_deq.DEQ(
        keras_deq.DenseCell(UNITS),
        solver=keras_deq.solvers.Anderson(window=3),
        max_iter=6,
        tol=1e-30,
        on_failure="ignore",
        backward=Unrolled(),
        state_shape=(UNITS,),
    )
    x = np.random.default_rng(1).normal(size=(BATCH, FEATURES)).astype("float32")
    layer.build(x.shape)

    def gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x, training=True)))
        return tape.gradient(loss, [x, *layer.trainable_variables])

    x = tf.constant(x)
    graph = tf.function(gradients)(x)
    xla = tf.function(gradients, jit_compile=True)(x)
    assert_same_gradients([g.numpy() for g in graph], [g.numpy() for g in xla])


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's XLA path")
def test_slice_update_gradient_under_xla():
    import tensorflow as tf  # noqa: PLC0415

    from keras_deq import backend

    rng = np.random.default_rng(3)
    inputs = tf.constant(rng.normal(size=(2, 4, 3)).astype("float32"))
    updates = tf.constant(rng.normal(size=(2, 1, 3)).astype("float32"))
    weights = tf.constant(rng.normal(size=(2, 4, 3)).astype("float32"))

    @tf.function(jit_compile=True)
    def gradients(inputs, updates, slot):
        with tf.GradientTape() as tape:
            tape.watch([inputs, updates])
            out = backend.slice_update(inputs, (0, slot, 0), updates)
            loss = tf.reduce_sum(weights * out)
        return out, tape.gradient(loss, [inputs, updates])

    out, (d_inputs, d_updates) = gradients(inputs, updates, tf.constant(2))
    expected = inputs.numpy().copy()
    expected[:, 2:3] = updates.numpy()
    np.testing.assert_array_equal(out.numpy(), expected)
    mask = np.ones((2, 4, 3), "float32")
    mask[:, 2] = 0.0
    np.testing.assert_allclose(d_inputs.numpy(), weights.numpy() * mask)
    np.testing.assert_allclose(d_updates.numpy(), weights.numpy()[:, 2:3])
