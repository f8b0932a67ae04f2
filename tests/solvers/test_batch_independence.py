"""A sample's solution does not depend on the other samples in its batch."""

import numpy as np
import pytest
import tensorflow as tf

from keras_deq import solvers

W = tf.constant(np.random.default_rng(0).normal(size=(6, 6)) / np.sqrt(6), tf.float64)


def f(z, scale, shift):
    # Per-sample contraction factor `scale`: small converges in a few steps, ~1 slowly.
    return scale * tf.tanh(tf.matmul(z, W)) + shift


@pytest.mark.parametrize("name", solvers.names())
def test_fast_sample_alone_or_beside_a_slow_one(name):
    scale = tf.constant([[0.2], [0.97]], tf.float64)
    shift = tf.constant(np.random.default_rng(1).normal(size=(2, 6)), tf.float64)
    solve = solvers.get(name)
    kwargs = dict(max_iter=200, tol=1e-6)
    alone = solve(lambda z: f(z, scale[:1], shift[:1]), tf.zeros([1, 6], tf.float64), **kwargs)
    both = solve(lambda z: f(z, scale, shift), tf.zeros([2, 6], tf.float64), **kwargs)
    assert bool(tf.reduce_all(both.converged))
    assert int(both.steps) > int(alone.steps)  # the slow sample kept the loop running
    # The fast sample returns its own first converged iterate, not a later one.
    np.testing.assert_allclose(both.state[:1].numpy(), alone.state.numpy(), rtol=0, atol=1e-13)
    np.testing.assert_allclose(both.rel_residual[:1].numpy(), alone.rel_residual.numpy())
