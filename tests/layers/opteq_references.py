"""OptEq units in plain numpy and small helpers, shared by the OptEq layer tests (not tests)."""

import keras
import numpy as np
from keras import ops

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
    import jax  # noqa: PLC0415

    return jax.grad(fn)(x)


def iterate(fn, z0, steps):
    """`steps` applications of `fn` from `z0`, compiled (plain iteration, no prior)."""
    return np.asarray(compiled(lambda z: sam_iteration(fn, z, steps))(ops.convert_to_tensor(z0)))
