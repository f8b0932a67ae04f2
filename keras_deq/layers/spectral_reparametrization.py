"""`SpectralReparametrization`: every kernel of a layer or cell divided by its
spectral norm, differentiated through."""

import keras

from keras_deq.layers.reparametrization import KernelReparametrization
from keras_deq.solvers.common import check_positive_int


@keras.saving.register_keras_serializable(package="keras_deq")
class SpectralReparametrization(KernelReparametrization):
    """Spectral normalization (Miyato et al., 2018) of every kernel of a layer or cell.

    Each kernel `W`, reshaped to a matrix `(-1, outputs)`, is computed with as
    `W / sigma`, `sigma = v W u^T` its largest singular value estimated by
    `power_iterations` steps of power iteration from a stored vector `u`
    (non-trainable, one per kernel). The gradient goes through `W / sigma` with
    `u` and `v` held constant, as in PyTorch's `spectral_norm` and TorchDEQ's
    `apply_norm(cell, "spectral_norm")`. In training calls `u` is replaced by its
    iterate; inside a `DEQ` a cell's non-trainable state is held for the whole
    call (`keras_deq/layers/cell_state.py`), so every solver iteration and the
    backward pass see one map, and `u` advances once per training call.

    Unlike `keras.layers.SpectralNormalization`, which divides the layer's own
    kernel in place at each training call (a projection: no gradient through
    `sigma`, and the stored kernel changes), the free parameter `W` is left as is.

    Args:
        layer: The layer or cell to wrap, built or not.
        exclude: Strings; a kernel whose variable path contains one is left as it is.
        power_iterations: Power-iteration steps per call, >= 1.
        **kwargs: Base layer arguments.

    Example:

    ```python
    cell = keras_deq.SpectralReparametrization(keras_deq.DenseCell(64))
    layer = keras_deq.DEQ(cell)
    ```
    """

    def __init__(self, layer, exclude=(), power_iterations=1, **kwargs):
        self.power_iterations = check_positive_int("power_iterations", power_iterations)
        super().__init__(layer, exclude=exclude, **kwargs)

    def build_kernel(self, kernel):
        return self.add_weight(
            shape=(1, kernel.shape[-1]),
            initializer=keras.initializers.RandomNormal(),
            trainable=False,
            name=kernel.path.replace("/", "_") + "_u",
            dtype=kernel.dtype,
        )

    def _power_iteration(self, matrix, u):
        """`(u, v)` after `power_iterations` steps from `u`; constants for autodiff."""
        matrix = keras.ops.stop_gradient(matrix)
        for _ in range(self.power_iterations):
            v = keras.ops.normalize(keras.ops.matmul(u, keras.ops.transpose(matrix)), axis=None)
            u = keras.ops.normalize(keras.ops.matmul(v, matrix), axis=None)
        return u, v

    def effective_kernel(self, kernel, state, training):
        matrix = keras.ops.reshape(kernel, (-1, kernel.shape[-1]))
        u, v = self._power_iteration(matrix, state.value)
        if training:
            state.assign(u)
        sigma = keras.ops.matmul(keras.ops.matmul(v, matrix), keras.ops.transpose(u))
        return kernel / keras.ops.reshape(sigma, ())

    def get_config(self):
        return {**super().get_config(), "power_iterations": self.power_iterations}
