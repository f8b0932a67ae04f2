"""OptEq units in plain numpy and small helpers, shared by the OptEq layer tests (not tests)."""

import numpy as np
import tensorflow as tf

from keras_deq.layers.opteq_sam import sam_iteration
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


def iterate(fn, z0, steps):
    """`steps` applications of `fn` from `z0`, compiled (plain iteration, no prior)."""
    return tf.function(lambda z: sam_iteration(fn, z, steps))(tf.constant(z0)).numpy()
