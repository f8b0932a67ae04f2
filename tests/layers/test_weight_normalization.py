"""`WeightNormalization`: the effective kernel is `g v / ||v||` (numpy), the wrapped layer
computes with it, its gradient matches float64 finite differences of that formula, and
at initialization the wrapped cell is the unwrapped one (also as a `DEQ`)."""

import keras
import numpy as np
import pytest
from feature_references import finite_difference_gradient, layer_gradients
from keras import ops

import keras_deq
from keras_deq import WeightNormalization


def numpy_weight_norm(g, v):
    return g * v / np.sqrt(np.sum(v**2, axis=tuple(range(v.ndim - 1))))


def test_effective_kernel_is_g_v_over_norm_and_the_layer_uses_it():
    rng = np.random.default_rng(0)
    layer = WeightNormalization(keras.layers.Conv2D(3, 2, use_bias=False))
    x = rng.normal(size=(2, 4, 4, 2)).astype("float32")
    layer(x)
    (g,) = [w for w in layer.trainable_variables if len(w.shape) == 1]
    v = rng.normal(size=(2, 2, 2, 3))
    layer.layer.kernel.assign(v)
    g.assign(rng.uniform(0.5, 2.0, size=3))
    want = numpy_weight_norm(np.asarray(g.value, "float64"), v)
    np.testing.assert_allclose(ops.convert_to_numpy(layer.effective_kernels()[0]), want, rtol=1e-5)
    reference = keras.layers.Conv2D(3, 2, use_bias=False)
    reference.build(x.shape)
    reference.kernel.assign(want)
    np.testing.assert_allclose(
        ops.convert_to_numpy(layer(x)), ops.convert_to_numpy(reference(x)), rtol=1e-5, atol=1e-6
    )


def test_at_initialization_the_cell_and_its_deq_are_unchanged():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(1).normal(size=(3, 5)).astype("float32")
    cell = keras_deq.DenseCell(4)
    plain = keras_deq.DEQ(cell, state_shape=(4,), tol=1e-6)
    wrapped = keras_deq.DEQ(WeightNormalization(cell), state_shape=(4,), tol=1e-6)
    np.testing.assert_allclose(
        ops.convert_to_numpy(wrapped(x)), ops.convert_to_numpy(plain(x)), rtol=1e-5, atol=1e-6
    )
    gains = [w for w in wrapped.cell.trainable_variables if len(w.shape) == 1 and "_g" in w.path]
    assert len(gains) == 2  # the state kernel and the injection kernel


def test_gradient_matches_float64_finite_differences():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3))
    t = rng.normal(size=(4, 2))
    layer = WeightNormalization(keras.layers.Dense(2, activation="tanh", use_bias=False))
    layer(x.astype("float32"))
    v0, g0 = rng.normal(size=(3, 2)), rng.uniform(0.5, 2.0, size=2)
    layer.layer.kernel.assign(v0)
    (g,) = [w for w in layer.trainable_variables if len(w.shape) == 1]
    g.assign(g0)

    def numpy_loss(g, v):
        return np.sum(np.tanh(x @ numpy_weight_norm(g, v)) * t)

    target = ops.convert_to_tensor(t.astype("float32"))
    _, grad_v, grad_g = layer_gradients(
        layer, x.astype("float32"), lambda out: ops.sum(out * target), [layer.layer.kernel, g]
    )
    np.testing.assert_allclose(
        np.asarray(grad_v), finite_difference_gradient(lambda v: numpy_loss(g0, v), v0), atol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(grad_g), finite_difference_gradient(lambda g: numpy_loss(g, v0), g0), atol=1e-4
    )


def test_exclude_and_settings_are_checked():
    cell = WeightNormalization(keras_deq.DenseCell(4), exclude=["injection"])
    keras_deq.DEQ(cell, state_shape=(4,)).build((2, 5))
    assert [v.path for v, _ in cell._kernels] == [cell.layer.kernel.path]
    with pytest.raises(ValueError, match="`epsilon` must be a non-negative number"):
        WeightNormalization(keras.layers.Dense(2), epsilon=-1.0)
    with pytest.raises(ValueError, match="`exclude` must be a list of strings"):
        WeightNormalization(keras.layers.Dense(2), exclude="kernel")
    with pytest.raises(ValueError, match="found no kernel"):
        WeightNormalization(keras.layers.Dense(2), exclude=["kernel"])(np.zeros((1, 3)))


def test_in_a_deq_the_gradient_is_that_of_the_cell_with_the_numpy_kernel():
    """With gains moved away from `||v||`, the wrapped DEQ's input gradient
    (the implicit backward, through the wrapper) equals that of a plain DEQ whose
    kernel is numpy's `g v / ||v||`."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 5)).astype("float32")
    t = ops.convert_to_tensor(rng.normal(size=(3, 4)).astype("float32"))
    options = {"state_shape": (4,), "tol": 1e-7, "max_iter": 100}
    wrapped = keras_deq.DEQ(WeightNormalization(keras_deq.DenseCell(4), exclude=["inj"]), **options)
    wrapped.build(x.shape)
    (g,) = [w for w in wrapped.cell.trainable_variables if len(w.shape) == 1 and "_g" in w.path]
    g.assign(rng.uniform(0.3, 0.8, size=4))
    inner = wrapped.cell.layer
    plain = keras_deq.DEQ(keras_deq.DenseCell(4), **options)
    plain.build(x.shape)
    v = ops.convert_to_numpy(inner.kernel).astype("float64")
    plain.cell.kernel.assign(numpy_weight_norm(ops.convert_to_numpy(g).astype("float64"), v))
    plain.cell.injection_kernel.assign(inner.injection_kernel)
    plain.cell.bias.assign(inner.bias)
    loss = lambda z: ops.sum(z * t)  # noqa: E731
    (want,) = layer_gradients(plain, x, loss, [])
    (got,) = layer_gradients(wrapped, x, loss, [])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


class KernelPriorCell(keras_deq.Cell):
    """`z <- tanh(z W + x)` whose SAM prior gradient `z W^T W` reads the kernel."""

    def build(self, z_shape, x_shape):
        init = keras.initializers.Orthogonal(0.5, seed=3)
        self.w = self.add_weight(shape=(z_shape[-1], z_shape[-1]), initializer=init, name="w")

    def call(self, z, x):
        return ops.tanh(ops.matmul(z, self.w) + x)

    def prior_gradient(self, z):
        return ops.matmul(ops.matmul(z, self.w), ops.transpose(self.w))


def _gain(wrapper, size):
    (gain,) = [w for w in wrapper.trainable_variables if w.shape == (size,) and "_g" in w.path]
    return gain


@pytest.mark.parametrize("nested", [False, True], ids=["one", "two-wrappers"])
def test_a_solver_map_of_the_wrapped_cell_computes_with_the_effective_kernel(nested):
    """SAM asks the cell for `prior_gradient`: a wrapped cell's is computed with the
    effective kernel `g w / ||w||` (numpy), as the unwrapped cell with that kernel
    computes it, and the two DEQs' SAM solves agree. Two weight normalizations in a row
    normalize twice: the effective kernel is the inner one's."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 4)).astype("float32")
    cell = KernelPriorCell()
    inner = WeightNormalization(cell)
    wrapped = WeightNormalization(inner) if nested else inner
    solver = keras_deq.solvers.SAM(gamma=0.5, max_iter=40, tol=1e-6)
    deq = keras_deq.DEQ(wrapped, solver=solver, state_shape=(4,))
    deq(x)
    w = rng.normal(size=(4, 4))
    g = rng.uniform(0.3, 0.6, size=4)
    cell.w.assign(w)
    _gain(inner, 4).assign(g)
    effective = numpy_weight_norm(g, w)

    maps = keras_deq.layers.deq_state.solver_maps(wrapped, solver)
    assert set(maps) == {"prior_gradient"}
    z = rng.normal(size=(3, 4)).astype("float32")
    np.testing.assert_allclose(
        ops.convert_to_numpy(maps["prior_gradient"](z)),
        z @ effective @ effective.T,
        rtol=1e-5,
        atol=1e-6,
    )
    reference = KernelPriorCell()
    plain = keras_deq.DEQ(reference, solver=solver, state_shape=(4,))
    plain(x)
    reference.w.assign(effective)
    np.testing.assert_allclose(
        ops.convert_to_numpy(deq(x)), ops.convert_to_numpy(plain(x)), rtol=1e-4, atol=1e-5
    )
