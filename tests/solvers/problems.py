"""24 fixed-point test problems from optimistix's and banax's test suites.

The problems are re-implemented here with `keras.ops` (so they run on any backend),
batch-first, from their definitions in:

- optimistix (github.com/patrick-kidger/optimistix), `tests/helpers.py`:
  `fixed_point_fn_init_args` (the fixed-point and root-find tests), three of the
  minimisation problems and the linear "Rosenbrock" least-squares problem, taken as
  the fixed point of a gradient step `z -> z - eta grad F(z)`, and `trivial`
  (root `y - 1`, also `test_root_via_lstsq`); `tests/test_best_so_far.py`
  (`tanh(y + 1)`); `tests/test_root_find.py` (`test_root_via_min`, as the fixed
  point of `z -> z - g(z)`).
- banax (github.com/RhizomeResearch/banax), `tests/conftest.py` and
  `tests/test_solvers.py`, `tests/test_adjoints.py`, `tests/test_regularization.py`.

Each problem knows its solution: in closed form where there is one, else from a
long float64 Picard iteration in plain numpy-facing code (`reference_by_picard`),
which shares nothing with the solvers. `picard` says whether plain fixed-point
iteration reaches `TOL` within `PICARD_BUDGET` iterations (it does not on the
non-contractive or very slowly contracting problems).

`iteration_table` runs every solver on every problem and returns the number of
evaluations of `f` each needed; `benchmarks/solvers.py --problems` prints it.
"""

import functools
from typing import Any, NamedTuple

import keras
import numpy as np
from keras import ops

TOL = 1e-8
"""Absolute tolerance (`stop_mode="abs"`) every problem is solved to, in float64."""

MAX_ITER = 300
"""Budget of the accelerated solvers."""

PICARD_BUDGET = 3000
"""Budget of plain fixed-point iteration (slowly contracting problems need thousands)."""

SOLVERS = {
    "fixed_point": ("fixed_point", {}),
    "anderson_m5": ("anderson", {"window": 5}),
    "anderson_m8": ("anderson", {"window": 8}),
    "broyden": ("broyden", {}),
}
"""Column name -> (solver name, settings) of the iteration-count table."""


class Problem(NamedTuple):
    """A fixed-point problem `f(z) = z` with a known solution.

    Attributes:
        name: Short identifier.
        source: Where the problem comes from.
        fn: The map, on structures like `z0` (batch-first), written with `keras.ops`.
        z0: The starting point, a numpy float64 structure (batch-first).
        solution: The fixed point, a structure like `z0` (float64).
        picard: Whether plain fixed-point iteration converges within `PICARD_BUDGET`.
        error_factor: Bound on `||z - z*|| / ||f(z) - z||` near the solution (the
            norm of `(I - f'(z*))^{-1}`, rounded up), for checking returned states.
    """

    name: str
    source: str
    fn: Any
    z0: Any
    solution: Any
    picard: bool = True
    error_factor: float = 10.0


# ------------------------------------------------------------------ helpers
def _const(value, like):
    """A numpy constant as a tensor of `like`'s dtype."""
    return ops.convert_to_tensor(
        np.asarray(value), dtype=keras.backend.standardize_dtype(like.dtype)
    )


def _raveled(vector_map, z0):
    """Wraps `vector_map`, a map of `(batch, n)` matrices, as a map of structures
    like `z0` (leaves flattened in `keras.tree.flatten` order, as `ravel_pytree`
    flattens them)."""
    shapes = [np.shape(leaf)[1:] for leaf in keras.tree.flatten(z0)]
    sizes = [int(np.prod(shape)) for shape in shapes]
    bounds = np.cumsum([0, *sizes])

    def fn(z):
        flat = [
            ops.reshape(t, (-1, size)) for t, size in zip(keras.tree.flatten(z), sizes, strict=True)
        ]
        out = vector_map(flat[0] if len(flat) == 1 else ops.concatenate(flat, axis=1))
        leaves = [
            ops.reshape(out[:, start:stop], (-1, *shape))
            for start, stop, shape in zip(bounds[:-1], bounds[1:], shapes, strict=True)
        ]
        return keras.tree.pack_sequence_as(z0, leaves)

    return fn


def _like(z0, value):
    """A structure like `z0` filled with `value` (a scalar or a `(batch, n)` matrix
    split over the leaves in flattening order)."""
    leaves = keras.tree.flatten(z0)
    if np.ndim(value) == 0:
        return keras.tree.pack_sequence_as(z0, [np.full(np.shape(t), float(value)) for t in leaves])
    value = np.asarray(value, np.float64)
    out, start = [], 0
    for t in leaves:
        size = int(np.prod(np.shape(t)[1:]))
        out.append(value[:, start : start + size].reshape(np.shape(t)))
        start += size
    return keras.tree.pack_sequence_as(z0, out)


def flatten(structure):
    """A structure of `(batch, ...)` arrays or tensors as one `(batch, n)` float64 array."""
    leaves = [
        np.asarray(ops.convert_to_numpy(t), np.float64) for t in keras.tree.flatten(structure)
    ]
    return np.concatenate([t.reshape(t.shape[0], -1) for t in leaves], axis=1)


def reference_by_picard(fn, z0, iters=500):
    """The fixed point of a contraction by a long float64 Picard iteration."""
    z = keras.tree.map_structure(lambda t: np.asarray(t, np.float64), z0)
    for _ in range(iters):
        z = keras.tree.map_structure(lambda t: np.asarray(ops.convert_to_numpy(t)), fn(z))
    return z


def _gradient_step(grad, eta):
    """`z -> z - eta grad F(z)` for a list-of-leaves state `[y, z]`."""

    def fn(state):
        return [t - eta * d for t, d in zip(state, grad(*state), strict=True)]

    return fn


# ------------------------------------------------------------------ problems
_ONES_PYTREE = ({"a": np.full((1, 3, 2, 4), 0.5)}, np.full((1, 4), 0.5))  # 28 entries
_ROBERTSON_Z0 = (np.ones((1, 2)), {"b": np.ones((1,))})  # 3 entries
_K1, _K2, _K3 = 0.04, 3e7, 1e4  # Robertson's rate constants


def _robertson(y):
    """Robertson's stiff chemical kinetics, the right-hand side (autonomous)."""
    y0, y1, y2 = y[:, 0:1], y[:, 1:2], y[:, 2:3]
    return ops.concatenate(
        [
            -_K1 * y0 + _K3 * y1 * y2,
            _K1 * y0 - _K2 * y1**2 - _K3 * y1 * y2,
            _K2 * y1**2,
        ],
        axis=1,
    )


def _mlp_weights():
    # optimistix's `_nn`: an MLP of width 8 and depth 1 with softplus, scaled by 0.1;
    # weights drawn like Equinox's default (uniform in +-1/sqrt(fan_in)).
    rng = np.random.default_rng(42)
    n, width = 28, 8
    lim1, lim2 = 1 / np.sqrt(n), 1 / np.sqrt(width)
    return (
        rng.uniform(-lim1, lim1, (n, width)),
        rng.uniform(-lim1, lim1, (width,)),
        rng.uniform(-lim2, lim2, (width, n)),
        rng.uniform(-lim2, lim2, (n,)),
    )


def _mlp(y):
    w1, b1, w2, b2 = (_const(a, y) for a in _mlp_weights())
    return 0.1 * (ops.matmul(ops.softplus(ops.matmul(y, w1) + b1), w2) + b2)


def _midpoint_matrix():
    return np.random.default_rng(19).standard_normal((28, 28))


def _heat(y):
    # optimistix's `_nonlinear_heat_pde`: one Crank-Nicolson step (dt = 1) of
    # dy/dt = (1 - y) Laplacian(y) from y0 = x^2, as that test evaluates it: its
    # Laplacian helper returns its input, so the step acts entry by entry.
    y0 = _const(np.linspace(-1.0, 1.0, 100) ** 2, y)[None, :]
    return y0 + 0.5 * ((1.0 - y) * y + (1.0 - y0) * y0)


def _heat_solution():
    # y = y0 + (y - y^2)/2 + (y0 - y0^2)/2  <=>  y^2 + y - (3 y0 - y0^2) = 0.
    y0 = np.linspace(-1.0, 1.0, 100) ** 2
    return ((-1.0 + np.sqrt(1.0 + 4.0 * (3.0 * y0 - y0**2))) / 2.0)[None, :]


def _matyas_grad(y, z):
    return 0.52 * y - 0.48 * z, 0.52 * z - 0.48 * y


def _himmelblau_grad(y, z):
    a, b = y**2 + z - 11.0, y + z**2 - 7.0
    return 4.0 * y * a + 2.0 * b, 2.0 * a + 4.0 * z * b


def _beale_grad(y, z):
    t1, t2, t3 = 1.5 - y + y * z, 2.25 - y + y * z**2, 2.625 - y + y * z**3
    return (
        2.0 * t1 * (z - 1.0) + 2.0 * t2 * (z**2 - 1.0) + 2.0 * t3 * (z**3 - 1.0),
        2.0 * y * (t1 + 2.0 * t2 * z + 3.0 * t3 * z**2),
    )


def _rosenbrock_grad(y, z):
    # optimistix's least-squares `rosenbrock` residuals (100 (y1 - y0), 1 - y0):
    # F = ||r||^2 / 2, a quadratic whose Hessian has condition number 4e4.
    return -1e4 * (z - y) - (1.0 - y), 1e4 * (z - y)


def _root_via_min(state):
    # optimistix's `test_root_via_min` roots g = (tanh(a + 0.1), tanh(b - 0.5),
    # tanh(2 c)), as the fixed point of z -> z - g(z). Its last entry has
    # derivative -1 at the root: plain iteration converges only sublinearly.
    a, bc = state
    b, c = bc[:, 0:1], bc[:, 1:2]
    return (
        a - ops.tanh(a + 0.1),
        ops.concatenate([b - ops.tanh(b - 0.5), c - ops.tanh(2.0 * c)], axis=1),
    )


def _affine(z):
    a = _const([[0.0, 0.25], [0.25, 0.0]], z)
    return ops.matmul(z, ops.transpose(a)) + _const([[1.0, 2.0]], z)


def _scalar(value):
    return np.full((1, 1), float(value))


def _build():
    mid = _midpoint_matrix()
    problems = [
        # ---------------------------------------------------------------- optimistix
        Problem(
            "optx_cos",
            "optimistix tests/helpers.py _cos (fixed_point_fn_init_args)",
            _raveled(ops.cos, _ONES_PYTREE),
            _ONES_PYTREE,
            _like(_ONES_PYTREE, 0.7390851332151607),  # the Dottie number
        ),
        Problem(
            "optx_exp",
            "optimistix tests/helpers.py _exponential",
            _raveled(lambda y: ops.exp(-y), _ONES_PYTREE),
            _ONES_PYTREE,
            _like(_ONES_PYTREE, 0.5671432904097838),  # the omega constant
        ),
        Problem(
            "optx_mlp",
            "optimistix tests/helpers.py _nn (0.1 x softplus MLP, width 8)",
            _raveled(_mlp, _ONES_PYTREE),
            _ONES_PYTREE,
            None,  # by Picard, below
        ),
        Problem(
            "optx_heat",
            "optimistix tests/helpers.py _nonlinear_heat_pde",
            _heat,
            np.ones((1, 100)),
            _heat_solution(),
        ),
        Problem(
            "optx_midpoint_y_linear",
            "optimistix tests/helpers.py _midpoint_y_linear (dt/2 M z)",
            _raveled(lambda y: ops.matmul(y, _const(mid.T / 32.0, y)), _ONES_PYTREE),
            _ONES_PYTREE,
            _like(_ONES_PYTREE, 0.0),
        ),
        Problem(
            "optx_midpoint_fk_linear",
            "optimistix tests/helpers.py _midpoint_f_linear = _midpoint_k_linear (dt M z)",
            _raveled(lambda y: ops.matmul(y, _const(mid.T / 16.0, y)), _ONES_PYTREE),
            _ONES_PYTREE,
            _like(_ONES_PYTREE, 0.0),
        ),
        Problem(
            "optx_robertson_y",
            "optimistix tests/helpers.py _midpoint_y_nonlinear (Robertson, dt 1e-8)",
            _raveled(lambda y: 1e-8 * _robertson(0.5 * y), _ROBERTSON_Z0),
            _ROBERTSON_Z0,
            _like(_ROBERTSON_Z0, 0.0),
        ),
        Problem(
            "optx_robertson_f",
            "optimistix tests/helpers.py _midpoint_f_nonlinear",
            _raveled(lambda y: _robertson(1e-8 * y), _ROBERTSON_Z0),
            _ROBERTSON_Z0,
            _like(_ROBERTSON_Z0, 0.0),
        ),
        Problem(
            "optx_robertson_k",
            "optimistix tests/helpers.py _midpoint_k_nonlinear",
            _raveled(lambda y: 1e-8 * _robertson(y), _ROBERTSON_Z0),
            _ROBERTSON_Z0,
            _like(_ROBERTSON_Z0, 0.0),
        ),
        Problem(
            "optx_tanh",
            "optimistix tests/test_best_so_far.py tanh(y + 1)",
            lambda y: ops.tanh(y + 1.0),
            _scalar(0.0),
            None,
        ),
        Problem(
            "optx_root_via_min",
            "optimistix tests/test_root_find.py test_root_via_min, z - g(z)",
            _root_via_min,
            (np.full((1, 1), 0.5), np.array([[-0.3, 0.7]])),
            (np.full((1, 1), -0.1), np.array([[0.5, 0.0]])),
            picard=False,
        ),
        Problem(
            "optx_trivial",
            "optimistix tests/helpers.py trivial (root y - 1), z - g(z) = 1",
            lambda y: ops.ones_like(y),
            _scalar(0.0),
            _scalar(1.0),
        ),
        Problem(
            "optx_matyas_gd",
            "optimistix tests/helpers.py matyas, gradient step eta = 1",
            _gradient_step(_matyas_grad, 1.0),
            [_scalar(6.0), _scalar(6.0)],
            [_scalar(0.0), _scalar(0.0)],
            error_factor=30.0,
        ),
        Problem(
            "optx_himmelblau_gd",
            "optimistix tests/helpers.py _himmelblau, gradient step eta = 0.01",
            _gradient_step(_himmelblau_grad, 0.01),
            [_scalar(2.0), _scalar(2.5)],
            [_scalar(3.0), _scalar(2.0)],
        ),
        Problem(
            "optx_beale_gd",
            "optimistix tests/helpers.py beale, gradient step eta = 0.02",
            _gradient_step(_beale_grad, 0.02),
            [_scalar(2.0), _scalar(0.0)],
            [_scalar(3.0), _scalar(0.5)],
            error_factor=200.0,
        ),
        Problem(
            "optx_rosenbrock_gd",
            "optimistix tests/helpers.py rosenbrock (least squares), gradient step eta = 5e-5",
            _gradient_step(_rosenbrock_grad, 5e-5),
            [_scalar(1.5), _scalar(1.5)],
            [_scalar(1.0), _scalar(1.0)],
            picard=False,
            error_factor=5e4,
        ),
        # --------------------------------------------------------------------- banax
        Problem(
            "banax_linear_05",
            "banax tests/conftest.py linear, a = 0.5, b = 1",
            lambda z: 0.5 * z + 1.0,
            _scalar(0.0),
            _scalar(2.0),
        ),
        Problem(
            "banax_linear_09",
            "banax tests/test_solvers.py test_fewer_steps_than_picard, a = 0.9",
            lambda z: 0.9 * z + 1.0,
            _scalar(0.0),
            _scalar(10.0),
        ),
        Problem(
            "banax_linear_03",
            "banax tests/test_regularization.py scalar_contraction, a = 0.3",
            lambda z: 0.3 * z + 1.0,
            _scalar(0.0),
            _scalar(1.0 / 0.7),
        ),
        Problem(
            "banax_affine",
            "banax tests/conftest.py affine, A = [[0, .25], [.25, 0]], b = [1, 2]",
            _affine,
            np.zeros((1, 2)),
            np.linalg.solve(np.eye(2) - [[0.0, 0.25], [0.25, 0.0]], [1.0, 2.0])[None, :],
        ),
        Problem(
            "banax_pytree",
            "banax tests/conftest.py pytree_f",
            lambda z: {"a": 0.5 * z["a"] + 1.0, "b": 0.25 * z["b"] + 3.0},
            {"a": np.zeros((1,)), "b": np.zeros((1,))},
            {"a": np.full((1,), 2.0), "b": np.full((1,), 4.0)},
        ),
        Problem(
            "banax_tanh_05",
            "banax tests/test_adjoints.py test_jfb_differs_from_bptt, tanh(z + 0.5)",
            lambda z: ops.tanh(z + 0.5),
            _scalar(0.0),
            None,
        ),
        Problem(
            "banax_tanh_07",
            "banax tests/test_adjoints.py TestGDEQ, tanh(0.7 z + 0.3)",
            lambda z: ops.tanh(0.7 * z + 0.3),
            _scalar(0.0),
            None,
        ),
        Problem(
            "banax_expanding",
            "banax tests/test_solvers.py test_nan_stops_iteration, 10 z from 1",
            lambda z: 10.0 * z,
            _scalar(1.0),
            _scalar(0.0),
            picard=False,
        ),
    ]
    return [
        p._replace(solution=reference_by_picard(p.fn, p.z0)) if p.solution is None else p
        for p in problems
    ]


@functools.cache
def problems():
    """The 24 problems (built once)."""
    return tuple(_build())


def by_name(name):
    return next(p for p in problems() if p.name == name)


def zero_solution(problem):
    return bool(np.all(flatten(problem.solution) == 0.0))


def cast(structure, dtype):
    """A numpy structure as backend tensors of `dtype`."""
    return keras.tree.map_structure(lambda t: ops.convert_to_tensor(t, dtype=dtype), structure)


def solve(problem, name, settings=None, dtype="float64", tol=TOL, max_iter=None):
    """Runs solver `name` (with `settings`) on `problem` from its `z0`.

    Returns:
        The `SolverResult`.
    """
    from keras_deq import solvers

    budget = max_iter or (PICARD_BUDGET if name == "fixed_point" else MAX_ITER)
    solver = solvers.get(name, max_iter=budget, tol=tol, stop_mode="abs", **(settings or {}))
    return solver(problem.fn, cast(problem.z0, dtype))


def evaluations(result):
    """Evaluations of `f` a run needed, or None if it did not converge."""
    converged = bool(np.all(ops.convert_to_numpy(result.converged)))
    return int(ops.convert_to_numpy(result.steps)) if converged else None


def iteration_table(columns=None, **kwargs):
    """`{problem name: {column: evaluations or None}}` over `SOLVERS` (or `columns`,
    a dict like `SOLVERS`); `kwargs` go to `solve`."""
    columns = columns or SOLVERS
    return {
        p.name: {
            column: evaluations(solve(p, name, settings, **kwargs))
            for column, (name, settings) in columns.items()
        }
        for p in problems()
    }


def format_table(table):
    """The iteration table as markdown rows (`-` where a solver did not converge)."""
    columns = list(next(iter(table.values())))
    lines = ["| problem | " + " | ".join(columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for name, row in table.items():
        cells = ["-" if row[c] is None else str(row[c]) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
