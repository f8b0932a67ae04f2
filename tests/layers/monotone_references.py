"""NumPy references for the monotone operator DEQ tests, written without the package.

Column-vector convention, as in the paper: `z = relu(W z + U^T x + b)` for one sample,
with `U` the Keras `(features, units)` injection kernel.
"""

import numpy as np


def weight_matrix(a, b, m):
    """`W = (1 - m) I - A^T A + B - B^T`."""
    return (1.0 - m) * np.eye(a.shape[0]) - a.T @ a + b - b.T


def scaled(matrix, norm):
    """`matrix` scaled to spectral norm `norm`."""
    return matrix * (norm / np.linalg.norm(matrix, 2))


def random_weights(rng, n, norm):
    """`A` and `B`, Gaussian, each of spectral norm `norm`."""
    return scaled(rng.normal(size=(n, n)), norm), scaled(rng.normal(size=(n, n)), norm)


def equilibrium(w, u, steps=4000, alpha=None):
    """The `z` with `z = relu(W z + u)` for each row of `u` `(batch, n)`: Peaceman-Rachford
    in float64 (`steps` iterations, step `alpha`, by default `1 / ||I - W||_2`)."""
    n = w.shape[0]
    k = np.eye(n) - w
    alpha = 1.0 / np.linalg.norm(k, 2) if alpha is None else alpha
    resolvent = np.linalg.inv(np.eye(n) + alpha * k)
    v = np.zeros_like(u)
    for _ in range(steps):
        reflected = 2.0 * np.maximum(v, 0.0) - v
        v = 2.0 * (reflected + alpha * u) @ resolvent.T - reflected
    return np.maximum(v, 0.0)


def equation_residual(w, u, z):
    """The largest entry of `|z - relu(W z + u)|`."""
    return float(np.max(np.abs(z - np.maximum(z @ w.T + u, 0.0))))


def exact_gradients(w, a, u_kernel, bias, x, z, g):
    """The gradient of `sum(g * z*)` by dense solves of the implicit function theorem.

    With `D` the active units of a sample (`W z + u > 0`), `dz = (I - D W)^{-1} D (dW z +
    dU^T x + db)`, so with `v = D (I - D W)^{-T} g`: `dW = sum v z^T`, `db = sum v`,
    `dU = sum x v^T`, `dx = U v`, and through `W(A, B)`: `dA = -A (G + G^T)`,
    `dB = G - G^T`. Returns `{"x", "a", "b", "injection", "bias"}`.
    """
    n = w.shape[0]
    u = x @ u_kernel + bias
    grad_w = np.zeros_like(w)
    out = {"x": np.zeros_like(x), "injection": np.zeros_like(u_kernel), "bias": np.zeros(n)}
    for i in range(x.shape[0]):
        d = np.diag((z[i] @ w.T + u[i] > 0).astype(float))
        v = d @ np.linalg.solve((np.eye(n) - d @ w).T, g[i])
        grad_w += np.outer(v, z[i])
        out["bias"] += v
        out["injection"] += np.outer(x[i], v)
        out["x"][i] = u_kernel @ v
    out["a"] = -a @ (grad_w + grad_w.T)
    out["b"] = grad_w - grad_w.T
    return out
