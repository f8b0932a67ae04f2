"""The implicit gradient with a GMRES adjoint (`keras_deq.solvers.GMRES`), against a dense
linear solve and float64 finite differences, on both backends.

Row-vector convention of `DenseCell`: `z_next = act(z W + x U + b)`; the adjoint of a
loss gradient `g` solves `u = u W^T + g` for a linear cell.
"""

import keras
import numpy as np
import pytest
from feature_references import FLOAT_DTYPES, gradient, layer_gradients
from keras import ops

import keras_deq
from keras_deq import backward, solvers

UNITS, FEATURES, BATCH = 5, 3, 4
TOL = {"float64": 1e-12, "float32": 1e-6}
# Largest error of a gradient relative to its largest entry.
ERROR = {"float64": 1e-9, "float32": 1e-4}


def matrix_with_spectral_radius(n, radius, seed):
    m = np.random.default_rng(seed).normal(size=(n, n))
    return radius * m / np.max(np.abs(np.linalg.eigvals(m)))


def linear_deq(kernel, dtype, **kwargs):
    """A DEQ around a linear DenseCell with `kernel` as its recurrent weight."""
    cell = keras_deq.DenseCell(UNITS, activation="linear", dtype=dtype)
    # jit_compile=False: no XLA compilation of the solves apart (seconds on a test's scale).
    settings = {"tol": TOL[dtype], "max_iter": 100, "on_failure": "ignore", "jit_compile": False}
    settings.update(kwargs)
    layer = keras_deq.DEQ(cell, state_shape=(UNITS,), dtype=dtype, **settings)
    layer.build((None, FEATURES))
    rng = np.random.default_rng(1)
    cell.kernel.assign(kernel)
    cell.injection_kernel.assign(rng.normal(size=(FEATURES, UNITS)))
    cell.bias.assign(rng.normal(size=(UNITS,)))
    return layer


def data(dtype, seed=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, FEATURES))
    t = rng.normal(size=(BATCH, UNITS))
    return x, t


def gradients(layer, x, t):
    """d/d(x, W, U, b) of `sum(z* t)`."""
    t_tensor = ops.convert_to_tensor(t, layer.dtype)
    loss = lambda out: ops.sum(out * t_tensor)  # noqa: E731
    cell = layer.cell
    variables = [cell.kernel, cell.injection_kernel, cell.bias]
    got = layer_gradients(layer, ops.convert_to_tensor(x, layer.dtype), loss, variables)
    return [np.asarray(g, np.float64) for g in got]


def dense_gradients(layer, x, t):
    """The same gradients from numpy's dense solves (float64): z* (I - W) = x U + b, and
    the adjoint u (I - W^T) = t."""
    w, u_inj, b = (np.asarray(v.numpy(), np.float64) for v in layer.cell.trainable_weights)
    eye = np.eye(UNITS)
    z = np.linalg.solve((eye - w).T, (x @ u_inj + b).T).T
    u = np.linalg.solve(eye - w, t.T).T
    return [u @ u_inj.T, z.T @ u, x.T @ u, u.sum(axis=0)]


def assert_close(got, want, dtype):
    for g, w in zip(got, want, strict=True):
        assert np.max(np.abs(g - w)) / np.max(np.abs(w)) < ERROR[dtype]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gradient_matches_a_dense_solve(dtype):
    kernel = matrix_with_spectral_radius(UNITS, 0.8, seed=3)
    x, t = data(dtype)
    layer = linear_deq(kernel, dtype, backward_solver="gmres")
    assert isinstance(layer._adjoint, solvers.GMRES)
    assert_close(gradients(layer, x, t), dense_gradients(layer, x, t), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gradient_where_a_fixed_point_adjoint_diverges(dtype):
    # Spectral radius 1.3: the adjoint u = u W^T + g diverges under fixed-point
    # iteration, and GMRES (given as an object here) solves it. The forward solve,
    # linear too, is Broyden's, which converges on such a map.
    kernel = matrix_with_spectral_radius(UNITS, 1.3, seed=4)
    x, t = data(dtype, seed=5)
    adjoint = backward.Implicit(solver=solvers.GMRES(tol=TOL[dtype]))
    layer = linear_deq(kernel, dtype, solver="broyden", backward=adjoint)
    want = dense_gradients(layer, x, t)
    z = np.asarray(layer(ops.convert_to_tensor(x, dtype)), np.float64)
    w, u_inj, b = (np.asarray(v.numpy(), np.float64) for v in layer.cell.trainable_weights)
    np.testing.assert_allclose(z, z @ w + x @ u_inj + b, atol=100 * TOL[dtype])
    assert_close(gradients(layer, x, t), want, dtype)
    picard = linear_deq(kernel, dtype, solver="broyden", backward_solver="fixed_point")
    got = gradients(picard, x, t)
    errors = [np.max(np.abs(g - w)) / np.max(np.abs(w)) for g, w in zip(got, want, strict=True)]
    assert not max(errors) < 0.1  # far off, or NaN


@pytest.mark.float64
def test_gradient_of_a_tanh_cell_matches_finite_differences():
    cell = keras_deq.DenseCell(UNITS, dtype="float64")
    layer = keras_deq.DEQ(
        cell,
        state_shape=(UNITS,),
        dtype="float64",
        tol=1e-13,
        max_iter=200,
        backward_solver="gmres",
        backward_solver_options={"restart": 3},  # restarted cycles, too
        jit_compile=False,
    )
    layer.build((None, FEATURES))
    cell.kernel.assign(matrix_with_spectral_radius(UNITS, 0.9, seed=7))
    x, t = data("float64", seed=8)
    got = gradients(layer, x, t)[0]

    def loss(x_value):
        return float(np.sum(np.asarray(layer(ops.convert_to_tensor(x_value))) * t))

    h = 1e-6
    for index in [(0, 0), (1, 2), (3, 1)]:
        e = np.zeros_like(x)
        e[index] = h
        fd = (loss(x + e) - loss(x - e)) / (2 * h)
        assert abs(fd - got[index]) <= 1e-7 * max(1.0, abs(fd)), index


def test_equilibrium_takes_a_gmres_adjoint():
    # The backward objects without a layer: `Implicit()` on an `Equilibrium` whose
    # `adjoint` is a GMRES object; the gradient of x against the dense solve.
    kernel = matrix_with_spectral_radius(UNITS, 1.2, seed=9).astype("float32")
    u_inj = np.random.default_rng(10).normal(size=(FEATURES, UNITS)).astype("float32")
    x, t = (a.astype("float32") for a in data("float32", seed=11))
    w_t, u_t = ops.convert_to_tensor(kernel), ops.convert_to_tensor(u_inj)
    captured = []

    def loss(x_value):
        def fn(z, x_):
            return ops.matmul(z, w_t) + ops.matmul(x_, u_t)

        problem = backward.Equilibrium(
            fn,
            x_value,
            ops.zeros((BATCH, UNITS)),
            forward=solvers.Broyden(max_iter=60, tol=1e-6),
            adjoint=solvers.GMRES(tol=1e-6),
            on_backward=lambda result: captured.append(result.steps) and None,
            stateless_fn=lambda z, x_, weights: fn(z, x_),
        )
        z, _ = backward.Implicit()(problem)
        return ops.sum(z * ops.convert_to_tensor(t))

    (gx,) = gradient(loss, ops.convert_to_tensor(x))
    u = np.linalg.solve(np.eye(UNITS) - kernel.astype(np.float64), t.T.astype(np.float64)).T
    want = u @ u_inj.T
    assert np.max(np.abs(np.asarray(gx) - want)) / np.max(np.abs(want)) < 1e-4
    assert captured  # the adjoint result reached `on_backward`


@pytest.mark.float64
def test_per_position_gradient_of_a_causal_transformer_matches_autodiff():
    # `solver_batch_dims=2`, the language model's: the positions are coupled by
    # attention, and GMRES runs one Krylov process per sequence with a tolerance per
    # position (`keras_deq.solvers.common.per_entry(joint=True)`). The reference is
    # autodiff through 80 unrolled fixed-point iterations (a contraction).
    from keras_deq.layers.transformer import DEQTransformerCell  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = ops.convert_to_tensor(rng.normal(size=(2, 5, 8)), "float64")
    w = ops.convert_to_tensor(rng.normal(size=(2, 5, 8)), "float64")

    def layer(**kwargs):
        keras.utils.set_random_seed(3)
        cell = DEQTransformerCell(
            2,
            ff_dim=12,
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.3),
            dtype="float64",
        )
        deq = keras_deq.DEQ(cell, on_failure="ignore", dtype="float64", **kwargs)
        deq.build(x.shape)
        return deq

    gmres = layer(
        solver="anderson",
        max_iter=100,
        tol=1e-13,
        solver_batch_dims=2,
        backward=backward.Implicit(solver=solvers.GMRES(max_iter=100, tol=1e-13)),
        jit_compile=False,
    )
    unrolled = layer(solver="fixed_point", max_iter=80, tol=1e-300, backward="unrolled")
    unrolled.cell.set_weights(gmres.cell.get_weights())

    def grads(deq):
        loss = lambda out: ops.sum(ops.sin(out) * w)  # noqa: E731
        return layer_gradients(deq, x, loss, deq.cell.trainable_variables)

    got, want = grads(gmres), grads(unrolled)
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-8 * (1.0 + np.abs(b).max())
    assert np.abs(np.asarray(got[0])).max() > 1e-3
