"""Weight constraints: each cap holds on the true operator norm of an explicitly built matrix."""

import keras
import numpy as np
import pytest
from conv_references import BOUND_CASES, exact_norm, operator_matrix, random_kernel
from feature_references import FLOAT_DTYPES
from keras import ops

from keras_deq import constraints, constraints_opteq, linalg


def tensor(value, dtype="float64"):
    return ops.convert_to_tensor(value, dtype)


def numpy(t):
    return ops.convert_to_numpy(t)


# ------------------------------------------------------------------ ConvOperatorNorm
@pytest.mark.parametrize("kernel_shape, input_shape, strides, padding", BOUND_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_capped_conv_never_exceeds_its_cap(kernel_shape, input_shape, strides, padding, dtype):
    """The exact norm after the constraint is at most the cap: a guarantee, not an estimate
    (a Krylov estimate from below let 8x8x8 convs reach 1.0015-1.003x their cap)."""
    cap = constraints.ConvOperatorNorm(2.0, input_shape, strides, padding)
    for seed in range(3):
        kernel = 10 * random_kernel(kernel_shape, seed=seed)
        capped = numpy(cap(tensor(kernel, dtype))).astype("float64")
        exact = exact_norm(capped, input_shape, strides, padding.upper())
        assert exact <= 2.0 * (1 + 1e-6), exact / 2.0
        assert exact >= 2.0 / (3.0 if min(input_shape) < 5 else 1.25)  # not vacuous


@pytest.mark.float64
def test_conv_operator_norm_constraint_caps_the_true_norm():
    kernel = random_kernel((3, 3, 2, 3), seed=4)
    cap = constraints.ConvOperatorNorm(2.0, input_shape=(6, 6, 2), strides=2)
    capped = numpy(cap(tensor(kernel)))
    assert exact_norm(kernel, (6, 6), 2) > 2.0
    assert 1.8 < exact_norm(capped, (6, 6), 2) <= 2.0 * (1 + 1e-12)
    assert float(cap.norm(tensor(capped))) == pytest.approx(2.0, rel=1e-12)
    np.testing.assert_allclose(capped / kernel, capped[0, 0, 0, 0] / kernel[0, 0, 0, 0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_conv_operator_norm_constraint_leaves_small_kernels_unchanged(dtype):
    kernel = (0.01 * random_kernel((3, 3, 2, 2), seed=5)).astype(dtype)
    cap = constraints.ConvOperatorNorm(2.0, input_shape=(6, 6))
    np.testing.assert_array_equal(numpy(cap(tensor(kernel, dtype))), kernel)


def test_conv_operator_norm_constraint_on_a_keras_conv_during_training():
    cap = constraints.ConvOperatorNorm(0.5, input_shape=(6, 6))
    model = keras.Sequential(
        [keras.Input((6, 6, 2)), keras.layers.Conv2D(2, 3, padding="same", kernel_constraint=cap)]
    )
    model.compile(keras.optimizers.SGD(1.0), "mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(16, 6, 6, 2)), 10 * rng.normal(size=(16, 6, 6, 2)), verbose=0)
    assert exact_norm(numpy(model.layers[0].kernel), (6, 6)) <= 0.5 * (1 + 1e-6)


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


# ------------------------------------------------------------------ MaxAbs
def test_max_abs_clips_entrywise():
    clipped = numpy(constraints.MaxAbs(1.5)(tensor([-3.0, -1.0, 0.5, 2.0], "float32")))
    np.testing.assert_array_equal(clipped, [-1.5, -1.0, 0.5, 1.5])
    with pytest.raises(ValueError, match="max_value=-1"):
        constraints.MaxAbs(-1)


# ------------------------------------------------------------------ SpectralNorm
@pytest.mark.float64
def test_spectral_norm_caps_large_kernels_and_keeps_small_ones():
    rng = np.random.default_rng(1)
    large = rng.normal(size=(6, 9))
    large *= 3.0 / np.linalg.norm(large, 2)
    small = large / 6.0
    cap = constraints.SpectralNorm(1.0)
    assert np.linalg.norm(numpy(cap(tensor(large))), 2) == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_array_equal(numpy(cap(tensor(small))), small)
    assert constraints.SpectralNorm.from_config(cap.get_config()).max_norm == 1.0
    with pytest.raises(ValueError, match="max_norm"):
        constraints.SpectralNorm(0.0)


# ------------------------------------------------------------------ ConvSpectralNorm
@pytest.mark.float64
def test_conv_spectral_norm_caps_the_true_operator_norm():
    kernel = np.random.default_rng(3).normal(size=(3, 3, 2, 4))
    capped = numpy(constraints.ConvSpectralNorm(1.0, (6, 6))(tensor(kernel)))
    exact = np.linalg.norm(operator_matrix(capped, (6, 6), circular=False), 2)
    assert 0.6 < exact <= 1.0 + 1e-12
    config = constraints.ConvSpectralNorm(2.0, (6, 6)).get_config()
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(constraints.ConvSpectralNorm(**config))
    )
    assert clone.max_norm == 2.0 and clone.spatial_shape == (6, 6)
    with pytest.raises(ValueError, match="spatial_shape"):
        constraints.ConvSpectralNorm(1.0, (6,))
    with pytest.raises(ValueError, match="grid_shape"):
        linalg.circular_conv_norm_exact(tensor(kernel), (2, 2))


# ------------------------------------------------------------------ all constraints
@pytest.mark.parametrize(
    "constraint",
    [
        constraints.ConvOperatorNorm(2.0, input_shape=(8, 8, 4), strides=2, iterations=12),
        constraints.MaxAbs(0.7),
        constraints.SpectralNorm(0.8),
        constraints.ConvSpectralNorm(0.8, (4, 4)),
    ],
)
def test_constraints_serialize(constraint):
    config = keras.constraints.serialize(constraint)
    assert config["registered_name"].startswith("keras_deq>")
    restored = keras.constraints.deserialize(config)
    assert type(restored) is type(constraint)
    assert restored.get_config() == constraint.get_config()


def test_former_module_of_the_opteq_caps_gives_the_same_classes():
    """`keras_deq.constraints_opteq` (where the OptEq caps were) still imports them."""
    assert constraints_opteq.SpectralNorm is constraints.SpectralNorm
    assert constraints_opteq.ConvSpectralNorm is constraints.ConvSpectralNorm
    config = keras.constraints.serialize(constraints_opteq.SpectralNorm(0.5))
    assert config["registered_name"] == "keras_deq>SpectralNorm"
