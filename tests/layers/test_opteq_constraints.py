"""Operator-norm caps of the OptEq units, against explicitly built matrices (numpy)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_deq import constraints_opteq as co


def correlate(image, kernel, circular):
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


def operator_matrix(kernel, shape, circular):
    c_in = kernel.shape[2]
    basis = np.eye(shape[0] * shape[1] * c_in)
    columns = [correlate(e.reshape(*shape, c_in), kernel, circular).ravel() for e in basis]
    return np.stack(columns, axis=1)


def test_dense_spectral_norm_is_the_largest_singular_value():
    w = np.random.default_rng(0).normal(size=(7, 4))
    assert float(co.dense_spectral_norm(tf.constant(w))) == pytest.approx(np.linalg.norm(w, 2))


def test_spectral_norm_caps_large_kernels_and_keeps_small_ones():
    rng = np.random.default_rng(1)
    large = rng.normal(size=(6, 9))
    large *= 3.0 / np.linalg.norm(large, 2)
    small = large / 6.0
    cap = co.SpectralNorm(1.0)
    assert np.linalg.norm(cap(tf.constant(large)).numpy(), 2) == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_array_equal(cap(tf.constant(small)).numpy(), small)
    assert co.SpectralNorm.from_config(cap.get_config()).max_norm == 1.0
    with pytest.raises(ValueError, match="max_norm"):
        co.SpectralNorm(0.0)


def test_circular_conv_norm_equals_the_circulant_matrix_norm():
    kernel = np.random.default_rng(2).normal(size=(3, 3, 2, 3))
    exact = np.linalg.norm(operator_matrix(kernel, (5, 6), circular=True), 2)
    assert float(co.circular_conv_norm(tf.constant(kernel), (5, 6))) == pytest.approx(exact, 1e-10)


@pytest.mark.parametrize("size", [4, 7])
def test_same_conv_bound_is_an_upper_bound_and_near_tight(size):
    kernel = np.random.default_rng(size).normal(size=(3, 3, 3, 2))
    exact = np.linalg.norm(operator_matrix(kernel, (size, size), circular=False), 2)
    # The zero-padded conv is a compression of TF's conv: check the numpy matrix is it.
    image = np.random.default_rng(9).normal(size=(size, size, 3))
    tf_out = tf.nn.conv2d(image[None], kernel, 1, "SAME").numpy()[0]
    np.testing.assert_allclose(tf_out, correlate(image, kernel, circular=False), atol=1e-10)
    bound = float(co.same_conv_norm_bound(tf.constant(kernel), (size, size)))
    assert exact <= bound * (1 + 1e-12)
    assert bound < 1.5 * exact


def test_conv_spectral_norm_caps_the_true_operator_norm():
    kernel = np.random.default_rng(3).normal(size=(3, 3, 2, 4))
    capped = co.ConvSpectralNorm(1.0, (6, 6))(tf.constant(kernel)).numpy()
    exact = np.linalg.norm(operator_matrix(capped, (6, 6), circular=False), 2)
    assert 0.6 < exact <= 1.0 + 1e-12
    config = co.ConvSpectralNorm(2.0, (6, 6)).get_config()
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(co.ConvSpectralNorm(**config))
    )
    assert clone.max_norm == 2.0 and clone.spatial_shape == (6, 6)
    with pytest.raises(ValueError, match="spatial_shape"):
        co.ConvSpectralNorm(1.0, (6,))
    with pytest.raises(ValueError, match="grid_shape"):
        co.circular_conv_norm(tf.constant(kernel), (2, 2))
