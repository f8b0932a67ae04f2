"""Feature functions (`keras_deq.features`): values and closed-form gradients against numpy."""

import numpy as np
import pytest
from feature_references import (
    FLOAT_DTYPES,
    finite_difference_gradient,
    float64_param,
    gradient,
    numpy_decorrelation,
    numpy_hsic_sum,
)
from keras import ops

from keras_deq import features
from keras_deq.layers.opteq_priors import FeaturePrior
from keras_deq.regularizers import HSICRegularizer


def f64(value):
    return ops.convert_to_tensor(value, "float64")


def numpy(t):
    return ops.convert_to_numpy(t)


# ------------------------------------------------------------------ soft threshold
def test_soft_threshold_is_zero_inside_the_threshold():
    out = numpy(features.soft_threshold(ops.convert_to_tensor([-0.5, 0.2, 0.9]), 1.0))
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.0])


# ------------------------------------------------------------------ decorrelation
@pytest.mark.float64
def test_decorrelation_is_zero_on_orthogonal_features_and_matches_eq13():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(16, 5)))  # 5 orthonormal feature columns
    orthogonal = q * np.array([0.5, 1.0, 2.0, 3.0, 7.0])  # any feature scales
    value = float(features.decorrelation(f64(orthogonal)))
    assert value == pytest.approx(0, abs=1e-20)
    correlated = rng.normal(size=(16, 5)) + 0.5
    value = float(features.decorrelation(f64(correlated)))
    assert value == pytest.approx(numpy_decorrelation(correlated), rel=1e-10)
    assert value > 0.1


@pytest.mark.float64
def test_decorrelation_treats_spatial_axes_as_samples():
    z = np.random.default_rng(2).normal(size=(2, 3, 3, 4))
    value = float(features.decorrelation(f64(z)))
    assert value == pytest.approx(numpy_decorrelation(z.reshape(-1, 4)), rel=1e-10)


@pytest.mark.float64
def test_decorrelation_gradient_matches_finite_differences():
    z = np.random.default_rng(3).normal(size=(6, 4)) + 0.3
    closed = numpy(features.decorrelation_gradient(f64(z)))
    np.testing.assert_allclose(
        closed, finite_difference_gradient(numpy_decorrelation, z), rtol=1e-6, atol=1e-8
    )


# ------------------------------------------------------------------ HSIC
@pytest.mark.float64
def test_hsic_matches_the_pairwise_trace_formula():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(12, 1))
    z = np.concatenate([base, np.sin(2 * base), rng.normal(size=(12, 2))], axis=1)
    value = float(HSICRegularizer(strength=2.0, sigma=0.8)(f64(z)))
    assert value == pytest.approx(2.0 * numpy_hsic_sum(z, 0.8), rel=1e-10)
    many = rng.normal(size=(64, 1))
    dependent = float(features.hsic(f64(np.concatenate([many, many**2], 1))))
    independent = float(features.hsic(f64(rng.normal(size=(64, 2)))))
    assert dependent > 5 * independent


@pytest.mark.parametrize(
    ("shape", "dtype", "sigma"),
    [
        ((7, 3), "float32", 1.3),
        float64_param((7, 3), "float64", 0.2),
        ((3, 2, 2, 3), "float32", 0.7),
        ((5, 3), "float32", 1e-30),  # kernels in float64 (`d == 0` where float64 is float32)
        float64_param((5, 3), "float64", 1e-200),  # kernels `d == 0`
        float64_param((5, 3), "float64", float("inf")),
    ],
)
def test_hsic_gradient_matches_autodiff_of_hsic_for_any_sigma(shape, dtype, sigma):
    z = ops.convert_to_tensor(np.random.default_rng(2).normal(size=shape), dtype)
    (expected,) = gradient(lambda v: features.hsic(v, sigma), z)
    expected = numpy(expected)
    closed = numpy(features.hsic_gradient(z, sigma))
    assert closed.dtype == expected.dtype and np.all(np.isfinite(closed))
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(closed, expected, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_hsic_of_one_sample_is_zero_with_a_zero_gradient(dtype):
    """One sample has no dependence: 0, not `0 / 0` (the estimator's `(B - 1)^2`)."""
    z = ops.convert_to_tensor([[0.3, -1.2, 2.0]], dtype)
    assert float(features.hsic(z)) == 0.0
    np.testing.assert_array_equal(numpy(features.hsic_gradient(z)), np.zeros((1, 3)))
    step = FeaturePrior("hsic", strength=0.5).step(z)
    np.testing.assert_array_equal(numpy(step), numpy(z))


@pytest.mark.float64
def test_hsic_gradient_is_differentiable_again():
    """Training through a structural HSIC step differentiates `hsic_gradient`."""
    z = np.random.default_rng(3).normal(size=(6, 3))
    probe = np.random.default_rng(4).normal(size=(6, 3))

    def scalar(v):
        return ops.sum(features.hsic_gradient(v, 0.9) * probe)

    (autodiff,) = gradient(scalar, f64(z))
    numeric = finite_difference_gradient(lambda v: float(scalar(f64(v))), z)
    np.testing.assert_allclose(numpy(autodiff), numeric, atol=1e-8)


@pytest.mark.parametrize(("dtype", "sigma"), [("float32", 1e-19), ("float32", 1e-30)])
def test_second_derivative_of_hsic_stays_finite_for_a_tiny_bandwidth(dtype, sigma):
    """The diagonal terms of the second derivative (~1 / sigma^2, cancelling) are left out."""
    z = ops.convert_to_tensor(np.random.default_rng(5).normal(size=(6, 3)), dtype)
    (grad,) = gradient(lambda v: ops.sum(ops.sin(features.hsic_gradient(v, sigma))), z)
    assert np.all(np.isfinite(numpy(grad)))
