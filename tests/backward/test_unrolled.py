"""`Unrolled(remat=True)`: the gradient of the rematerialized unrolled solve is that of
the plain unrolled solve (same weights, same iterations), for a plain and a nested
state, with a solver that keeps a history (Anderson) and one that does not."""

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


def gradients(remat, solver, nested):
    keras.utils.set_random_seed(0)
    if nested:
        cell, state_shape = PairCell(), [(UNITS,), (UNITS,)]
    else:
        cell, state_shape = keras_deq.DenseCell(UNITS), (UNITS,)
    # tol=1e-30 is never met: both solves run exactly max_iter steps.
    layer = keras_deq.DEQ(
        cell,
        solver=solver,
        max_iter=9,
        tol=1e-30,
        on_failure="ignore",
        backward=Unrolled(remat=remat),
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
    return [np.asarray(g) for g in grads]


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
    plain, remat = gradients(False, solver, nested), gradients(True, solver, nested)
    assert len(plain) == len(remat) >= 2
    for a, b in zip(plain, remat, strict=True):
        assert np.abs(a).max() > 1e-3  # the gradient reaches every weight and the input
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_remat_is_a_checked_serialized_setting():
    assert Unrolled(remat=True).get_config() == {"remat": True}
    assert keras_deq.backward.get("unrolled", remat=True).remat is True
    with pytest.raises(ValueError, match="`remat` must be a boolean. Received: remat=1"):
        Unrolled(remat=1)
