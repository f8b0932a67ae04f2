"""The OptEq units `alpha W^T sigma(W z + U x + b) + (1 - alpha) z`, dense and conv.

With `sigma` monotone and 1-Lipschitz (ReLU) and `||W||_2 <= 1` the unit (at
`alpha = 1`) is the proximal operator of a convex function `phi`, so it is firmly
nonexpansive and its fixed points are the minimizers of `phi` (Xie et al., TPAMI
2023, Theorem 1); its alpha-relaxed form has the same fixed points. The cap on
`||W||_2` is a weight constraint of `keras_deq.constraints` (`SpectralNorm` for
`OptEqDenseUnit`, `ConvSpectralNorm` for `OptEqConvUnit`). `OptEqCell` composes them.
"""

import math

import keras
from keras import ops

from keras_deq.constraints import ConvSpectralNorm, SpectralNorm
from keras_deq.layers._opteq_checks import check_alpha, check_max_norm
from keras_deq.linalg import dense_spectral_norm_exact, same_conv_norm_upper
from keras_deq.solvers.common import check_bool, check_positive_int, get_keras_object

# Grid used for the conv operator-norm cap when the input's spatial size is unknown.
DEFAULT_SPATIAL_SHAPE = (64, 64)


class _OptEqUnit(keras.layers.Layer):
    """Shared logic of the dense and conv units: alpha, injection and transition."""

    def __init__(
        self,
        units,
        alpha=1.0,
        learnable_alpha=False,
        activation="relu",
        max_norm=1.0,
        kernel_initializer=None,
        injection_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = check_positive_int("units", units)
        self.learnable_alpha = check_bool("learnable_alpha", learnable_alpha)
        self.alpha = check_alpha(alpha, self.learnable_alpha)
        self.activation = keras.activations.get(activation)
        self.max_norm = check_max_norm(max_norm)
        self.kernel_initializer = get_keras_object(
            "initializer",
            "kernel_initializer",
            kernel_initializer,
            default=self._default_kernel_initializer(),
        )
        self.injection_initializer = get_keras_object(
            "initializer", "injection_initializer", injection_initializer, default="glorot_uniform"
        )

    def _default_kernel_initializer(self):
        raise NotImplementedError

    def _add_alpha(self):
        if self.learnable_alpha:
            logit = math.log(self.alpha / (1.0 - self.alpha))
            self.alpha_logit = self.add_weight(
                name="alpha_logit", shape=(), initializer=keras.initializers.Constant(logit)
            )

    def _cap_initial_kernel(self):
        """Applies the operator-norm cap to the initial kernel too."""
        if self.kernel.constraint is not None:
            self.kernel.assign(self.kernel.constraint(self.kernel))

    def alpha_value(self, dtype=None):
        """The relaxation `alpha` (a tensor in (0, 1) when learnable, else a float)."""
        if not self.learnable_alpha:
            return self.alpha
        alpha = ops.sigmoid(ops.convert_to_tensor(self.alpha_logit))
        return ops.cast(alpha, dtype) if dtype is not None else alpha

    def injection(self, x):
        """`U x + b`: the part of the pre-activation that does not depend on `z`."""
        return self._inject(x) + self.bias

    def transition(self, z, injection):
        """`alpha W^T sigma(W z + injection) + (1 - alpha) z`."""
        full = self._adjoint(self.activation(self._apply(z) + injection), z)
        if not self.learnable_alpha and self.alpha == 1.0:
            return full
        alpha = self.alpha_value(z.dtype)
        return alpha * full + (1.0 - alpha) * z

    def call(self, z, x):
        return self.transition(z, self.injection(x))

    def compute_output_shape(self, z_shape, x_shape):
        return z_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "alpha": self.alpha,
                "learnable_alpha": self.learnable_alpha,
                "activation": keras.activations.serialize(self.activation),
                "max_norm": self.max_norm,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "injection_initializer": keras.initializers.serialize(self.injection_initializer),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_deq")
class OptEqDenseUnit(_OptEqUnit):
    """The dense OptEq unit `alpha W^T sigma(W z + U x + b) + (1 - alpha) z`.

    `W` maps the state (`m` features) to `units` (`n`) hidden features and `W^T`
    maps back, so the output has the state's shape. `||W||_2 <= max_norm` is
    kept by the `SpectralNorm` constraint (also applied to the initial
    kernel); with ReLU and `max_norm <= 1` the unit is firmly nonexpansive.

    Args:
        units: `n`, the width of `W z`.
        alpha: The relaxation in (0, 1]; 1 gives the plain unit.
        learnable_alpha: Learn `alpha = sigmoid(a)`, started at `alpha`
            (then in (0, 1)).
        activation: Monotone 1-Lipschitz activation (ReLU by default).
        max_norm: Cap on `||W||_2`; None for no cap.
        kernel_initializer: Initializer of `W`; small by default
            (orthogonal, gain 0.5): the paper stresses near-zero starts.
        injection_initializer: Initializer of `U`.
        **kwargs: Base layer arguments.

    Example:

    ```python
    unit = OptEqDenseUnit(128, alpha=0.8)
    z_next = unit(z, x)  # z: (batch, m), x: (batch, d)
    ```
    """

    def _default_kernel_initializer(self):
        return keras.initializers.Orthogonal(gain=0.5)

    def build(self, z_shape, x_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(z_shape[-1], self.units),
            initializer=self.kernel_initializer,
            constraint=SpectralNorm(self.max_norm) if self.max_norm else None,
        )
        self.injection_kernel = self.add_weight(
            name="injection_kernel",
            shape=(x_shape[-1], self.units),
            initializer=self.injection_initializer,
        )
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
        self._add_alpha()
        self._cap_initial_kernel()

    def _apply(self, z):
        return keras.ops.matmul(z, self.kernel)

    def _adjoint(self, h, z):
        return keras.ops.matmul(h, keras.ops.transpose(self.kernel))

    def _inject(self, x):
        return keras.ops.matmul(x, self.injection_kernel)

    def operator_norm(self):
        """`||W||_2` of the current kernel (exact)."""
        return dense_spectral_norm_exact(self.kernel)


@keras.saving.register_keras_serializable(package="keras_deq")
class OptEqConvUnit(_OptEqUnit):
    """The convolutional OptEq unit: `W` a stride-1 "same" convolution.

    `W z` is a `kernel_size` x `kernel_size` convolution from the state's `m`
    channels to `units` (`n`) channels, and `W^T` its exact adjoint, the
    transposed convolution with the same kernel, back to `m` channels. `U x` is
    a convolution of the same size from the injection's channels. The operator
    norm of `W` on the state's spatial size is capped at `max_norm` by
    `ConvSpectralNorm` (an upper bound, so the cap holds exactly).

    Args:
        units: `n`, the channels of `W z`.
        kernel_size: Odd kernel size (3 in the paper).
        **kwargs: `alpha`, `learnable_alpha`, `activation`, `max_norm` and
            `injection_initializer` as for `OptEqDenseUnit`; `kernel_initializer`,
            the initializer of `W`, small by default (variance scaling 0.1,
            fan-in); and the base layer arguments.

    Example:

    ```python
    unit = OptEqConvUnit(32, alpha=0.8)
    z_next = unit(z, x)  # z: (batch, H, W, m), x: (batch, H, W, d)
    ```
    """

    def __init__(self, units, kernel_size=3, **kwargs):
        super().__init__(units, **kwargs)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(
                f"`kernel_size` must be odd (same padding). Received: kernel_size={kernel_size!r}"
            )

    def _default_kernel_initializer(self):
        return keras.initializers.VarianceScaling(0.1, "fan_in", "truncated_normal")

    def build(self, z_shape, x_shape):
        if len(z_shape) != 4 or len(x_shape) != 4:
            raise ValueError(
                "OptEqConvUnit needs (batch, height, width, channels) inputs. "
                f"Received: z_shape={z_shape}, x_shape={x_shape}"
            )
        k = self.kernel_size
        spatial = tuple(z_shape[1:3])
        if any(d is None for d in spatial):
            spatial = DEFAULT_SPATIAL_SHAPE
        self.spatial_shape = spatial
        self.kernel = self.add_weight(
            name="kernel",
            shape=(k, k, z_shape[-1], self.units),
            initializer=self.kernel_initializer,
            constraint=ConvSpectralNorm(self.max_norm, spatial) if self.max_norm else None,
        )
        self.injection_kernel = self.add_weight(
            name="injection_kernel",
            shape=(k, k, x_shape[-1], self.units),
            initializer=self.injection_initializer,
        )
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
        self._add_alpha()
        self._cap_initial_kernel()

    def _apply(self, z):
        return ops.conv(z, self.kernel, 1, "same", data_format="channels_last")

    def _adjoint(self, h, z):
        # The transposed conv with the same (k, k, m, n) kernel maps n channels back to m;
        # stride 1 and "same" padding keep the spatial size of `z`.
        return ops.conv_transpose(h, self.kernel, 1, "same", data_format="channels_last")

    def _inject(self, x):
        return ops.conv(x, self.injection_kernel, 1, "same", data_format="channels_last")

    def operator_norm(self):
        """An upper bound on the conv's operator norm on `spatial_shape` inputs."""
        return same_conv_norm_upper(ops.convert_to_tensor(self.kernel), self.spatial_shape)

    def get_config(self):
        config = super().get_config()
        config["kernel_size"] = self.kernel_size
        return config
