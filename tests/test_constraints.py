"""Weight constraints: the conv operator norm against an explicitly built conv matrix."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_deq import constraints


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


# ------------------------------------------------------------------- constraints
def test_conv_operator_norm_constraint_caps_the_true_norm():
    kernel = random_kernel((3, 3, 2, 3), seed=4)
    cap = constraints.ConvOperatorNorm(2.0, input_shape=(6, 6, 2), strides=2)
    capped = cap(tf.constant(kernel)).numpy()
    assert exact_norm(kernel, (6, 6), 2) > 2.0
    assert exact_norm(capped, (6, 6), 2) == pytest.approx(2.0, rel=1e-6)
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
    assert exact_norm(model.layers[0].kernel.numpy(), (6, 6)) <= 0.5 * (1 + 1e-4)


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
