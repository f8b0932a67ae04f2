"""OptEq units in plain numpy and small helpers, shared by the OptEq layer tests (not tests).

The references share no code with the library's loops: `iterate` is a bare
`keras.ops.fori_loop`, and `numpy_unrolled` (Algorithm 1's `K` plain or SAM
iterations) with `numpy_gradient` (its central finite differences) are plain numpy.
"""

import keras
import numpy as np
from keras import ops

from keras_deq.layers.opteq_units import OptEqDenseUnit


def relu(v):
    return np.maximum(v, 0.0)


def numpy_unit(z, x, kernel, injection_kernel, bias, alpha=1.0, activation=relu):
    """`alpha W^T sigma(W z + U x + b) + (1 - alpha) z` with row vectors (W = kernel^T)."""
    full = activation(z @ kernel + x @ injection_kernel + bias) @ kernel.T
    return alpha * full + (1.0 - alpha) * z


def dense_unit(m, n, alpha=1.0, weights=None, dtype="float64", **kwargs):
    """A built `OptEqDenseUnit` on (batch, m) states and inputs, weights optionally set."""
    unit = OptEqDenseUnit(n, alpha=alpha, dtype=dtype, **kwargs)
    unit.build((None, m), (None, m))
    if weights is not None:
        unit.kernel.assign(weights[0])
        unit.injection_kernel.assign(weights[1])
        unit.bias.assign(weights[2])
    return unit


def random_weights(rng, m, n, norm):
    kernel = rng.normal(size=(m, n))
    return kernel * norm / np.linalg.norm(kernel, 2), rng.normal(size=(m, n)), rng.normal(size=n)


def compiled(fn):
    """`fn` compiled by the backend (`tf.function`, `jax.jit`), or as is elsewhere."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        return tf.function(fn)
    if keras.backend.backend() == "jax":
        import jax  # noqa: PLC0415

        return jax.jit(fn)
    return fn


def gradient(fn, x):
    """The gradient of the scalar `fn` at the tensor `x`, by the backend's autodiff."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        with tf.GradientTape() as tape:
            tape.watch(x)
            value = fn(x)
        return tape.gradient(value, x)
    if keras.backend.backend() == "torch":
        from feature_references import gradient as backend_gradient  # noqa: PLC0415

        return backend_gradient(fn, x)[0]
    import jax  # noqa: PLC0415

    return jax.grad(fn)(x)


def iterate(fn, z0, steps):
    """`steps` applications of `fn` from `z0`: a bare `keras.ops.fori_loop`, compiled."""
    loop = compiled(lambda z: ops.fori_loop(0, steps, lambda i, v: fn(v), z))
    return np.asarray(loop(ops.convert_to_tensor(z0)))


def numpy_map(x, units, alpha, prior_step=None):
    """`T(z) = f_L o ... o f_1 (T_R(z), x)` of a dense `OptEqCell` in numpy.

    Args:
        x: The input, `(batch, m)`.
        units: `(kernel, injection_kernel, bias)` of each unit, in order.
        alpha: The relaxation of every unit.
        prior_step: The structural prior's `T_R` (numpy), or None.
    """

    def t(z):
        if prior_step is not None:
            z = prior_step(z)
        for kernel, injection_kernel, bias in units:
            z = numpy_unit(z, x, kernel, injection_kernel, bias, alpha=alpha)
        return z

    return t


def numpy_unrolled(t, z0, steps, grad_r=None, rho=0.5, c=0.2, gamma=0.1):
    """Algorithm 1's `K = steps` iterations from `z0`: `z_k = T(z_{k-1})`, or with `grad_r`
    SAM's Eq. 11, `z_k = beta_k ((1 - gamma beta_k) z - gamma grad R(z)) + (1 - beta_k) T(z)`,
    `beta_k = rho / k^c`. Returns `z_K`."""
    z = np.asarray(z0, np.float64)
    for k in range(1, steps + 1):
        if grad_r is None:
            z = t(z)
        else:
            beta = rho / k**c
            z = beta * ((1 - gamma * beta) * z - gamma * grad_r(z)) + (1 - beta) * t(z)
    return z


def numpy_gradient(loss, arrays, eps=1e-6):
    """Central finite differences of the scalar `loss(*arrays)` (float64 numpy) with respect
    to every entry of every array, concatenated in order."""
    arrays = [np.array(a, np.float64) for a in arrays]
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        for index in np.ndindex(a.shape):
            saved = a[index]
            a[index] = saved + eps
            up = loss(*arrays)
            a[index] = saved - eps
            down = loss(*arrays)
            a[index] = saved
            g[index] = (up - down) / (2 * eps)
        grads.append(g.ravel())
    return np.concatenate(grads)
