"""Building blocks of the multiscale cells: mean-only group norm, fusion weights."""

import keras
import numpy as np
import pytest

from keras_deq.layers.multiscale_blocks import MeanGroupNormalization, fusion_weights


@pytest.mark.float64
# ------------------------------------------------------------------ mean-only group normalization
def test_mean_group_norm_lipschitz_is_at_most_max_abs_gamma():
    norm = MeanGroupNormalization(2, dtype="float64")
    norm.build((None, 4, 4, 6))
    gamma = np.array([0.3, -1.7, 0.9, 1.2, -0.4, 0.1])
    norm.gamma.assign(gamma)
    norm.beta.assign(np.arange(6.0))
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 4, 4, 6))
    d = rng.normal(size=(2000, 4, 4, 6)) * rng.choice([1e-3, 1.0, 10.0], size=(2000, 1, 1, 1))
    diff = np.asarray(norm(a)) - np.asarray(norm(a + d))
    ratio = np.sqrt(np.sum(diff**2, (1, 2, 3))) / np.sqrt(np.sum(d**2, (1, 2, 3)))
    assert float(np.max(ratio)) <= np.abs(gamma).max() + 1e-6
    assert float(norm.lipschitz_constant()) == pytest.approx(1.7)
    # It is the group centering (an orthogonal projection), then the affine map.
    groups = a.reshape(2000, 16, 2, 3)  # (batch, pixels, group, channel in group)
    centered = (groups - groups.mean(axis=(1, 3), keepdims=True)).reshape(a.shape)
    np.testing.assert_allclose(np.asarray(norm(a)), centered * gamma + np.arange(6.0), atol=1e-12)


@pytest.mark.float64
def test_standard_group_norm_is_not_lipschitz_near_constant_inputs():
    norm = keras.layers.GroupNormalization(2, epsilon=1e-5, dtype="float64")
    norm.build((None, 4, 4, 6))
    rng = np.random.default_rng(0)
    a = 1.0 + 1e-4 * rng.normal(size=(100, 4, 4, 6))
    d = 1e-5 * rng.normal(size=(100, 4, 4, 6))
    diff = np.asarray(norm(a)) - np.asarray(norm(a + d))
    ratio = np.sqrt(np.sum(diff**2, (1, 2, 3))) / np.sqrt(np.sum(d**2, (1, 2, 3)))
    assert float(np.max(ratio)) > 10.0


# ------------------------------------------------------------------ fusion weights
def test_fusion_weights_rows_sum_to_one_and_penalize_upsampling():
    for n in (2, 3, 4):
        for softmax in (False, True):
            weights = np.array(fusion_weights(n, softmax))
            np.testing.assert_allclose(weights.sum(axis=1), 1.0)
            assert np.all(np.diag(weights) == 0)
    weights = fusion_weights(4, softmax=True)
    # Branch 0 receives only upsampled paths, by 1, 2, 3 levels: softmax(-1, -2, -3).
    scores = np.exp(-np.arange(1.0, 4.0))
    np.testing.assert_allclose(weights[0][1:], scores / scores.sum())
    # The coarsest branch receives only downsampled paths: uniform.
    np.testing.assert_allclose(weights[3][:3], 1 / 3)
