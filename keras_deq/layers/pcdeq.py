"""Positive concave DEQs (pcDEQ): a unique fixed point without any norm bound.

The cell is `z <- sigma(W z + x~)` with `W >= 0` elementwise, `sigma` concave and
nonnegative on the nonnegative orthant, and a positive injection `x~`. Such a map
is a standard interference mapping from nonlinear Perron-Frobenius theory: it has
a unique fixed point and plain fixed-point iteration converges to it geometrically
from any nonnegative start, however large `||W||` is.
"""

import numbers

import keras
import numpy as np

from keras_deq.layers.cell import Cell
from keras_deq.layers.deq import DEQ
from keras_deq.layers.deq_arguments import is_fixed_point
from keras_deq.solvers.common import check_bool, check_positive_float

# Activations allowed with each variant: pcDEQ-1 needs sigma(0) = 0 concave and
# nonnegative on R+ with a strictly positive injection; pcDEQ-2 needs sigma
# positive and concave on R+ with a nonnegative injection.
VARIANT_ACTIVATIONS = {1: ("tanh", "softsign", "relu6"), 2: ("sigmoid",)}


def injection_floor(dtype):
    """The smallest pcDEQ-1 injection kept in `dtype`.

    `softplus_beta(h)` underflows to 0 for very negative `h` (below about -17.5 in
    float32 with beta 5), and then `z = 0` is an exact fixed point of the computed map.
    The floor is the dtype's smallest normal number, raised to `sqrt` of float32's
    (1.1e-19) so that the solvers' float32 norms of the state do not underflow either.
    """
    dtype = np.dtype(keras.backend.standardize_dtype(dtype))
    norm_dtype = np.float64 if dtype == np.float64 else np.float32
    return max(float(np.finfo(dtype).tiny), float(np.sqrt(np.finfo(norm_dtype).tiny)))


def positive_injection(h, variant, beta=5.0):
    """The pcDEQ injection: `softplus_beta(h) > 0` (variant 1) or `relu(h) >= 0` (2).

    Variant 1's injection is at least `injection_floor(h.dtype)`, so that it stays
    strictly positive (the uniqueness theorem needs it) where softplus underflows.
    """
    if variant == 1:
        soft = keras.ops.softplus(beta * h) / beta
        return keras.ops.maximum(soft, injection_floor(h.dtype))
    return keras.ops.relu(h)


@keras.saving.register_keras_serializable(package="keras_deq")
class PositiveConcaveCell(Cell):
    """The cell `sigma(W z + x)` with a nonnegative `W`, dense or convolutional.

    `x` must already be the positive injection (see `PcDEQ`, which computes it).
    `W` is kept elementwise nonnegative by `keras.constraints.NonNeg`, applied by
    the optimizer after every update.

    Args:
        activation: A concave activation, nonnegative on R+ (see `PcDEQ`).
        kernel_size: None for the dense form (`W` is `(n, n)`); an int for the
            convolutional form (`W` is a `kernel_size` x `kernel_size` convolution,
            same padding, no bias, from and to the state's channels).
        init_scale: Entries of `W` start uniform in
            `[0, sqrt(init_scale) / sqrt(fan_in + fan_out))`, tiny and positive.
        weight_norm: If True, `W = g * v / ||v||` per output unit (or filter) with
            `g, v >= 0`, as in the paper's code; adds one gain per unit.
        **kwargs: Base layer arguments.

    Example:

    ```python
    cell = keras_deq.layers.PositiveConcaveCell("tanh")
    z_next = cell(z, x_pos)  # z, x_pos: (batch, n), x_pos > 0
    ```
    """

    def __init__(
        self, activation="tanh", kernel_size=None, init_scale=1e-4, weight_norm=False, **kwargs
    ):
        super().__init__(**kwargs)
        self.activation_name = activation
        self.activation = keras.activations.get(activation)
        self.kernel_size = kernel_size
        self.init_scale = init_scale
        self.weight_norm = check_bool("weight_norm", weight_norm)

    def build(self, z_shape, x_shape):
        channels = z_shape[-1]
        if self.kernel_size is None:
            shape = (channels, channels)
        else:
            shape = (self.kernel_size, self.kernel_size, channels, channels)
        limit = (self.init_scale**0.5) / ((2 * channels) ** 0.5)
        self.kernel = self.add_weight(
            name="kernel",
            shape=shape,
            initializer=keras.initializers.RandomUniform(0.0, limit),
            constraint=keras.constraints.NonNeg(),
        )
        if self.weight_norm:
            self.gain = self.add_weight(
                name="gain",
                shape=(channels,),
                initializer="ones",
                constraint=keras.constraints.NonNeg(),
            )
            # As in PyTorch's weight_norm: the gain starts at the norm of the initial
            # kernel, so the effective kernel starts equal to it.
            self.gain.assign(self._column_norms())

    def _column_norms(self):
        axes = tuple(range(len(self.kernel.shape) - 1))
        return keras.ops.sqrt(keras.ops.sum(keras.ops.square(self.kernel), axis=axes) + 1e-12)

    def effective_kernel(self):
        """`W`, with the weight normalization applied when it is on."""
        if not self.weight_norm:
            return self.kernel
        return self.kernel * (self.gain / self._column_norms())

    def call(self, z, x):
        kernel = self.effective_kernel()
        if self.kernel_size is None:
            linear = keras.ops.matmul(z, kernel)
        else:
            linear = keras.ops.conv(z, kernel, padding="same")
        return self.activation(linear + x)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "activation": self.activation_name,
                "kernel_size": self.kernel_size,
                "init_scale": self.init_scale,
                "weight_norm": self.weight_norm,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_deq")
class PcDEQ(DEQ):
    """A positive concave DEQ layer (Gabor, Piotrowski, Cavalcante, ICML 2024).

    Returns the unique fixed point of `z = sigma(W z + x~)`, where the layer input
    `h` (e.g. the output of a Dense or Conv layer and a BatchNormalization) is made
    positive inside the layer: `x~ = softplus_5(h)` for `variant=1` and
    `x~ = relu(h)` for `variant=2`, so a zero injection (which would break
    uniqueness) cannot be fed by mistake. `W >= 0` is kept by a Keras constraint.

    The state has the input's shape: `(batch, units)` for the dense form,
    `(batch, H, W, filters)` for the convolutional one.

    Args:
        units: Width of the dense form (the input's last dimension).
        filters: Channels of the convolutional form (the input's last dimension).
        kernel_size: Kernel size of the convolutional form.
        variant: 1 (activation in tanh, softsign, relu6; softplus injection) or 2
            (sigmoid; relu injection).
        activation: Defaults to `"tanh"` for variant 1 and `"sigmoid"` for 2.
        softplus_beta: Sharpness `beta` of the variant-1 softplus.
        weight_norm: Weight-normalize `W` as the paper's code does (see
            `PositiveConcaveCell`).
        solver: `"fixed_point"` (the default; `solver_options={"damping": t}` with
            `0 < t <= 1` is allowed). The guarantee covers plain (or damped)
            iteration from a nonnegative start, whose iterates stay in the
            nonnegative orthant, where the fixed point is unique; Anderson and
            Broyden leave the orthant and can land on another fixed point, so they
            are refused. The adjoint solve (`backward_solver`) is linear and may
            use any solver.
        max_iter: As for `keras_deq.DEQ`; 200 as in the paper.
        tol: As for `keras_deq.DEQ`; 1e-4 as in the paper.
        **kwargs: Other `keras_deq.DEQ` arguments (backward mode, Jacobian
            regularizer, ...) and base layer arguments.

    Example:

    ```python
    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(80),
        keras.layers.BatchNormalization(),
        keras_deq.PcDEQ(units=80, variant=1),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(10),
    ])
    ```
    """

    def __init__(
        self,
        units=None,
        filters=None,
        kernel_size=3,
        variant=1,
        activation=None,
        softplus_beta=5.0,
        weight_norm=False,
        solver="fixed_point",
        max_iter=200,
        tol=1e-4,
        **kwargs,
    ):
        kwargs.pop("cell", None)
        if not is_fixed_point(solver):
            raise ValueError(
                "PcDEQ's unique fixed point is guaranteed for fixed-point iteration from a "
                "nonnegative start, whose iterates stay in the nonnegative orthant; Anderson "
                "and Broyden can leave it and converge to another fixed point. Use "
                "solver='fixed_point' (optionally solver_options={'damping': t}). "
                f"Received: solver={solver!r}"
            )
        if (units is None) == (filters is None):
            raise ValueError(
                "Pass exactly one of `units` (dense form) or `filters` (convolutional form). "
                f"Received: units={units!r}, filters={filters!r}"
            )
        width = units if units is not None else filters
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
            name = "units" if units is not None else "filters"
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={width!r}")
        units = None if units is None else int(units)
        filters = None if filters is None else int(filters)
        if (
            isinstance(variant, bool)
            or not isinstance(variant, numbers.Integral)
            or variant not in VARIANT_ACTIVATIONS
        ):
            raise ValueError(f"`variant` must be 1 or 2. Received: variant={variant!r}")
        variant = int(variant)
        if activation is None:
            activation = VARIANT_ACTIVATIONS[variant][0]
        if not isinstance(activation, str) or activation not in VARIANT_ACTIVATIONS[variant]:
            raise ValueError(
                f"pcDEQ-{variant} needs `activation` in {VARIANT_ACTIVATIONS[variant]} "
                f"(concave, nonnegative on R+{', sigma(0) = 0' if variant == 1 else ', positive'}) "
                f"or None. Received: activation={activation!r}"
            )
        if (
            isinstance(kernel_size, bool)
            or not isinstance(kernel_size, numbers.Integral)
            or kernel_size < 1
        ):
            raise ValueError(
                f"`kernel_size` must be a positive integer. Received: kernel_size={kernel_size!r}"
            )
        kernel_size = int(kernel_size)
        softplus_beta = check_positive_float("softplus_beta", softplus_beta)
        weight_norm = check_bool("weight_norm", weight_norm)
        self.units, self.filters, self.variant = units, filters, variant
        self.activation, self.softplus_beta = activation, softplus_beta
        self.weight_norm = weight_norm
        cell = PositiveConcaveCell(
            activation,
            kernel_size=None if units is not None else kernel_size,
            weight_norm=self.weight_norm,
            dtype=kwargs.get("dtype"),
        )
        self.pc_kernel_size = kernel_size
        super().__init__(cell, solver=solver, max_iter=max_iter, tol=tol, **kwargs)

    def build(self, input_shape):
        width = self.units if self.units is not None else self.filters
        expected_rank = 2 if self.units is not None else 4
        if len(input_shape) != expected_rank or input_shape[-1] != width:
            form = "(batch, units)" if self.units is not None else "(batch, H, W, filters)"
            raise ValueError(
                f"PcDEQ expects inputs of shape {form} with last dimension {width}. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        super().build(input_shape)

    def call(self, inputs, initial_state=None, training=None):
        """Solves for the unique nonnegative fixed point.

        Args:
            inputs: The pre-injection `h`, made positive inside the layer.
            initial_state: Optional starting state; it is projected onto the
                nonnegative orthant (`max(z0, 0)`): from a negative start the
                iteration can reach another fixed point (e.g. `z = -1` with tanh).
            training: Passed to the cell.

        Returns:
            The fixed point, elementwise nonnegative.
        """
        injection = positive_injection(inputs, self.variant, self.softplus_beta)
        if initial_state is not None:
            initial_state = keras.ops.relu(initial_state)
        return super().call(injection, initial_state=initial_state, training=training)

    def get_config(self):
        config = super().get_config()
        config.pop("cell")
        config.pop("state_shape")
        config.update(
            {
                "units": self.units,
                "filters": self.filters,
                "kernel_size": self.pc_kernel_size,
                "variant": self.variant,
                "activation": self.activation,
                "softplus_beta": self.softplus_beta,
                "weight_norm": self.weight_norm,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
