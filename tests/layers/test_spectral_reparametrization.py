"""`SpectralReparametrization`: the effective kernel is `W / (v W u^T)` with `u`, `v` from
numpy's power iteration, its spectral norm tends to 1 (numpy SVD), its gradient (`u`,
`v` held constant) matches float64 finite differences, and inside a `DEQ` one training
call solves one map and advances `u` once."""

import keras
import numpy as np
from feature_references import finite_difference_gradient, layer_gradients
from keras import ops

import keras_deq
from keras_deq import SpectralReparametrization


def numpy_power_iteration(matrix, u, steps):
    for _ in range(steps):
        v = u @ matrix.T
        v = v / np.linalg.norm(v)
        u = v @ matrix
        u = u / np.linalg.norm(u)
    return u, v


def numpy_spectral(kernel, u, steps):
    matrix = kernel.reshape(-1, kernel.shape[-1])
    u, v = numpy_power_iteration(matrix, u, steps)
    return kernel / (v @ matrix @ u.T).item(), u


def stored_u(layer):
    (u,) = layer.non_trainable_variables
    return u


def test_effective_kernel_and_u_update_match_numpy_and_tend_to_unit_spectral_norm():
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype("float32")
    layer = SpectralReparametrization(keras.layers.Conv2D(4, 3), power_iterations=2)
    layer(x)
    kernel = np.random.default_rng(3).normal(size=(3, 3, 3, 4))  # spectral norm about 8
    layer.layer.kernel.assign(kernel)
    u0 = ops.convert_to_numpy(stored_u(layer)).astype("float64")
    want, u1 = numpy_spectral(kernel, u0, 2)
    np.testing.assert_allclose(ops.convert_to_numpy(layer.effective_kernels()[0]), want, rtol=1e-4)
    layer(x)  # inference: `u` stays
    np.testing.assert_allclose(ops.convert_to_numpy(stored_u(layer)), u0, rtol=1e-6)
    layer(x, training=True)
    np.testing.assert_allclose(ops.convert_to_numpy(stored_u(layer)), u1, rtol=1e-4, atol=1e-6)
    for _ in range(30):
        layer(x, training=True)
    effective = ops.convert_to_numpy(layer.effective_kernels()[0]).reshape(-1, 4)
    np.testing.assert_allclose(np.linalg.svd(effective, compute_uv=False)[0], 1.0, rtol=1e-4)
    assert np.linalg.svd(kernel.reshape(-1, 4), compute_uv=False)[0] > 2.0  # not already 1


def test_gradient_matches_float64_finite_differences_with_u_and_v_held():
    rng = np.random.default_rng(1)
    x, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    layer = SpectralReparametrization(keras.layers.Dense(2, activation="tanh", use_bias=False))
    layer(x.astype("float32"))
    w0 = rng.normal(size=(3, 2))
    layer.layer.kernel.assign(w0)
    u0 = ops.convert_to_numpy(stored_u(layer)).astype("float64")
    u, v = numpy_power_iteration(w0, u0, 1)

    def numpy_loss(w):
        return np.sum(np.tanh(x @ (w / (v @ w @ u.T).item())) * t)

    target = ops.convert_to_tensor(t.astype("float32"))
    _, grad = layer_gradients(
        layer, x.astype("float32"), lambda out: ops.sum(out * target), [layer.layer.kernel]
    )
    np.testing.assert_allclose(
        np.asarray(grad), finite_difference_gradient(numpy_loss, w0), atol=1e-4
    )


def test_in_a_deq_one_training_call_solves_one_map_and_advances_u_once():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4)).astype("float32")
    cell = SpectralReparametrization(keras_deq.DenseCell(4, use_injection=False), exclude=["inj"])
    deq = keras_deq.DEQ(cell, state_shape=(4,), max_iter=80, tol=1e-6)
    deq.build(x.shape)
    kernel = ops.convert_to_numpy(cell.layer.kernel).astype("float64")
    kernel = kernel * 3.0  # spectral norm 1.5: the unnormalized map would not contract
    cell.layer.kernel.assign(kernel)
    bias = ops.convert_to_numpy(cell.layer.bias)
    u0 = ops.convert_to_numpy(stored_u(cell)).astype("float64")
    w, u1 = numpy_spectral(kernel, u0, 1)
    z = np.zeros_like(x, dtype="float64")
    for _ in range(300):
        z = np.tanh(z @ w + x + bias)
    # The normalized map's Lipschitz constant is close to 1, so a residual of tol leaves an
    # error up to tol / (1 - L): 3.5e-5 was seen on JAX in float32.
    np.testing.assert_allclose(ops.convert_to_numpy(deq(x, training=True)), z, atol=2e-4)
    assert deq.solver_statistics()["converged"] == 1.0
    np.testing.assert_allclose(ops.convert_to_numpy(stored_u(cell)), u1, rtol=1e-4, atol=1e-6)
