"""The 24 fixed-point test problems of optimistix's and banax's test suites.

Every solver reaches each problem's known solution (plain fixed-point iteration where
it converges), and Anderson's step counts are pinned: the numbers in the comments are
evaluations of `f` to `problems.TOL` (float64, `stop_mode="abs"`). The whole table is
printed by `python benchmarks/solvers.py --problems` and recorded in docs/benchmarks.md.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_deq import solvers

from . import problems as P

PROBLEMS = P.problems()
# Plain iteration needs 426 and 2021 evaluations on these two (a few seconds each).
SLOW_PICARD = ("optx_matyas_gd", "optx_beale_gd")


def _cases():
    for p in PROBLEMS:
        for column in P.SOLVERS:
            if column == "fixed_point" and not p.picard:
                continue
            slow = column == "fixed_point" and p.name in SLOW_PICARD
            yield pytest.param(p, column, id=f"{p.name}-{column}", marks=[pytest.mark.slow] * slow)


def _numpy(t):
    return np.asarray(ops.convert_to_numpy(t))


_RESULTS = {}


def _run(problem, column):
    """The result of a `problems.SOLVERS` column on a problem, computed once per session."""
    key = (problem.name, column)
    if key not in _RESULTS:
        name, settings = P.SOLVERS[column]
        _RESULTS[key] = P.solve(problem, name, settings)
    return _RESULTS[key]


def test_there_are_24_problems_with_distinct_names():
    assert len({p.name for p in PROBLEMS}) == len(PROBLEMS) == 24


@pytest.mark.parametrize("problem, column", _cases())
@pytest.mark.float64  # the table is in float64 (abs tol 1e-8)
def test_solver_reaches_the_known_solution(problem, column):
    result = _run(problem, column)
    assert bool(np.all(_numpy(result.converged))), f"{column} did not converge"
    assert np.max(_numpy(result.abs_residual)) <= P.TOL
    # The returned state has z0's structure and is the solution, to the residual times
    # a bound on ||(I - f'(z*))^{-1}||.
    assert [np.shape(t) for t in keras.tree.flatten(result.state)] == [
        np.shape(t) for t in keras.tree.flatten(problem.z0)
    ]
    error = np.max(np.abs(P.flatten(result.state) - P.flatten(problem.solution)))
    assert error <= P.TOL * problem.error_factor, error


@pytest.mark.slow
@pytest.mark.parametrize("problem", [p for p in PROBLEMS if not p.picard], ids=lambda p: p.name)
@pytest.mark.float64  # the table is in float64 (abs tol 1e-8)
def test_fixed_point_fails_where_the_table_says_so(problem):
    # Not a contraction (banax_expanding), derivative -1 at the root (optx_root_via_min),
    # or contraction factor 1 - 2.5e-5 (optx_rosenbrock_gd).
    result = P.solve(problem, "fixed_point")
    assert not bool(np.all(_numpy(result.converged)))


@pytest.mark.float64  # the table is in float64 (abs tol 1e-8)
def test_solution_references_are_fixed_points():
    # Independent of the solvers: each reference solution is a fixed point of its map.
    for p in PROBLEMS:
        z = P.flatten(p.solution)
        fz = P.flatten(p.fn(P.cast(p.solution, "float64")))
        assert np.max(np.abs(fz - z)) <= 1e-12, p.name


@pytest.fixture(scope="module")
def anderson_counts():
    # The runs of test_solver_reaches_the_known_solution, when it ran first.
    return {
        p.name: {key: P.evaluations(_run(p, f"anderson_{key}")) for key in ("m5", "m8")}
        for p in PROBLEMS
    }


@pytest.mark.float64  # the table is in float64 (abs tol 1e-8)
def test_anderson_solves_the_linear_map_in_four_evaluations():
    # banax's 0.5 z + 1 to 1e-8: the secant extrapolation from z0, z1 lands on 2 (up to
    # the ridge), which z3 confirms. With the old ridge (1e-4 of the window's mean
    # ||g||^2) it took 8 evaluations, 3 with ridge=0.
    problem = P.by_name("banax_linear_05")
    for ridge in (1e-4, 0.0):
        result = P.solve(problem, "anderson", {"ridge": ridge})
        assert P.evaluations(result) <= 4, ridge


@pytest.mark.parametrize("name", ["optx_matyas_gd", "banax_expanding"])
def test_float32_anderson_reaches_a_zero_solution(name):
    # Solution 0 in float32, to an absolute 1e-20: the system is scaled to unit diagonal,
    # so there is no floor under which the weights turn to averages. The old 1e-20 floor
    # on the normalization stalled them at 4e-15 and 4e-14 for 200 iterations.
    problem = P.by_name(name)
    result = P.solve(problem, "anderson", dtype="float32", tol=1e-20, max_iter=200)
    assert bool(np.all(_numpy(result.converged)))
    assert P.evaluations(result) <= 10
    assert np.max(np.abs(P.flatten(result.state))) <= 1e-18


@pytest.mark.float64  # the table is in float64 (abs tol 1e-8)
def test_window_8_is_not_worse_than_window_5(anderson_counts):
    # On all 24 problems at the time of writing (better on optx_heat and
    # optx_midpoint_fk_linear); with the old ridge window 8 was worse on 20 of them.
    not_worse = [n for n, row in anderson_counts.items() if row["m8"] <= row["m5"]]
    assert len(not_worse) >= 23, sorted(set(anderson_counts) - set(not_worse))


@pytest.mark.float64  # the table is in float64 (abs tol 1e-8)
def test_anderson_total_evaluations(anderson_counts):
    # 177 evaluations (window 5) and 175 (window 8) over the 24 problems; 277 and 354
    # with the old ridge.
    assert all(row["m5"] is not None and row["m8"] is not None for row in anderson_counts.values())
    assert sum(row["m5"] for row in anderson_counts.values()) <= 185
    assert sum(row["m8"] for row in anderson_counts.values()) <= 185


@pytest.mark.float64  # the table is in float64 (abs tol 1e-8)
def test_anderson_is_the_secant_method_in_one_dimension():
    # In 1-D every difference after the newest is dependent: it is left out, so a long
    # window costs nothing and Anderson is the secant method (6 evaluations on tanh(z+1)).
    problem = P.by_name("optx_tanh")
    counts = {w: P.evaluations(P.solve(problem, "anderson", {"window": w})) for w in (2, 5, 8, 20)}
    assert len(set(counts.values())) == 1, counts
    assert counts[2] <= 6


@pytest.mark.float64  # the table is in float64 (abs tol 1e-8)
def test_anderson_matches_a_numpy_reference_with_filtering():
    # A window longer than the dimension (2 unknowns, window 8): filtering drops the
    # dependent differences. The iterates agree with the documented math in numpy.
    from .helpers import Recorder, anderson_np

    problem = P.by_name("banax_affine")
    a, b = np.array([[0.0, 0.25], [0.25, 0.0]]), np.array([[1.0, 2.0]])

    def f_np(z):
        return np.tanh(z @ a.T + b)

    def f(z):
        return ops.tanh(problem.fn(z))

    recorder = Recorder(f)
    solvers.anderson(recorder, P.cast(problem.z0, "float64"), max_iter=7, tol=1e-300, window=8)
    expected = anderson_np(f_np, np.zeros((1, 2)), 6, 8, 1.0, 1e-4)
    for k, (got, want) in enumerate(zip(recorder.inputs, expected, strict=True)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"iterate {k}")
