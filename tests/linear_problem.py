"""A linear DEQ with a dense float64 answer, shared by the per-backend tests (not tests).

`z* = z* W + x U + b` (row vectors, `linear_layer`) with `||W||_2 = 0.6`: its gradients by dense solves
are the independent reference of the implicit (and unrolled) gradient on each backend.
"""

import numpy as np

import keras_deq

B, F, N = 4, 3, 5


def linear_problem(seed=0):
    """`(W, U, b, x, t)`, float32: the cell's weights, an input and a probe `t` for the
    loss `sum(z* t)`."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(N, N))
    w = (0.6 * w / np.linalg.norm(w, 2)).astype("float32")
    u = rng.normal(size=(F, N)).astype("float32")
    b = rng.normal(size=(N,)).astype("float32")
    x = rng.normal(size=(B, F)).astype("float32")
    t = rng.normal(size=(B, N)).astype("float32")
    return w, u, b, x, t


def dense_gradients(w, u, b, x, t):
    """`d sum(z* t) / d(W, U, b, x)` by dense float64 solves: `u = g + u W^T`."""
    w64, u64, b64, x64, t64 = (a.astype("float64") for a in (w, u, b, x, t))
    z = (x64 @ u64 + b64) @ np.linalg.inv(np.eye(N) - w64)
    adjoint = t64 @ np.linalg.inv(np.eye(N) - w64.T)
    return [z.T @ adjoint, x64.T @ adjoint, adjoint.sum(0), adjoint @ u64.T]


def linear_layer(solver, backward, w, u, b):
    """A built `DEQ` of a linear `DenseCell` holding `(W, U, b)`, solved to 1e-7."""
    cell = keras_deq.DenseCell(N, activation="linear")
    layer = keras_deq.DEQ(
        cell, state_shape=(N,), solver=solver, backward=backward, tol=1e-7, max_iter=300
    )
    layer.build((None, F))
    for variable, value in zip(cell.trainable_variables, (w, u, b), strict=True):
        variable.assign(value)
    return layer
