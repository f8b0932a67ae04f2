"""Fixed-point (Picard) iteration: exact iterates, damping, exact step counts."""

import numpy as np
import pytest
from keras import ops

from keras_deq.solvers import fixed_point

from .helpers import FLOAT_DTYPES, Recorder, TanhMap, const, picard_np, residuals_np


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("damping", [1.0, 0.7, 0.3])
def test_iterates_are_damped_picard_steps(damping, dtype):
    # In float64 the documented step z + damping (f(z) - z) must use damping itself,
    # not damping rounded to float32 (0.7 -> 0.699999988...): that would be a 1e-8
    # relative error in every iterate of an otherwise exact float64 computation.
    # float32: a few roundings of 1.2e-7 per step, over 7 steps of a contraction.
    rtol, atol = {"float64": (1e-13, 1e-15), "float32": (1e-5, 1e-5)}[dtype]
    g = TanhMap(6, 4, norm=0.9, seed=1)
    f = Recorder(g)
    fixed_point(f, np.zeros((4, 6), dtype), max_iter=8, tol=1e-14, damping=damping)
    expected = picard_np(g.np, np.zeros((4, 6)), 7, damping=damping)
    assert f.calls == 8
    for got, want in zip(f.inputs, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("damping", [0.5, 0.25])
def test_damping_on_constant_map_is_geometric(damping, dtype):
    # z -> c from z0 = 0: the residual of z_k is (1 - damping)^k ||c||. float32: a few
    # roundings of 1.2e-7 per step over at most 8 steps.
    rtol_state, rtol_res = {"float64": (1e-14, 1e-13), "float32": (1e-5, 1e-5)}[dtype]
    c = np.array([[1.0, -2.0, 3.0], [0.5, 0.0, -0.5]])
    for k in (1, 4, 9):
        result = fixed_point(
            lambda z: const(c, z) + 0.0 * z,
            np.zeros((2, 3), dtype),
            max_iter=k,
            tol=1e-300,
            stop_mode="abs",
            damping=damping,
        )
        # The best of z_0 .. z_{k-1} is z_{k-1} = (1 - (1 - d)^(k-1)) c.
        factor = (1 - damping) ** (k - 1)
        np.testing.assert_allclose(np.asarray(result.state), (1 - factor) * c, rtol=rtol_state)
        np.testing.assert_allclose(
            np.asarray(result.abs_residual), factor * np.linalg.norm(c, axis=1), rtol=rtol_res
        )


@pytest.mark.float64
def test_damping_slows_contraction_as_predicted():
    # z -> 0.5 z + 1: damped Picard contracts the error by (1 - d) + d * 0.5 per step.
    def f(z):
        return 0.5 * z + 1.0

    z0 = np.zeros((1, 2))
    for damping, rate in [(1.0, 0.5), (0.5, 0.75), (0.2, 0.9)]:
        tol = 1e-8
        result = fixed_point(f, z0, max_iter=1000, tol=tol, stop_mode="abs", damping=damping)
        # |f(z_k) - z_k| = 0.5 |z_k - 2| = 0.5 * 2 * rate^k per entry, times sqrt(2).
        expected_k = next(k for k in range(1000) if rate**k * np.sqrt(2) <= tol)
        assert int(result.steps) == expected_k + 1


@pytest.mark.float64
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_step_count_equals_independent_picard_count(stop_mode):
    g = TanhMap(7, 5, norm=0.6, seed=9)
    tol = 1e-9
    result = fixed_point(g, np.zeros((5, 7)), max_iter=500, tol=tol, stop_mode=stop_mode)
    zs = picard_np(g.np, np.zeros((5, 7)), 200)
    index = 0 if stop_mode == "abs" else 1
    crit = np.stack([residuals_np(g.np(z), z)[index] for z in zs])
    first = int(np.argmax(np.all(np.minimum.accumulate(crit) <= tol, axis=1)))
    assert int(result.steps) == first + 1
    # Each sample returns its own first iterate that met tol, whatever the others do.
    own_first = np.argmax(crit <= tol, axis=0)
    assert len(set(own_first.tolist())) > 1  # the samples do converge at different steps
    expected = np.stack([zs[k][i] for i, k in enumerate(own_first)])
    np.testing.assert_allclose(np.asarray(result.state), expected, rtol=1e-12, atol=1e-14)


def test_docstring_example():
    result = fixed_point(lambda z: 0.5 * z + 1.0, ops.zeros((2, 3)), tol=1e-6)
    assert np.all(np.asarray(result.converged))
    np.testing.assert_allclose(np.asarray(result.state), 2.0, rtol=1e-5)
