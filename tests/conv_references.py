"""Convolutions as explicit matrices, the references of the operator-norm tests (not tests).

Plain numpy (float64), independent of every Keras backend: `conv2d` is a strided,
zero-padded cross-correlation with Keras' "same"/"valid" conventions (checked against
`keras.ops.conv` by the tests); `conv_matrix` applies it to every basis image (any
strides and padding); `operator_matrix` is built from `correlate` ("same" size, zero or
wrap-around padding). `compiled` is the backend's compiler, for tests that run the norms
inside compiled functions.
"""

import keras
import numpy as np

# Kernels, input sizes, strides and paddings of the bound tests: the multiscale cell's
# convs (3x3 "same", stride 1 or 2, 1x1) down to 1x1 inputs, and odd cases (even kernels,
# whose "same" padding is asymmetric; strides that do not divide the input; "valid").
BOUND_CASES = [
    ((3, 3, 8, 8), (8, 8), 1, "same"),
    ((3, 3, 8, 8), (8, 8), 2, "same"),
    ((3, 3, 4, 8), (4, 4), 2, "same"),
    ((3, 3, 4, 4), (2, 2), 1, "same"),
    ((3, 3, 4, 4), (2, 2), 2, "same"),
    ((3, 3, 4, 4), (1, 1), 1, "same"),
    ((1, 1, 3, 5), (4, 4), 1, "same"),
    ((3, 3, 2, 3), (7, 5), (2, 3), "same"),
    ((2, 2, 3, 2), (5, 6), 1, "same"),
    ((4, 4, 2, 2), (6, 6), 2, "same"),
    ((5, 5, 2, 2), (3, 3), 1, "same"),
    ((3, 3, 2, 4), (6, 5), 1, "valid"),
    ((3, 3, 2, 2), (7, 7), 2, "valid"),
]


def random_kernel(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape)


def conv2d(images, kernel, strides=1, padding="SAME"):
    """Cross-correlation of `(n, H, W, C_in)` images with a `(kh, kw, C_in, C_out)` kernel.

    "SAME": `ceil(H / s)` outputs, padded by `max((out - 1) s + k - H, 0)` in all, the
    smaller half first (TensorFlow's and Keras' convention); "VALID": no padding.
    """
    strides = (strides, strides) if np.isscalar(strides) else tuple(strides)
    kh, kw = kernel.shape[:2]
    pads, outs = [], []
    for size, k, s in zip(images.shape[1:3], (kh, kw), strides, strict=True):
        if padding.upper() == "SAME":
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        else:
            out = (size - k) // s + 1
            pads.append((0, 0))
        outs.append(out)
    padded = np.pad(images, [(0, 0), *pads, (0, 0)])
    result = np.zeros((images.shape[0], *outs, kernel.shape[3]))
    for a in range(kh):
        for b in range(kw):
            window = padded[
                :,
                a : a + strides[0] * (outs[0] - 1) + 1 : strides[0],
                b : b + strides[1] * (outs[1] - 1) + 1 : strides[1],
            ]
            result += window @ kernel[a, b]
    return result


def conv_matrix(kernel, input_shape, strides=1, padding="SAME"):
    """The conv as an explicit `(outputs, inputs)` matrix: the conv of every basis image."""
    height, width = input_shape
    n = height * width * kernel.shape[2]
    basis = np.eye(n).reshape(n, height, width, kernel.shape[2])
    return conv2d(basis, np.asarray(kernel, "float64"), strides, padding).reshape(n, -1).T


def exact_norm(kernel, input_shape, strides=1, padding="SAME"):
    """The conv's operator norm: the largest singular value of `conv_matrix`."""
    return np.linalg.svd(conv_matrix(kernel, input_shape, strides, padding), compute_uv=False)[0]


def correlate(image, kernel, circular=False):
    """Cross-correlation of a (H, W, C_in) image, "same" size, in plain numpy."""
    kh, kw, _, c_out = kernel.shape
    ph, pw = kh // 2, kw // 2
    mode = "wrap" if circular else "constant"
    padded = np.pad(image, ((ph, ph), (pw, pw), (0, 0)), mode=mode)
    h, w = image.shape[:2]
    out = np.zeros((h, w, c_out))
    for i in range(h):
        for j in range(w):
            out[i, j] = np.einsum("abc,abcd->d", padded[i : i + kh, j : j + kw], kernel)
    return out


def operator_matrix(kernel, shape, circular=False):
    """`correlate` on `shape` inputs as an explicit `(outputs, inputs)` matrix."""
    c_in = kernel.shape[2]
    basis = np.eye(shape[0] * shape[1] * c_in)
    columns = [correlate(e.reshape(*shape, c_in), kernel, circular).ravel() for e in basis]
    return np.stack(columns, axis=1)


def compiled(fn, xla=False):
    """`fn` compiled by the backend: `tf.function` (with XLA if `xla`) or `jax.jit`."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        return tf.function(fn, jit_compile=xla)
    if keras.backend.backend() == "torch":
        return fn  # eager: Keras' torch backend compiles nothing by default
    import jax  # noqa: PLC0415

    return jax.jit(fn)
