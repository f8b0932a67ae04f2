"""Plain-numpy references of the feature functions, and finite differences (not tests).

Shared by the tests of `keras_deq.features`, `keras_deq.regularizers` and the OptEq priors.
"""

import numpy as np


def numpy_decorrelation(z):
    """`1/2 ||D Z Z^T D - I||_F^2` with `Z` = features x samples, straight from Eq. 13."""
    zt = z.reshape(-1, z.shape[-1]).T
    d = np.diag(1.0 / np.linalg.norm(zt, axis=1))
    return 0.5 * np.sum((d @ zt @ zt.T @ d - np.eye(zt.shape[0])) ** 2)


def numpy_hsic_sum(z, sigma):
    """`sum_{i<j} tr(K_i H K_j H) / (B - 1)^2` with explicit loops (Section 7.2.1);
    a 4-D `z` counts every position as a sample."""
    z = z.reshape(-1, z.shape[-1])
    b = z.shape[0]
    h = np.eye(b) - np.ones((b, b)) / b
    kernels = [np.exp(-((f[:, None] - f[None, :]) ** 2) / (2 * sigma**2)) for f in z.T]
    total = 0.0
    for i in range(len(kernels)):
        for j in range(i + 1, len(kernels)):
            total += np.trace(kernels[i] @ h @ kernels[j] @ h) / (b - 1) ** 2
    return total


def finite_difference_gradient(fn, z, eps=1e-6):
    grad = np.zeros_like(z)
    for index in np.ndindex(z.shape):
        up, down = z.copy(), z.copy()
        up[index] += eps
        down[index] -= eps
        grad[index] = (fn(up) - fn(down)) / (2 * eps)
    return grad
