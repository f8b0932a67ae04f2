"""Ready-made cells `f(z, x)` for `keras_deq.DEQ`."""

import keras

from keras_deq.layers.cell import Cell
from keras_deq.solvers.common import check_bool, check_positive_int, get_keras_object


@keras.saving.register_keras_serializable(package="keras_deq")
class DenseCell(Cell):
    """The cell `z_next = activation(z W + x U + b)`.

    Args:
        units: Size of the state `z`.
        activation: Activation function (name or callable); `"tanh"` by default.
        use_injection: If True (default), multiply the injection `x` by a learned
            `U`; if False, add `x` as is (it must then have `units` features).
        kernel_initializer: Initializer of `W`; small by default so that the
            untrained cell is a contraction. None means that default.
        injection_initializer: Initializer of `U` (None: `"glorot_uniform"`).
        kernel_constraint: Optional Keras constraint on `W`.
        kernel_regularizer: Optional Keras regularizer on `W`.
        **kwargs: Base layer arguments.

    Example:

    ```python
    cell = keras_deq.layers.DenseCell(64)
    z_next = cell(z, x)  # z: (batch, 64), x: (batch, features)
    ```
    """

    def __init__(
        self,
        units,
        activation="tanh",
        use_injection=True,
        kernel_initializer=None,
        injection_initializer="glorot_uniform",
        kernel_constraint=None,
        kernel_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = check_positive_int("units", units)
        self.activation = keras.activations.get(activation)
        self.use_injection = check_bool("use_injection", use_injection)
        self.kernel_initializer = get_keras_object(
            "initializer",
            "kernel_initializer",
            kernel_initializer,
            default=keras.initializers.Orthogonal(gain=0.5),
        )
        self.injection_initializer = get_keras_object(
            "initializer", "injection_initializer", injection_initializer, default="glorot_uniform"
        )
        self.kernel_constraint = get_keras_object(
            "constraint", "kernel_constraint", kernel_constraint
        )
        self.kernel_regularizer = get_keras_object(
            "regularizer", "kernel_regularizer", kernel_regularizer
        )

    def build(self, z_shape, x_shape):
        if z_shape[-1] != self.units:
            raise ValueError(
                f"The state must have `units`={self.units} features. Received: z_shape={z_shape}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.units, self.units),
            initializer=self.kernel_initializer,
            constraint=self.kernel_constraint,
            regularizer=self.kernel_regularizer,
        )
        if self.use_injection:
            self.injection_kernel = self.add_weight(
                name="injection_kernel",
                shape=(x_shape[-1], self.units),
                initializer=self.injection_initializer,
            )
        elif x_shape[-1] != self.units:
            raise ValueError(
                "With use_injection=False the input must have `units` features. "
                f"Received: x_shape={x_shape}, units={self.units}"
            )
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")

    def call(self, z, x):
        injection = keras.ops.matmul(x, self.injection_kernel) if self.use_injection else x
        return self.activation(keras.ops.matmul(z, self.kernel) + injection + self.bias)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "activation": keras.activations.serialize(self.activation),
                "use_injection": self.use_injection,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "injection_initializer": keras.initializers.serialize(self.injection_initializer),
                "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            }
        )
        return config
