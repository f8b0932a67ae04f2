"""Plain-numpy references of the feature functions, finite differences, and the
backend's own autodiff (not tests).

Shared by the tests of `keras_deq.features`, `keras_deq.regularizers`, the OptEq priors
and `keras_deq.jacobian`; `layer_gradients` by the layer tests too. `gradient` and
`layer_gradients` are the backend-specific references here: the backend's autodiff
(`tf.GradientTape`, `jax.grad`), independent of `keras_deq`.
"""

import keras
import numpy as np
import pytest
from keras import ops

# Parameters for tests that hold in both precisions, with a tolerance per dtype: the
# float64 case (skipped where the backend has no float64, see tests/conftest.py) keeps
# the tight tolerance; the float32 case runs on every backend.
FLOAT_DTYPES = (pytest.param("float64", marks=pytest.mark.float64), "float32")


def float64_param(*values):
    """A parametrization case that needs float64 (see `tests/conftest.py`)."""
    return pytest.param(*values, marks=pytest.mark.float64)


def gradient(fn, *args):
    """The gradients of the scalar `fn(*args)` with respect to each tensor in `args`
    (a tuple of tensors), by the backend's autodiff; usable inside compiled functions."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        with tf.GradientTape() as tape:
            tape.watch(args)
            value = fn(*args)
        return tuple(tape.gradient(value, args))
    if keras.backend.backend() == "torch":
        import torch  # noqa: PLC0415

        args = tuple(a.detach().requires_grad_(True) for a in args)
        with torch.enable_grad():
            value = fn(*args)
        return tuple(torch.autograd.grad(value, args, allow_unused=True, materialize_grads=True))
    import jax  # noqa: PLC0415

    return tuple(jax.grad(fn, argnums=tuple(range(len(args))))(*args))


def layer_gradients(layer, x, loss_fn, variables, with_losses=False):
    """The gradients of `loss_fn(layer(x, training=True))` with respect to `x` (a tensor
    or a nest of them; its gradient has the same structure) and to `variables` (some of
    `layer`'s trainable variables), compiled, as a list. With `with_losses`, the loss is
    `loss_fn(outputs, losses)`, `losses` the layer's own (`layer.losses`) of that call."""
    x = keras.tree.map_structure(ops.convert_to_tensor, x)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        @tf.function
        def gradients(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = layer(x, training=True)
                loss = loss_fn(out, layer.losses) if with_losses else loss_fn(out)
            return tape.gradient(loss, [x, *variables])

        return gradients(x)
    if keras.backend.backend() == "torch":
        return _torch_layer_gradients(layer, x, loss_fn, variables, with_losses)
    import jax  # noqa: PLC0415

    trainable = layer.trainable_variables
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(x, values):
        out, _, losses = layer.stateless_call(
            values, non_trainable, x, training=True, return_losses=True
        )
        return loss_fn(out, losses) if with_losses else loss_fn(out)

    grad_x, grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, [v.value for v in trainable])
    by_id = {id(v): g for v, g in zip(trainable, grads, strict=True)}
    return [grad_x, *(by_id[id(v)] for v in variables)]


def _torch_layer_gradients(layer, x, loss_fn, variables, with_losses):
    """`layer_gradients` by `torch.autograd` (eager)."""
    import torch  # noqa: PLC0415

    x = keras.tree.map_structure(lambda t: t.detach().requires_grad_(True), x)
    with torch.enable_grad():
        out = layer(x, training=True)
        loss = loss_fn(out, layer.losses) if with_losses else loss_fn(out)
    x_flat = keras.tree.flatten(x)
    sources = [*x_flat, *(v.value for v in variables)]
    grads = torch.autograd.grad(loss, sources, allow_unused=True, materialize_grads=True)
    grad_x = keras.tree.pack_sequence_as(x, list(grads[: len(x_flat)]))
    return [grad_x, *grads[len(x_flat) :]]


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
