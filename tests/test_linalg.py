"""Operator norms (`keras_deq.linalg`) against explicitly built matrices.

Each name says what it returns, and each is checked for it: `*_exact` equals the
matrix norm, `*_upper` is never below it, `*_lower` never above it.
"""

import keras
import numpy as np
import pytest
from conv_references import (
    BOUND_CASES,
    compiled,
    conv2d,
    correlate,
    exact_norm,
    operator_matrix,
    random_kernel,
)
from feature_references import FLOAT_DTYPES
from keras import ops

from keras_deq import constraints, constraints_opteq, linalg

BACKEND = keras.backend.backend()


def tensor(value, dtype="float64"):
    return ops.convert_to_tensor(value, dtype)


def dtype_of(t):
    return keras.backend.standardize_dtype(t.dtype)


def circular_strided_matrix(kernel, grid, strides):
    """Circular correlation on `grid` (wrap-around padding), then every `s`-th pixel."""
    n1, n2 = grid
    n = n1 * n2 * kernel.shape[2]
    basis = np.eye(n).reshape(n, n1, n2, kernel.shape[2])
    wrapped = np.pad(
        basis, [(0, 0), (0, kernel.shape[0] - 1), (0, kernel.shape[1] - 1), (0, 0)], "wrap"
    )
    out = conv2d(wrapped, kernel, 1, "VALID")
    return out[:, :: strides[0], :: strides[1]].reshape(n, -1).T


# ------------------------------------------------------------------ dense
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dense_spectral_norm_is_the_largest_singular_value(dtype):
    w = np.random.default_rng(0).normal(size=(7, 4)).astype(dtype)
    norm = linalg.dense_spectral_norm_exact(tensor(w, dtype))
    assert float(norm) == pytest.approx(np.linalg.norm(w.astype("float64"), 2))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (9, 5), (5, 9), (64, 64), (200, 200)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_dense_upper_bound_is_above_the_norm_within_the_rank_factor(dtype, shape, scale):
    rng = np.random.default_rng(shape[0] * shape[1])
    w = (rng.normal(size=shape) * scale).astype(dtype)
    exact = np.linalg.norm(w.astype("float64"), 2)
    rank = min(shape)
    # Rounding: a few float32 ulps below at worst (the bound is exact for rank 1).
    below = 1e-6 if dtype == "float32" else 1e-12
    for squarings in (0, 1, 5):
        got = float(linalg.dense_spectral_norm_upper(tensor(w, dtype), squarings))
        assert (
            exact * (1 - below) <= got <= exact * rank ** (1 / 2 ** (squarings + 1)) * (1 + below)
        )
    frobenius = float(linalg.dense_spectral_norm_upper(tensor(w, dtype), 0))
    assert frobenius == pytest.approx(np.linalg.norm(w.astype("float64")), rel=1e-5)


def test_dense_upper_bound_of_zero_and_of_bad_arguments():
    assert float(linalg.dense_spectral_norm_upper(np.zeros((3, 3), "float32"))) == 0.0
    with pytest.raises(ValueError, match="matrix"):
        linalg.dense_spectral_norm_upper(np.zeros((3,), "float32"))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="squarings"):
            linalg.dense_spectral_norm_upper(np.eye(2, dtype="float32"), bad)


# ------------------------------------------------------------------ circular convolution
@pytest.mark.float64
def test_circular_conv_norm_equals_the_circulant_matrix_norm():
    kernel = np.random.default_rng(2).normal(size=(3, 3, 2, 3))
    exact = np.linalg.norm(operator_matrix(kernel, (5, 6), circular=True), 2)
    got = float(linalg.circular_conv_norm_exact(tensor(kernel), (5, 6)))
    assert got == pytest.approx(exact, 1e-10)


@pytest.mark.parametrize("grid, strides", [((6, 8), (2, 2)), ((6, 6), (3, 2)), ((5, 4), (1, 2))])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_strided_circular_norm_equals_the_matrix_norm(grid, strides, dtype):
    kernel = random_kernel((3, 3, 2, 3), seed=7).astype(dtype)
    exact = np.linalg.svd(
        circular_strided_matrix(kernel.astype("float64"), grid, strides), compute_uv=False
    )[0]
    got = float(linalg.circular_conv_norm_exact(tensor(kernel, dtype), grid, strides))
    assert got == pytest.approx(exact, rel=1e-10 if dtype == "float64" else 1e-5)
    with pytest.raises(ValueError, match="Received: grid_shape"):
        linalg.circular_conv_norm_exact(tensor(kernel, dtype), (5, 5), 2)


# ------------------------------------------------------------------ "same" convolution
@pytest.mark.float64
@pytest.mark.parametrize("size", [4, 7])
def test_same_conv_bound_is_an_upper_bound_and_near_tight(size):
    kernel = np.random.default_rng(size).normal(size=(3, 3, 3, 2))
    exact = np.linalg.norm(operator_matrix(kernel, (size, size), circular=False), 2)
    # The zero-padded conv is the backend's "same" conv: check the numpy matrix is it.
    image = np.random.default_rng(9).normal(size=(size, size, 3))
    keras_out = ops.convert_to_numpy(ops.conv(tensor(image[None]), tensor(kernel), 1, "same"))[0]
    np.testing.assert_allclose(keras_out, correlate(image, kernel, circular=False), atol=1e-10)
    bound = float(linalg.same_conv_norm_upper(tensor(kernel), (size, size)))
    assert exact <= bound * (1 + 1e-12)
    assert bound < 1.5 * exact


# ------------------------------------------------------------------ estimate from below
@pytest.mark.parametrize(
    "kernel_shape, input_shape, strides, padding",
    [
        ((3, 3, 2, 2), (6, 6), 1, "same"),
        ((3, 3, 2, 3), (6, 6), 2, "same"),
        ((3, 3, 4, 4), (8, 8), 1, "same"),
        ((3, 3, 2, 4), (6, 5), 1, "valid"),
        ((5, 5, 2, 2), (6, 6), 1, "same"),
        ((1, 1, 3, 5), (6, 6), 1, "same"),
        ((3, 3, 8, 4), (2, 2), 1, "same"),
    ],
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_operator_norm_matches_svd_of_the_conv_matrix(
    kernel_shape, input_shape, strides, padding, dtype
):
    kernel = random_kernel(kernel_shape, seed=sum(kernel_shape))
    exact = exact_norm(kernel, input_shape, strides, padding.upper())
    estimate = linalg.conv_operator_norm_lower(tensor(kernel, dtype), input_shape, strides, padding)
    assert dtype_of(estimate) == dtype
    assert abs(float(estimate) - exact) <= 1e-3 * exact


@pytest.mark.float64
def test_operator_norm_is_deterministic_and_never_above_the_true_norm():
    kernel = random_kernel((3, 3, 4, 4), seed=3)
    first = linalg.conv_operator_norm_lower(tensor(kernel), (8, 8), iterations=8)
    second = linalg.conv_operator_norm_lower(tensor(kernel), (8, 8), iterations=8)
    assert float(first) == float(second)
    assert float(first) <= exact_norm(kernel, (8, 8)) * (1 + 1e-12)


@pytest.mark.float64
def test_reshaped_kernel_norm_is_not_the_operator_norm():
    """Caveat (a) of the paper's code: the reshaped-kernel norm under-estimates the conv.

    For a 3x3 all-ones kernel the reshaped `(9, 1)` matrix has norm 3, while the
    conv on a 6x6 image has norm `(1 + 2 cos(pi / 7))**2 = 7.85`: capping the
    reshaped norm at `L_c` lets the true Lipschitz constant reach ~2.6 L_c.
    """
    ones = np.ones((3, 3, 1, 1))
    reshaped = np.linalg.svd(ones.reshape(9, 1), compute_uv=False)[0]
    operator = float(linalg.conv_operator_norm_lower(tensor(ones), (6, 6)))
    assert reshaped == pytest.approx(3.0)
    assert operator == pytest.approx((1 + 2 * np.cos(np.pi / 7)) ** 2, rel=1e-6)
    assert operator / reshaped > 2.5
    # For random kernels too, the reshaped norm is only a lower bound.
    for seed in range(5):
        kernel = random_kernel((3, 3, 4, 4), seed=seed)
        reshaped = np.linalg.svd(kernel.reshape(-1, 4), compute_uv=False)[0]
        assert reshaped < 0.9 * exact_norm(kernel, (8, 8))


def test_operator_norm_runs_in_graph_and_xla():
    kernel = tensor(random_kernel((3, 3, 2, 2), seed=1), "float32")
    eager = linalg.conv_operator_norm_lower(kernel, (6, 6), iterations=60)
    for xla in (False, True) if BACKEND == "tensorflow" else (True,):
        fn = compiled(lambda k: linalg.conv_operator_norm_lower(k, (6, 6), iterations=60), xla)
        assert float(fn(kernel)) == pytest.approx(float(eager), rel=1e-5)


def test_operator_norm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="channels but the kernel reads 2"):
        linalg.conv_operator_norm_lower(ops.ones((3, 3, 2, 2)), (6, 6, 3))
    with pytest.raises(ValueError, match="kernel.shape"):
        linalg.conv_operator_norm_lower(ops.ones((3, 2, 2)), (6, 6))


# ------------------------------------------------------------------ certified upper bound
@pytest.mark.parametrize("kernel_shape, input_shape, strides, padding", BOUND_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_upper_bound_is_never_below_the_exact_norm(
    kernel_shape, input_shape, strides, padding, dtype
):
    rounding = 1e-12 if dtype == "float64" else 1e-5
    for seed in range(3):
        kernel = random_kernel(kernel_shape, seed=seed).astype(dtype)
        exact = exact_norm(kernel.astype("float64"), input_shape, strides, padding.upper())
        bound = linalg.conv_operator_norm_upper(
            tensor(kernel, dtype), input_shape, strides, padding
        )
        assert dtype_of(bound) == dtype
        assert exact <= float(bound) * (1 + rounding)
        if min(input_shape) >= 5:  # near-tight once the input is a few kernels wide
            assert float(bound) <= 1.25 * exact


@pytest.mark.float64
def test_upper_bound_is_exact_where_the_kernel_reads_one_pixel():
    # On a 1x1 input only the centre tap of a "same" 3x3 kernel is read.
    kernel = random_kernel((3, 3, 4, 6), seed=1)
    bound = float(linalg.conv_operator_norm_upper(tensor(kernel), (1, 1)))
    assert bound == pytest.approx(np.linalg.svd(kernel[1, 1], compute_uv=False)[0], rel=1e-12)
    assert bound == pytest.approx(exact_norm(kernel, (1, 1)), rel=1e-12)


def test_upper_bound_runs_in_graph_and_xla():
    kernel = tensor(random_kernel((3, 3, 2, 4), seed=1), "float32")
    for strides in (1, 2):
        eager = linalg.conv_operator_norm_upper(kernel, (6, 6), strides)
        for xla in (False, True) if BACKEND == "tensorflow" else (True,):
            fn = compiled(lambda k, s=strides: linalg.conv_operator_norm_upper(k, (6, 6), s), xla)
            assert float(fn(kernel)) == pytest.approx(float(eager), rel=1e-5)


# ------------------------------------------------------------------ former names
def test_old_name_is_the_lower_estimate():
    assert constraints.conv_operator_norm is constraints.conv_operator_norm_lower
    assert linalg.conv_operator_norm is linalg.conv_operator_norm_lower


def test_former_names_and_paths_are_the_same_functions():
    """The names before the norms moved here (`constraints`, `constraints_opteq`) still work."""
    assert linalg.dense_spectral_norm is linalg.dense_spectral_norm_exact
    assert linalg.circular_conv_norm is linalg.circular_conv_norm_exact
    assert linalg.same_conv_norm_bound is linalg.same_conv_norm_upper
    for name in ("conv_operator_norm", "conv_operator_norm_lower", "conv_operator_norm_upper"):
        assert getattr(constraints, name) is getattr(linalg, name)
    assert constraints.PADDINGS is linalg.PADDINGS
    for name in ("dense_spectral_norm", "circular_conv_norm", "same_conv_norm_bound"):
        assert getattr(constraints_opteq, name) is getattr(linalg, name)
