"""Weight constraints: the conv operator norm against an explicitly built conv matrix."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_deq import constraints
from keras_deq import constraints_opteq as co


def conv_matrix(kernel, input_shape, strides=1, padding="SAME"):
    """The conv as an explicit `(outputs, inputs)` matrix: the conv of every basis image."""
    height, width = input_shape
    n = height * width * kernel.shape[2]
    basis = np.eye(n).reshape(n, height, width, kernel.shape[2])
    out = tf.nn.conv2d(basis, tf.constant(kernel, tf.float64), strides, padding).numpy()
    return out.reshape(n, -1).T


def exact_norm(kernel, input_shape, strides=1, padding="SAME"):
    return np.linalg.svd(conv_matrix(kernel, input_shape, strides, padding), compute_uv=False)[0]


def random_kernel(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape)


def circular_strided_matrix(kernel, grid, strides):
    """Circular correlation on `grid` (wrap-around padding), then every `s`-th pixel."""
    n1, n2 = grid
    n = n1 * n2 * kernel.shape[2]
    basis = np.eye(n).reshape(n, n1, n2, kernel.shape[2])
    wrapped = np.pad(
        basis, [(0, 0), (0, kernel.shape[0] - 1), (0, kernel.shape[1] - 1), (0, 0)], "wrap"
    )
    out = tf.nn.conv2d(wrapped, tf.constant(kernel, tf.float64), 1, "VALID").numpy()
    return out[:, :: strides[0], :: strides[1]].reshape(n, -1).T


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


# ------------------------------------------------------------------ operator norm
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
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_operator_norm_matches_svd_of_the_conv_matrix(
    kernel_shape, input_shape, strides, padding, dtype
):
    kernel = random_kernel(kernel_shape, seed=sum(kernel_shape))
    exact = exact_norm(kernel, input_shape, strides, padding.upper())
    estimate = constraints.conv_operator_norm(
        tf.constant(kernel, dtype), input_shape, strides, padding
    )
    assert estimate.dtype == tf.as_dtype(dtype)
    assert abs(float(estimate) - exact) <= 1e-3 * exact


def test_operator_norm_is_deterministic_and_never_above_the_true_norm():
    kernel = random_kernel((3, 3, 4, 4), seed=3)
    first = constraints.conv_operator_norm(tf.constant(kernel), (8, 8), iterations=8)
    second = constraints.conv_operator_norm(tf.constant(kernel), (8, 8), iterations=8)
    assert float(first) == float(second)
    assert float(first) <= exact_norm(kernel, (8, 8)) * (1 + 1e-12)


def test_reshaped_kernel_norm_is_not_the_operator_norm():
    """Caveat (a) of the paper's code: the reshaped-kernel norm under-estimates the conv.

    For a 3x3 all-ones kernel the reshaped `(9, 1)` matrix has norm 3, while the
    conv on a 6x6 image has norm `(1 + 2 cos(pi / 7))**2 = 7.85`: capping the
    reshaped norm at `L_c` lets the true Lipschitz constant reach ~2.6 L_c.
    """
    ones = np.ones((3, 3, 1, 1))
    reshaped = np.linalg.svd(ones.reshape(9, 1), compute_uv=False)[0]
    operator = float(constraints.conv_operator_norm(tf.constant(ones), (6, 6)))
    assert reshaped == pytest.approx(3.0)
    assert operator == pytest.approx((1 + 2 * np.cos(np.pi / 7)) ** 2, rel=1e-6)
    assert operator / reshaped > 2.5
    # For random kernels too, the reshaped norm is only a lower bound.
    for seed in range(5):
        kernel = random_kernel((3, 3, 4, 4), seed=seed)
        reshaped = np.linalg.svd(kernel.reshape(-1, 4), compute_uv=False)[0]
        assert reshaped < 0.9 * exact_norm(kernel, (8, 8))


def test_operator_norm_runs_in_graph_and_xla():
    kernel = tf.constant(random_kernel((3, 3, 2, 2), seed=1), tf.float32)
    eager = constraints.conv_operator_norm(kernel, (6, 6), iterations=60)
    for jit in (False, True):
        fn = tf.function(
            lambda k: constraints.conv_operator_norm(k, (6, 6), iterations=60), jit_compile=jit
        )
        assert float(fn(kernel)) == pytest.approx(float(eager), rel=1e-5)


@pytest.mark.parametrize("kernel_shape, input_shape, strides, padding", BOUND_CASES)
def test_upper_bound_is_never_below_the_exact_norm(kernel_shape, input_shape, strides, padding):
    for seed in range(3):
        kernel = random_kernel(kernel_shape, seed=seed)
        exact = exact_norm(kernel, input_shape, strides, padding.upper())
        bound = constraints.conv_operator_norm_upper(
            tf.constant(kernel), input_shape, strides, padding
        )
        assert bound.dtype == tf.float64
        assert exact <= float(bound) * (1 + 1e-12)
        if min(input_shape) >= 5:  # near-tight once the input is a few kernels wide
            assert float(bound) <= 1.25 * exact


def test_upper_bound_is_exact_where_the_kernel_reads_one_pixel():
    # On a 1x1 input only the centre tap of a "same" 3x3 kernel is read.
    kernel = random_kernel((3, 3, 4, 6), seed=1)
    bound = float(constraints.conv_operator_norm_upper(tf.constant(kernel), (1, 1)))
    assert bound == pytest.approx(np.linalg.svd(kernel[1, 1], compute_uv=False)[0], rel=1e-12)
    assert bound == pytest.approx(exact_norm(kernel, (1, 1)), rel=1e-12)


@pytest.mark.parametrize("grid, strides", [((6, 8), (2, 2)), ((6, 6), (3, 2)), ((5, 4), (1, 2))])
def test_strided_circular_norm_equals_the_matrix_norm(grid, strides):
    kernel = random_kernel((3, 3, 2, 3), seed=7)
    exact = np.linalg.svd(circular_strided_matrix(kernel, grid, strides), compute_uv=False)[0]
    got = float(co.circular_conv_norm(tf.constant(kernel), grid, strides))
    assert got == pytest.approx(exact, rel=1e-10)
    with pytest.raises(ValueError, match="Received: grid_shape"):
        co.circular_conv_norm(tf.constant(kernel), (5, 5), 2)


def test_upper_bound_runs_in_graph_and_xla():
    kernel = tf.constant(random_kernel((3, 3, 2, 4), seed=1), tf.float32)
    for strides in (1, 2):
        eager = constraints.conv_operator_norm_upper(kernel, (6, 6), strides)
        for jit in (False, True):
            fn = tf.function(
                lambda k, s=strides: constraints.conv_operator_norm_upper(k, (6, 6), s),
                jit_compile=jit,
            )
            assert float(fn(kernel)) == pytest.approx(float(eager), rel=1e-5)


def test_old_name_is_the_lower_estimate():
    assert constraints.conv_operator_norm is constraints.conv_operator_norm_lower


# ------------------------------------------------------------------- constraints
@pytest.mark.parametrize("kernel_shape, input_shape, strides, padding", BOUND_CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_capped_conv_never_exceeds_its_cap(kernel_shape, input_shape, strides, padding, dtype):
    """The exact norm after the constraint is at most the cap: a guarantee, not an estimate
    (a Krylov estimate from below let 8x8x8 convs reach 1.0015-1.003x their cap)."""
    cap = constraints.ConvOperatorNorm(2.0, input_shape, strides, padding)
    for seed in range(3):
        kernel = 10 * random_kernel(kernel_shape, seed=seed)
        capped = cap(tf.constant(kernel, dtype)).numpy().astype("float64")
        exact = exact_norm(capped, input_shape, strides, padding.upper())
        assert exact <= 2.0 * (1 + 1e-6), exact / 2.0
        assert exact >= 2.0 / (3.0 if min(input_shape) < 5 else 1.25)  # not vacuous


def test_conv_operator_norm_constraint_caps_the_true_norm():
    kernel = random_kernel((3, 3, 2, 3), seed=4)
    cap = constraints.ConvOperatorNorm(2.0, input_shape=(6, 6, 2), strides=2)
    capped = cap(tf.constant(kernel)).numpy()
    assert exact_norm(kernel, (6, 6), 2) > 2.0
    assert 1.8 < exact_norm(capped, (6, 6), 2) <= 2.0 * (1 + 1e-12)
    assert float(cap.norm(tf.constant(capped))) == pytest.approx(2.0, rel=1e-12)
    np.testing.assert_allclose(capped / kernel, capped[0, 0, 0, 0] / kernel[0, 0, 0, 0])


def test_conv_operator_norm_constraint_leaves_small_kernels_unchanged():
    kernel = 0.01 * random_kernel((3, 3, 2, 2), seed=5)
    cap = constraints.ConvOperatorNorm(2.0, input_shape=(6, 6))
    np.testing.assert_array_equal(cap(tf.constant(kernel)).numpy(), kernel)


def test_conv_operator_norm_constraint_on_a_keras_conv_during_training():
    cap = constraints.ConvOperatorNorm(0.5, input_shape=(6, 6))
    model = keras.Sequential(
        [keras.Input((6, 6, 2)), keras.layers.Conv2D(2, 3, padding="same", kernel_constraint=cap)]
    )
    model.compile(keras.optimizers.SGD(1.0), "mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(16, 6, 6, 2)), 10 * rng.normal(size=(16, 6, 6, 2)), verbose=0)
    assert exact_norm(model.layers[0].kernel.numpy(), (6, 6)) <= 0.5 * (1 + 1e-6)


def test_max_abs_clips_entrywise():
    clipped = constraints.MaxAbs(1.5)(tf.constant([-3.0, -1.0, 0.5, 2.0])).numpy()
    np.testing.assert_array_equal(clipped, [-1.5, -1.0, 0.5, 1.5])


@pytest.mark.parametrize(
    "constraint",
    [
        constraints.ConvOperatorNorm(2.0, input_shape=(8, 8, 4), strides=2, iterations=12),
        constraints.MaxAbs(0.7),
    ],
)
def test_constraints_serialize(constraint):
    config = keras.constraints.serialize(constraint)
    assert config["registered_name"].startswith("keras_deq>")
    restored = keras.constraints.deserialize(config)
    assert type(restored) is type(constraint)
    assert restored.get_config() == constraint.get_config()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_norm": 0.0, "input_shape": (6, 6)}, "max_norm=0.0"),
        ({"max_norm": 1.0, "input_shape": (6,)}, "input_shape=(6,)"),
        ({"max_norm": 1.0, "input_shape": (6, 6), "strides": 0}, "strides=0"),
        ({"max_norm": 1.0, "input_shape": (6, 6), "padding": "causal"}, "padding='causal'"),
        ({"max_norm": 1.0, "input_shape": (6, 6), "iterations": 0}, "iterations=0"),
    ],
)
def test_conv_operator_norm_rejects_bad_arguments(kwargs, message):
    with pytest.raises(
        ValueError, match="Received: " + message.replace("(", r"\(").replace(")", r"\)")
    ):
        constraints.ConvOperatorNorm(**kwargs)


def test_operator_norm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="channels but the kernel reads 2"):
        constraints.conv_operator_norm(tf.ones((3, 3, 2, 2)), (6, 6, 3))
    with pytest.raises(ValueError, match="kernel.shape"):
        constraints.conv_operator_norm(tf.ones((3, 2, 2)), (6, 6))
    with pytest.raises(ValueError, match="max_value=-1"):
        constraints.MaxAbs(-1)
