"""A sample's solution does not depend on the other samples in its batch."""

import numpy as np
import pytest
from keras import ops

from keras_deq import solvers

from .helpers import SOLVER_NAMES, const

W = np.random.default_rng(0).normal(size=(6, 6)) / np.sqrt(6)


def f(z, scale, shift):
    # Per-sample contraction factor `scale`: small converges in a few steps, ~1 slowly.
    return const(scale, z) * ops.tanh(ops.matmul(z, const(W, z))) + const(shift, z)


@pytest.mark.float64
@pytest.mark.parametrize("name", SOLVER_NAMES)  # GMRES's: tests/solvers/test_gmres.py
def test_fast_sample_alone_or_beside_a_slow_one(name):
    scale = np.array([[0.2], [0.97]])
    shift = np.random.default_rng(1).normal(size=(2, 6))
    solve = solvers.get(name)
    kwargs = dict(max_iter=200, tol=1e-6)
    alone = solve(lambda z: f(z, scale[:1], shift[:1]), np.zeros((1, 6)), **kwargs)
    both = solve(lambda z: f(z, scale, shift), np.zeros((2, 6)), **kwargs)
    assert np.all(np.asarray(both.converged))
    assert int(both.steps) > int(alone.steps)  # the slow sample kept the loop running
    # The fast sample returns its own first converged iterate, not a later one.
    np.testing.assert_allclose(
        np.asarray(both.state)[:1], np.asarray(alone.state), rtol=0, atol=1e-13
    )
    np.testing.assert_allclose(np.asarray(both.rel_residual)[:1], np.asarray(alone.rel_residual))
