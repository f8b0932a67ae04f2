"""Weight constraints that bound Lipschitz constants: operator-norm caps and a |gamma| cap.

Keras applies a variable's `constraint` after every optimizer step
(`variable.assign(constraint(variable))`), so the caps hold for the weights the
next forward pass reads. Keras' own `MaxNorm`, `MinMaxNorm`, `NonNeg` and
`UnitNorm` cover norms of weight vectors; the constraints here cover what they
do not:

- `SpectralNorm`: the spectral norm `||W||_2` of a dense kernel, exactly (an SVD).
- `ConvSpectralNorm`: the operator norm of a stride-1 "same" convolution, through
  the upper bound `keras_deq.linalg.same_conv_norm_upper` (used by the OptEq units).
- `ConvOperatorNorm`: the operator norm of a convolution with any strides and
  padding, through the upper bound `keras_deq.linalg.conv_operator_norm_upper`
  (used by the Lipschitz multiscale DEQ).
- `MaxAbs`: an elementwise bound (normalization scales `gamma`).

Every norm cap rescales by an upper bound (never an estimate from below), so after
the rescale the operator norm is at most the cap (up to floating-point rounding).
The norms themselves are in `keras_deq.linalg`; `conv_operator_norm_upper`,
`conv_operator_norm_lower` and `conv_operator_norm` (the former name of the
estimate from below) stay importable from here.
"""

import keras
from keras import ops

from keras_deq.linalg import (
    PADDINGS,
    _check_input_shape,
    _check_padding,
    _check_spatial_shape,
    _pair,
    conv_operator_norm,
    conv_operator_norm_lower,
    conv_operator_norm_upper,
    dense_spectral_norm_exact,
    same_conv_norm_upper,
)
from keras_deq.solvers.common import check_positive_float, check_positive_int

__all__ = [
    "ConvOperatorNorm",
    "ConvSpectralNorm",
    "MaxAbs",
    "SpectralNorm",
    # Names of this module from before the norms moved to `keras_deq.linalg`.
    "PADDINGS",
    "conv_operator_norm",
    "conv_operator_norm_lower",
    "conv_operator_norm_upper",
]


def _rescale(w, norm, max_norm):
    """`w / max(1, norm / max_norm)`."""
    return w / ops.maximum(ops.ones((), w.dtype), ops.cast(norm, w.dtype) / max_norm)


@keras.saving.register_keras_serializable(package="keras_deq")
class SpectralNorm(keras.constraints.Constraint):
    """Caps the spectral norm `||W||_2` of a dense kernel at `max_norm`.

    After each optimizer step the kernel is replaced by
    `W / max(1, ||W||_2 / max_norm)`, with `||W||_2` the exact largest singular
    value (an SVD of the kernel). Kernels within the cap are left unchanged.

    An OptEq unit `z -> W^T sigma(W z + U x + b)` is the proximal operator of a
    convex function (and so firmly nonexpansive) when `||W||_2 <= 1` and `sigma`
    is monotone and 1-Lipschitz (Xie et al., TPAMI 2023, Theorem 1).

    Args:
        max_norm: The cap, > 0.

    Example:

    ```python
    layer = keras.layers.Dense(64, kernel_constraint=SpectralNorm(1.0))
    ```
    """

    def __init__(self, max_norm=1.0):
        self.max_norm = check_positive_float("max_norm", max_norm, finite=False)

    def __call__(self, w):
        w = ops.convert_to_tensor(w)
        return _rescale(w, dense_spectral_norm_exact(w), self.max_norm)

    def get_config(self):
        return {"max_norm": self.max_norm}


@keras.saving.register_keras_serializable(package="keras_deq")
class ConvSpectralNorm(keras.constraints.Constraint):
    """Caps the operator norm of a stride-1 "same" 2-D convolution at `max_norm`.

    After each optimizer step the kernel is replaced by
    `W / max(1, bound / max_norm)`, where `bound = same_conv_norm_upper(W,
    spatial_shape)` (`keras_deq.linalg`) is the exact norm of the circular
    convolution on a grid `k - 1` larger than the input (Sedghi, Gupta and
    Long, ICLR 2019), an upper bound on the zero-padded conv's norm. The conv's
    Lipschitz constant on `spatial_shape` inputs is then at most `max_norm`.
    The cost is one FFT of the kernel and one small SVD per frequency,
    independent of the batch. `ConvOperatorNorm` caps the same kind of bound
    for any strides and padding.

    Args:
        max_norm: The cap, > 0.
        spatial_shape: `(H, W)`, the input size the convolution sees.

    Example:

    ```python
    conv = keras.layers.Conv2D(
        16, 3, padding="same", kernel_constraint=ConvSpectralNorm(1.0, (8, 8))
    )
    ```
    """

    def __init__(self, max_norm=1.0, spatial_shape=(32, 32)):
        self.max_norm = check_positive_float("max_norm", max_norm, finite=False)
        self.spatial_shape = _check_spatial_shape(spatial_shape)

    def __call__(self, w):
        w = ops.convert_to_tensor(w)
        return _rescale(w, same_conv_norm_upper(w, self.spatial_shape), self.max_norm)

    def get_config(self):
        return {"max_norm": self.max_norm, "spatial_shape": list(self.spatial_shape)}


@keras.saving.register_keras_serializable(package="keras_deq")
class ConvOperatorNorm(keras.constraints.Constraint):
    """Caps the operator norm of a 2D convolution kernel at `max_norm`.

    After each optimizer step the kernel `W` is replaced by
    `W / max(1, bound / max_norm)`, where `bound` is the certified upper bound
    `conv_operator_norm_upper` (`keras_deq.linalg`) of the conv's operator norm
    on inputs of size `input_shape`, padding and strides included. The conv's
    true Lipschitz constant is then at most `max_norm` (up to floating-point
    rounding), a little below it where the bound is not tight (see
    `conv_operator_norm_upper`). Unlike capping the norm of the reshaped kernel
    (as spectral normalization of dense layers does), this bounds the conv's
    true Lipschitz constant.

    Args:
        max_norm: The cap, > 0.
        input_shape: `(H, W)` or `(H, W, C_in)`, the input size the conv sees.
        strides: The conv's strides, an int or a pair.
        padding: `"same"` or `"valid"`, the conv's padding.
        iterations: Unused (the bound needs no iterations); kept so that
            existing code and saved configs load. Must be a positive int.

    Example:

    ```python
    conv = keras.layers.Conv2D(
        8, 3, padding="same",
        kernel_constraint=ConvOperatorNorm(2.0, input_shape=(8, 8)),
    )
    ```
    """

    def __init__(self, max_norm, input_shape, strides=1, padding="same", iterations=20):
        self.max_norm = check_positive_float("max_norm", max_norm, finite=False)
        self.input_shape = _check_input_shape(input_shape)
        self.strides = _pair("strides", strides)
        self.padding = _check_padding(padding)
        self.iterations = check_positive_int("iterations", iterations)

    def norm(self, kernel):
        """The upper bound of `kernel`'s operator norm that is capped (a scalar tensor)."""
        return conv_operator_norm_upper(kernel, self.input_shape, self.strides, self.padding)

    def __call__(self, w):
        w = ops.convert_to_tensor(w)
        return _rescale(w, self.norm(w), self.max_norm)

    def get_config(self):
        return {
            "max_norm": self.max_norm,
            "input_shape": self.input_shape,
            "strides": self.strides,
            "padding": self.padding,
            "iterations": self.iterations,
        }


@keras.saving.register_keras_serializable(package="keras_deq")
class MaxAbs(keras.constraints.Constraint):
    """Clips every entry of a weight to `[-max_value, max_value]`.

    Used on normalization scales `gamma`: the map `x -> gamma * x` (per channel)
    then has Lipschitz constant `max|gamma| <= max_value`. Keras' `MaxNorm`
    bounds the L2 norm of the whole vector instead, which is stricter.

    Args:
        max_value: The bound, > 0.

    Example:

    ```python
    norm = keras.layers.GroupNormalization(4, gamma_constraint=MaxAbs(1.0))
    ```
    """

    def __init__(self, max_value=1.0):
        self.max_value = check_positive_float("max_value", max_value, finite=False)

    def __call__(self, w):
        w = ops.convert_to_tensor(w)
        return ops.clip(w, -self.max_value, self.max_value)

    def get_config(self):
        return {"max_value": self.max_value}
