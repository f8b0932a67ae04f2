"""`WeightNormalization`: every kernel of a layer or cell as `g v / ||v||`."""

import keras

from keras_deq.layers.reparametrization import KernelReparametrization


@keras.saving.register_keras_serializable(package="keras_deq")
class WeightNormalization(KernelReparametrization):
    """Weight normalization (Salimans & Kingma, 2016) of every kernel of a layer or cell.

    Each kernel `v` (Keras layout: its last axis indexes the outputs) is computed
    with as `w = g * v / ||v||`, the norm taken per output over every other axis,
    with a trainable scale `g` per output initialized to `||v||`: at initialization
    the wrapped layer computes exactly what it computed unwrapped. The gradient
    reaches `g` and `v` through the normalization. This is TorchDEQ's
    `apply_norm(cell, "weight_norm")` as a Keras wrapper (see
    `KernelReparametrization`).

    Args:
        layer: The layer or cell to wrap, built or not (e.g. `keras_deq.DenseCell`,
            `keras.layers.Conv2D`, or a cell of your own).
        exclude: Strings; a kernel whose variable path contains one is left as it is
            (e.g. `["injection"]` for `DenseCell`'s injection kernel).
        epsilon: Added to `||v||` before dividing.
        **kwargs: Base layer arguments.

    Example:

    ```python
    cell = keras_deq.WeightNormalization(keras_deq.DenseCell(64))
    layer = keras_deq.DEQ(cell)
    ```
    """

    def __init__(self, layer, exclude=(), epsilon=1e-12, **kwargs):
        if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or epsilon < 0:
            raise ValueError(
                f"`epsilon` must be a non-negative number. Received: epsilon={epsilon!r}"
            )
        self.epsilon = float(epsilon)
        super().__init__(layer, exclude=exclude, **kwargs)

    def _norm(self, v):
        axes = tuple(range(len(v.shape) - 1))
        return keras.ops.sqrt(keras.ops.sum(keras.ops.square(v), axis=axes))

    def build_kernel(self, kernel):
        return self.add_weight(
            shape=(kernel.shape[-1],),
            initializer=lambda shape, dtype: keras.ops.cast(self._norm(kernel.value), dtype),
            name=kernel.path.replace("/", "_") + "_g",
            dtype=kernel.dtype,
        )

    def effective_kernel(self, kernel, state, training):
        return state * kernel / (self._norm(kernel) + self.epsilon)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
