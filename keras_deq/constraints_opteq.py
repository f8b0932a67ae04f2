"""Operator-norm caps for OptEq units: `SpectralNorm` (dense) and `ConvSpectralNorm` (conv).

An OptEq unit `z -> W^T sigma(W z + U x + b)` is the proximal operator of a
convex function (and so firmly nonexpansive) when `||W||_2 <= 1` and `sigma` is
monotone and 1-Lipschitz (Xie et al., TPAMI 2023, Theorem 1). Keras applies a
variable's `constraint` after every optimizer step, so these constraints keep
`||W||_2 <= max_norm` for every forward pass.

Both caps are upper bounds, never estimates from below: after the rescale the
operator norm is at most `max_norm` (up to floating-point rounding).

- `SpectralNorm`: the exact largest singular value of a dense kernel (an SVD).
- `ConvSpectralNorm`: the exact norm of the *circular* convolution on a
  `(H + k - 1, W + k - 1)` grid, computed from the 2-D DFT of the kernel
  (Sedghi, Gupta and Long, ICLR 2019). The zero-padded "same" convolution on
  `H x W` inputs is that circular convolution restricted to a sub-grid, so its
  norm is at most this value. `keras_deq.constraints.ConvOperatorNorm` caps the
  same kind of bound (`conv_operator_norm_upper`, any strides and padding); the
  two belong together in `keras_deq.constraints` (to be merged).
"""

import numbers

import keras
import tensorflow as tf

from keras_deq.solvers.common import check_positive_float


def _check_spatial_shape(spatial_shape):
    shape = tuple(spatial_shape) if isinstance(spatial_shape, (tuple, list)) else ()
    if len(shape) != 2 or any(
        isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in shape
    ):
        raise ValueError(
            "`spatial_shape` must be (height, width), two positive ints. "
            f"Received: spatial_shape={spatial_shape!r}"
        )
    return tuple(int(d) for d in shape)


def _rescale(w, norm, max_norm):
    """`w / max(1, norm / max_norm)`."""
    return w / tf.maximum(tf.constant(1.0, w.dtype), tf.cast(norm, w.dtype) / max_norm)


def dense_spectral_norm(kernel):
    """The largest singular value of a 2-D kernel.

    Args:
        kernel: A `(in_features, out_features)` tensor.

    Returns:
        A scalar tensor in the kernel's dtype.

    Example:

    >>> import tensorflow as tf
    >>> round(float(dense_spectral_norm(tf.constant([[3.0, 0.0], [0.0, 1.0]]))), 4)
    3.0
    """
    kernel = tf.convert_to_tensor(kernel)
    if kernel.shape.rank != 2:
        raise ValueError(
            f"The kernel must be a matrix (in, out). Received: kernel.shape={kernel.shape}"
        )
    return tf.linalg.svd(kernel, compute_uv=False)[0]


def circular_conv_norm(kernel, grid_shape, strides=1):
    """The exact operator norm of a circular 2-D convolution on a `grid_shape` grid.

    The circular convolution is block-diagonalized by the 2-D DFT: its singular
    values are those of the `(C_in, C_out)` matrices `K_hat(w)`, one per
    frequency `w` of the grid. The norm is their largest singular value, the
    square root of the largest eigenvalue of the smaller Gram matrix. With
    strides `(s1, s2)` (keeping every `s`-th output pixel) the `s1 * s2`
    frequencies `w + a * N / s` that alias to one frequency of the kept grid
    share a block: the norm is the largest singular value of the
    `(s1 s2 C_in, C_out)` stack of their `K_hat`, divided by `sqrt(s1 s2)`.

    Args:
        kernel: A `(kh, kw, C_in, C_out)` tensor (Keras `Conv2D` layout), with
            `kh <= grid_shape[0]` and `kw <= grid_shape[1]`.
        grid_shape: `(N1, N2)`, the grid of the circular convolution.
        strides: An int or a pair `(s1, s2)` dividing `(N1, N2)`.

    Returns:
        A scalar tensor in the kernel's (real) dtype.

    Example:

    >>> import tensorflow as tf
    >>> kernel = tf.ones((1, 1, 1, 1)) * 3.0
    >>> round(float(circular_conv_norm(kernel, (4, 4))), 4)
    3.0
    """
    kernel = tf.convert_to_tensor(kernel)
    kh, kw, c_in, c_out = kernel.shape
    n1, n2 = _check_spatial_shape(grid_shape)
    if kh > n1 or kw > n2:
        raise ValueError(
            f"The grid must be at least as large as the kernel. Received: grid_shape={grid_shape}, "
            f"kernel.shape={kernel.shape}"
        )
    s1, s2 = (strides, strides) if isinstance(strides, numbers.Integral) else tuple(strides)
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in (s1, s2)):
        raise ValueError(f"`strides` must be positive ints. Received: strides={strides!r}")
    if n1 % s1 or n2 % s2:
        raise ValueError(
            f"The strides must divide the grid. Received: grid_shape={grid_shape}, "
            f"strides={strides!r}"
        )
    per_channel = tf.transpose(kernel, (2, 3, 0, 1))  # (C_in, C_out, kh, kw)
    padded = tf.pad(per_channel, [[0, 0], [0, 0], [0, n1 - kh], [0, n2 - kw]])
    if s1 == s2 == 1:
        # A real kernel's spectrum is conjugate-symmetric: half the frequencies suffice.
        spectrum = tf.signal.rfft2d(padded)  # (C_in, C_out, N1, N2 // 2 + 1)
        matrices = tf.transpose(spectrum, (2, 3, 0, 1))  # (N1, N2 // 2 + 1, C_in, C_out)
    else:
        m1, m2 = n1 // s1, n2 // s2
        spectrum = tf.signal.fft2d(tf.complex(padded, tf.zeros_like(padded)))
        spectrum = tf.reshape(spectrum, (c_in, c_out, s1, m1, s2, m2))
        matrices = tf.reshape(  # (M1, M2, s1 s2 C_in, C_out): the aliases stacked
            tf.transpose(spectrum, (3, 5, 2, 4, 0, 1)), (m1, m2, s1 * s2 * c_in, c_out)
        )
        # The stack at -w is the conjugate of the one at w, up to the order of the aliases.
        matrices = matrices[:, : m2 // 2 + 1]
    small_side_first = matrices.shape[-2] <= matrices.shape[-1]
    gram = tf.matmul(matrices, matrices, adjoint_a=not small_side_first, adjoint_b=small_side_first)
    largest = tf.reduce_max(tf.math.real(tf.linalg.eigvalsh(gram))) / (s1 * s2)
    return tf.sqrt(tf.maximum(largest, tf.zeros_like(largest)))


def same_conv_norm_bound(kernel, spatial_shape):
    """An upper bound on the norm of the stride-1 "same" convolution on `spatial_shape`.

    Zero padding by `(k - 1) / 2` on each side is the circular convolution on a
    grid `k - 1` larger, restricted to the input's sub-grid, so the circular
    norm on that grid bounds it.

    Args:
        kernel: A `(kh, kw, C_in, C_out)` tensor with odd `kh`, `kw`.
        spatial_shape: `(H, W)` of the inputs.

    Returns:
        A scalar tensor: `circular_conv_norm(kernel, (H + kh - 1, W + kw - 1))`.
    """
    h, w = _check_spatial_shape(spatial_shape)
    kernel = tf.convert_to_tensor(kernel)
    return circular_conv_norm(kernel, (h + kernel.shape[0] - 1, w + kernel.shape[1] - 1))


@keras.saving.register_keras_serializable(package="keras_deq")
class SpectralNorm(keras.constraints.Constraint):
    """Caps the spectral norm `||W||_2` of a dense kernel at `max_norm`.

    After each optimizer step the kernel is replaced by
    `W / max(1, ||W||_2 / max_norm)`, with `||W||_2` the exact largest singular
    value (an SVD of the kernel). Kernels within the cap are left unchanged.

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
        w = tf.convert_to_tensor(w)
        return _rescale(w, dense_spectral_norm(w), self.max_norm)

    def get_config(self):
        return {"max_norm": self.max_norm}


@keras.saving.register_keras_serializable(package="keras_deq")
class ConvSpectralNorm(keras.constraints.Constraint):
    """Caps the operator norm of a stride-1 "same" 2-D convolution at `max_norm`.

    After each optimizer step the kernel is replaced by
    `W / max(1, bound / max_norm)`, where `bound = same_conv_norm_bound(W,
    spatial_shape)` is the exact norm of the circular convolution on a grid
    `k - 1` larger than the input, an upper bound on the zero-padded conv's
    norm. The conv's Lipschitz constant on `spatial_shape` inputs is then at
    most `max_norm`. The cost is one FFT of the kernel and one small SVD per
    frequency, independent of the batch.

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
        w = tf.convert_to_tensor(w)
        return _rescale(w, same_conv_norm_bound(w, self.spatial_shape), self.max_norm)

    def get_config(self):
        return {"max_norm": self.max_norm, "spatial_shape": list(self.spatial_shape)}
