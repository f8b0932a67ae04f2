"""`SAM` (OptEq's sequential averaging) and `fixed_steps` (exactly `max_iter` steps, the last
iterate), against plain numpy loops."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_deq import solvers
from keras_deq.solvers import SAM, FixedPoint, common, registry

from .helpers import FLOAT_DTYPES, Recorder, TanhMap, const, picard_np, residuals_np

TOLERANCES = {"float64": (1e-12, 1e-14), "float32": (2e-5, 1e-6)}


def sam_np(f, grad_r, z0, steps, rho, c, gamma):
    """Eq. 11 in numpy: `z_k = beta_k S_k(z_{k-1}) + (1 - beta_k) f(z_{k-1})`."""
    z = np.asarray(z0, np.float64)
    for k in range(1, steps + 1):
        beta = rho / k**c
        prior = 0.0 if grad_r is None else gamma * grad_r(z)
        z = beta * ((1 - gamma * beta) * z - prior) + (1 - beta) * f(z)
    return z


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("damping", [1.0, 0.6])
def test_fixed_steps_runs_max_iter_steps_and_returns_the_last_iterate(dtype, damping):
    rtol, atol = TOLERANCES[dtype]
    g = TanhMap(5, 3, norm=0.9, seed=2)
    f = Recorder(g)
    # tol=1 would stop a best-iterate solve at once; fixed steps run on.
    solver = FixedPoint(max_iter=6, tol=1.0, damping=damping, fixed_steps=True)
    result = solver(f, np.zeros((3, 5), dtype))
    iterates = picard_np(g.np, np.zeros((3, 5)), 6, damping=damping)  # z_0 .. z_6
    assert int(result.steps) == 6 and f.calls == 6
    np.testing.assert_allclose(np.asarray(result.state), iterates[6], rtol=rtol, atol=atol)
    abs_res, rel_res = residuals_np(g.np(iterates[5]), iterates[5])  # z_5, measured last
    np.testing.assert_allclose(np.asarray(result.abs_residual), abs_res, rtol=rtol * 10)
    np.testing.assert_allclose(np.asarray(result.rel_residual), rel_res, rtol=rtol * 10)
    np.testing.assert_array_equal(np.asarray(result.converged), rel_res <= 1.0)
    assert not np.any(np.asarray(result.nonfinite))


def test_fixed_steps_freezes_a_nonfinite_sample_at_its_last_finite_iterate():
    """Sample 1 overflows at its second evaluation: it keeps z_0, the last iterate whose
    residual was finite (its z_1 is finite, but f(z_1) is not); sample 0 runs all its steps."""
    scale = np.array([[0.5], [1e30]], "float32")

    def f(z):
        return z * const(scale, z) + 1.0

    result = FixedPoint(max_iter=5, fixed_steps=True, tol=1e-3)(f, np.ones((2, 3), "float32"))
    state = np.asarray(result.state)
    assert int(result.steps) == 5
    np.testing.assert_allclose(state[0], np.full(3, 2.0 - 1.0 / 32), rtol=1e-6)  # z_5
    np.testing.assert_array_equal(state[1], np.ones(3))
    np.testing.assert_array_equal(np.asarray(result.nonfinite), [False, True])
    assert not bool(np.asarray(result.converged)[1])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_prior", [True, False], ids=["prior", "no-prior"])
def test_sam_iterates_are_equation_11(dtype, with_prior):
    rtol, atol = TOLERANCES[dtype]
    g = TanhMap(4, 3, norm=0.8, seed=3)
    anchor = np.random.default_rng(4).normal(size=(3, 4))
    grad = (lambda z: z - const(anchor, z)) if with_prior else None
    grad_np = (lambda z: z - anchor) if with_prior else None
    z0 = np.random.default_rng(5).normal(size=(3, 4))
    solver = SAM(max_iter=7, rho=0.3, c=0.1, gamma=0.7)
    result = solver(g, z0.astype(dtype), prior_gradient=grad)
    want = sam_np(g.np, grad_np, z0, 7, rho=0.3, c=0.1, gamma=0.7)
    np.testing.assert_allclose(np.asarray(result.state), want, rtol=rtol, atol=atol)
    assert int(result.steps) == 7
    # Stopping at `tol` instead returns an earlier (the first converged) iterate.
    early = SAM(max_iter=7, rho=0.3, c=0.1, tol=0.5, fixed_steps=False)(g, z0.astype(dtype))
    assert int(early.steps) < 7


def test_sam_prior_gradient_sees_the_structure_of_the_state():
    """A list state: the prior's gradient gets (and returns) the list, as `f` does."""
    seen = []

    def grad(z):
        seen.append([tuple(t.shape) for t in z])
        return [z[0] - 1.0, z[1] + 1.0]

    def f(z):
        return [0.5 * z[0], 0.5 * z[1]]

    z0 = [np.zeros((2, 3), "float32"), np.zeros((2, 2, 2), "float32")]
    result = SAM(max_iter=4, gamma=0.5)(f, z0, prior_gradient=grad)
    assert seen[0] == [(2, 3), (2, 2, 2)]

    def f_np(z):
        return 0.5 * z

    def grad_np(z):
        return z - np.concatenate([np.ones((2, 3)), -np.ones((2, 4))], axis=1)

    flat = sam_np(f_np, grad_np, np.zeros((2, 7)), 4, rho=0.5, c=0.2, gamma=0.5)
    np.testing.assert_allclose(np.asarray(result.state[0]), flat[:, :3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(result.state[1]).reshape(2, 4), flat[:, 3:], rtol=1e-6)


def test_per_entry_hands_the_prior_gradient_the_unmerged_state():
    """With two batch axes the prior still gets `(batch, T, d)`; per-position priors give
    the same result as one solve over the whole state."""
    anchor = np.random.default_rng(6).normal(size=(2, 3, 4)).astype("float32")

    def grad(z):
        assert len(z.shape) == 3
        return z - const(anchor, z)

    def f(z):
        return 0.5 * ops.tanh(z)

    def solve(f, z0, **maps):
        return SAM(max_iter=5, gamma=0.4)(f, z0, **maps)

    z0 = np.zeros((2, 3, 4), "float32")
    per_position = common.per_entry(solve, 2)(f, z0, prior_gradient=grad)
    whole = solve(f, z0, prior_gradient=grad)
    np.testing.assert_allclose(np.asarray(per_position.state), np.asarray(whole.state), rtol=1e-6)
    assert tuple(per_position.converged.shape) == (6,)


def test_sam_config_round_trip_and_it_is_not_a_named_solver():
    solver = SAM(max_iter=12, tol=1e-3, stop_mode="abs", rho=0.4, c=0.1, gamma=0.05)
    config = solvers.serialize(solver)
    assert config["registered_name"] == "keras_deq>SAM"
    clone = solvers.get(config)
    assert type(clone) is SAM and clone.get_config() == solver.get_config()
    assert clone.get_config() == {
        "max_iter": 12,
        "tol": 1e-3,
        "stop_mode": "abs",
        "rho": 0.4,
        "c": 0.1,
        "gamma": 0.05,
        "fixed_steps": True,
    }
    assert "sam" not in registry.names() and SAM.name is None
    assert keras.saving.deserialize_keras_object(config).rho == 0.4
    assert FixedPoint(fixed_steps=True).get_config()["fixed_steps"] is True


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"rho": 0.0}, "rho"),
        ({"c": -0.1}, "c"),
        ({"rho": 0.6, "c": 0.3}, "rho \\+ 2c < 1"),
        ({"gamma": -1.0}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"fixed_steps": 1}, "fixed_steps"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_bad_sam_settings_are_refused_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SAM(**kwargs)


def test_a_prior_gradient_that_is_not_callable_is_refused():
    with pytest.raises(ValueError, match="prior_gradient"):
        SAM()(lambda z: z, np.zeros((1, 2), "float32"), prior_gradient=3.0)
    with pytest.raises(ValueError, match="fixed_steps"):
        FixedPoint(fixed_steps="yes")
