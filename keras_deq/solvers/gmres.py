"""GMRES: the restarted Krylov solver of affine fixed points (the implicit adjoint)."""

import keras
import numpy as np
from keras import ops

from keras_deq import backend
from keras_deq.solvers import common
from keras_deq.solvers import result as res
from keras_deq.solvers.base import Solver, _differentiable_bound


@keras.saving.register_keras_serializable(package="keras_deq")
class GMRES(Solver):
    """Restarted GMRES for affine maps: solves `u = h(u)` with `h(u) = A u + b`.

    The fixed point of an affine map `h` is the solution of the linear system
    `(I - A) u = b`, with `b = h(0)` and `A v = h(v) - h(0)`. This is the adjoint
    system of the implicit gradient, `u = J^T u + g`, which `keras_deq.DEQ` solves
    with its backward solver: `DEQ(..., backward_solver="gmres")` or
    `backward=keras_deq.backward.Implicit(solver="gmres")`. GMRES minimizes the
    residual `||h(u) - u||` over a Krylov space that grows by one vector per
    evaluation of `h`, so it converges wherever `I - A` is invertible (in at most
    `restart` evaluations per cycle on a problem of that dimension), also where
    fixed-point iteration diverges (an eigenvalue of `J` outside the unit disk),
    and it needs no tuning beyond `restart`.

    **Affine maps only.** The solver reads `A v` off differences of `h`, which is
    exact only for an affine `h`. A DEQ's cell is not affine, so `DEQ` refuses it
    as the forward solver (`solver="gmres"`: a `ValueError`); called directly on a
    non-affine map it still returns its best measured iterate with honest
    residuals, but is not expected to converge.

    Each sample of the batch is its own linear system, with its own Krylov basis,
    cycle and stopping test, as the fixed-point solvers treat rows: a sample's
    result does not depend on the rest of the batch. A cycle evaluates `h` once at
    its starting iterate `x` (measuring its residual `r = h(x) - x`, which the
    result's residuals, best iterate and `converged` come from, as for the other
    solvers) and then once per Krylov vector `v_j`, at `x + c v_j` with `c` of the
    size of `x` and `h(x)` (so that `A v_j = (h(x + c v_j) - h(x)) / c` keeps the
    precision of `h`). Orthogonalization is classical Gram-Schmidt applied twice;
    the small least-squares problem is kept triangular by Givens rotations, which
    give the residual of the current Krylov iterate without evaluating `h`. When
    that estimate meets `tol`, after `restart` Krylov vectors, or before the last
    allowed evaluation, the sample forms its iterate and measures it with the next
    evaluation; if the measured residual misses `tol`, a new cycle starts there.
    So `steps` counts evaluations of `h` (matrix-vector products and one
    measurement per cycle), every returned state was measured, and the last
    evaluation of a solve stopped by `max_iter` is a measurement.

    The loop runs in the solver's float32 or float64, with `keras.ops` only, and
    keeps `(batch, restart, n)` Krylov vectors. A sample whose `h` gives NaN or Inf
    is frozen at its best finite iterate, as in the other solvers.

    Args:
        max_iter: Maximum number of evaluations of `h`.
        tol: Tolerance on the per-sample residual named by `stop_mode`.
        stop_mode: `"rel"` for `||h(u) - u|| / ||h(u)||`, `"abs"` for `||h(u) - u||`.
        restart: Krylov vectors per cycle (the `m` of GMRES(m)), a positive integer.
            Larger converges in fewer evaluations on hard systems, at `O(m n)`
            memory and work per evaluation.

    Examples:
        >>> from keras import ops
        >>> a = ops.convert_to_tensor([[0.0, 2.0], [-2.0, 0.0]])  # eigenvalues +-2i
        >>> h = lambda u: ops.matmul(u, a) + 1.0  # fixed-point iteration diverges
        >>> result = GMRES(tol=1e-6)(h, ops.zeros((1, 2)))
        >>> bool(ops.all(result.converged)), int(result.steps)
        (True, 4)
        >>> [round(v, 4) for v in ops.convert_to_numpy(result.state)[0].tolist()]
        [-0.2, 0.6]
    """

    name = "gmres"
    affine_only = True

    def __init__(self, max_iter=50, tol=1e-4, stop_mode="rel", restart=20):
        super().__init__(max_iter, tol, stop_mode)
        self.restart = common.check_positive_int("restart", restart)

    def solve_flat(self, f, z0, unpack=None):
        """The GMRES loop on `(batch, n)` matrices; see the class docstring.

        Args:
            f: The affine map on `(batch, n)` matrices.
            z0: The starting iterate, `(batch, n)`, float32 or float64.
            unpack: Applied to the returned state (identity if None).

        Returns:
            A `SolverResult`.
        """
        tol, stop_mode, m = self.tol, self.stop_mode, self.restart
        max_iter = common.loop_bound(self.max_iter)
        bound = _differentiable_bound(max_iter)
        dtype = keras.backend.standardize_dtype(z0.dtype)
        tiny = res.tiny_for(dtype)
        slots = ops.arange(m, dtype="int32")
        slots1 = ops.arange(m + 1, dtype="int32")
        upper = ops.convert_to_tensor(np.triu(np.ones((m, m), dtype=bool)))
        eye = ops.convert_to_tensor(np.eye(m, dtype=dtype))
        eye1 = ops.convert_to_tensor(np.eye(m + 1, dtype=dtype))

        def norm(t):
            return ops.sqrt(res.row_sums(t * t))

        def body(k, p, measuring, x, hx, c, v, basis, qt, tri, beta, j, best, go):
            fp = f(p)
            # 1. The residual of the evaluated point: the measurement of an iterate.
            residual = res.residuals(fp, p)
            abs_res = residual.abs_residual
            finite = ops.isfinite(abs_res)
            measured = res.update_best(best, p, abs_res, residual.rel_residual, stop_mode, tol)
            best = res.Best(
                *res.where_rows(measuring, measured[:3], best[:3]), best.failed | ~finite
            )
            # A non-finite image is replaced by `p` (its sample is frozen from now on), so
            # that its row of the Krylov state stays finite.
            fp = res.where_rows(finite, fp, p)
            last = k + 2 >= max_iter  # the next evaluation is the last: a measurement

            # 2. Samples that measured an iterate: a new cycle from it (or stay, if done).
            r = fp - p
            beta_new = norm(r)
            v0 = r / ops.where(beta_new > tiny, beta_new, 1.0)[:, None]
            c_new = norm(p) + norm(fp)
            c_new = ops.where(c_new > tiny, c_new, 1.0)
            stay = res.converged(best, tol, stop_mode) | best.failed | last

            # 3. Samples in a cycle: one Arnoldi step with A v_j = (h(x + c v_j) - h(x)) / c.
            w = v - (fp - hx) / c[:, None]
            valid = ops.cast(slots[None, :] <= j[:, None], dtype)
            coefficients = ops.zeros_like(valid)
            for _ in range(2):  # classical Gram-Schmidt, twice
                projection = ops.einsum("bmn,bn->bm", basis, w) * valid
                w = w - ops.einsum("bm,bmn->bn", projection, basis)
                coefficients = coefficients + projection
            beta_next = norm(w)
            v_next = w / ops.where(beta_next > tiny, beta_next, 1.0)[:, None]
            is_j = slots1[None, :] == j[:, None]
            is_j1 = slots1[None, :] == j[:, None] + 1
            column = ops.concatenate([coefficients, ops.zeros_like(coefficients[:, :1])], axis=1)
            column = ops.where(is_j1, beta_next[:, None], column)
            # The rotations so far (qt, applied to a column at once), then the new one.
            rotated = ops.einsum("bij,bj->bi", qt, column)
            a = ops.sum(ops.where(is_j, rotated, 0.0), axis=1)
            radius = ops.sqrt(a * a + beta_next * beta_next)
            safe = ops.where(radius > tiny, radius, 1.0)
            cos = ops.where(radius > tiny, a / safe, 1.0)[:, None]
            sin = ops.where(radius > tiny, beta_next / safe, 0.0)[:, None]
            row_j = ops.einsum("bi,bij->bj", ops.cast(is_j, dtype), qt)
            row_j1 = ops.einsum("bi,bij->bj", ops.cast(is_j1, dtype), qt)
            qt_next = ops.where(is_j[:, :, None], (cos * row_j + sin * row_j1)[:, None, :], qt)
            qt_next = ops.where(
                is_j1[:, :, None], (cos * row_j1 - sin * row_j)[:, None, :], qt_next
            )
            rotated = ops.where(is_j, radius[:, None], ops.where(is_j1, 0.0, rotated))
            tri_next = ops.where(is_j[:, None, :m], rotated[:, :m, None], tri)
            g = beta[:, None] * qt_next[:, :, 0]  # Q^T (beta e_1)
            estimate = ops.abs(ops.sum(ops.where(is_j1, g, 0.0), axis=1))
            # The Krylov iterate x_j = x + V y, R y = g (columns past j: identity, y = 0).
            active = slots[None, :] <= j[:, None]
            diagonal = ops.diagonal(tri_next, axis1=1, axis2=2)
            diagonal = ops.where(active & (diagonal != 0.0), diagonal, 1.0)
            system = ops.where(active[:, None, :] & upper[None], tri_next, 0.0)
            system = system * (1.0 - eye) + eye * diagonal[:, None, :]
            rhs = ops.where(active, g[:, :m], 0.0)
            y = ops.solve_triangular(system, rhs[:, :, None], lower=False)[:, :, 0]
            x_next = x + ops.einsum("bm,bmn->bn", y, basis)
            # ||h(x_j)|| >= ||x_j|| - ||r_j||, for the relative estimate.
            estimate_rel = res.relative(estimate, ops.maximum(norm(x_next) - estimate, 0.0))
            done = res.criterion(estimate, estimate_rel, stop_mode) <= tol
            switch = done | (j + 1 >= m) | last

            # 4. The next point: an iterate to measure, or the next Krylov probe.
            measuring_next = ops.where(measuring, stay, switch)
            probe = res.where_rows(measuring, p + c_new[:, None] * v0, x + c[:, None] * v_next)
            p_next = res.where_rows(measuring_next, res.where_rows(measuring, p, x_next), probe)
            # The cycle's state: restarted where an iterate was measured, else advanced.
            v = res.where_rows(measuring, v0, v_next)
            slot = ops.where(measuring, 0, ops.minimum(j + 1, m - 1))
            basis = ops.where((slots[None, :] == slot[:, None])[:, :, None], v[:, None, :], basis)
            x = res.where_rows(measuring, p, x)
            hx = res.where_rows(measuring, fp, hx)
            c = ops.where(measuring, c_new, c)
            qt = ops.where(measuring[:, None, None], eye1[None], qt_next)
            tri = res.where_rows(measuring, tri, tri_next)
            beta = ops.where(measuring, beta_new, beta)
            j = ops.where(measuring, 0, j + 1)
            p_next, best = res.guard(best, p_next)
            go = res.keep_going(best, tol, stop_mode)
            return k + 1, p_next, measuring_next, x, hx, c, v, basis, qt, tri, beta, j, best, go

        def cond(k, *loop_vars):
            return ops.logical_and(loop_vars[-1], k < max_iter)

        batch = ops.shape(z0)[0]
        ones = ops.ones((batch,), dtype=dtype)
        loop_vars = (
            ops.convert_to_tensor(0, "int32"),
            z0,
            ops.ones((batch,), dtype="bool"),
            z0,
            ops.zeros_like(z0),
            ones,
            ops.zeros_like(z0),
            ops.zeros((batch, m, ops.shape(z0)[1]), dtype=dtype),
            ops.broadcast_to(eye1, (batch, m + 1, m + 1)),
            ops.zeros((batch, m, m), dtype=dtype),
            ops.zeros_like(ones),
            ops.zeros((batch,), dtype="int32"),
            res.initial_best(z0),
            ops.convert_to_tensor(True),
        )
        if bound is None:
            out = ops.while_loop(cond, body, loop_vars, maximum_iterations=max_iter)
        else:
            out = backend.masked_while_loop(cond, body, loop_vars, bound)
        steps, best = out[0], out[-2]
        return res.to_result(best, steps, tol, stop_mode, unpack or (lambda z: z))


def gmres(f, z0, max_iter=50, tol=1e-4, stop_mode="rel", restart=20):
    """Restarted GMRES for an affine map `f`: the fixed point of `f(u) = A u + b`.

    The function form of `GMRES(max_iter, tol, stop_mode, restart)(f, z0)`: solves
    `(I - A) u = b` per sample, with `restart` Krylov vectors per cycle. Correct for
    affine maps only (the adjoint of the implicit gradient); see `GMRES`.

    Args:
        f: The affine map, taking and returning a structure like `z0`.
        z0: The initial state: a `(batch, ...)` tensor or a nest of such tensors.
        max_iter: Maximum number of evaluations of `f`.
        tol: Tolerance on the per-sample residual named by `stop_mode`.
        stop_mode: `"rel"` for `||f(u) - u|| / ||f(u)||`, `"abs"` for `||f(u) - u||`.
        restart: Krylov vectors per cycle, a positive integer.

    Returns:
        A `SolverResult`.

    Examples:
        >>> from keras import ops
        >>> result = gmres(lambda u: -3.0 * u + 4.0, ops.zeros((2, 3)), tol=1e-6)
        >>> bool(ops.all(result.converged)), int(result.steps)
        (True, 3)
    """
    common.check_callable("f", f)
    return GMRES(max_iter, tol, stop_mode, restart)(f, z0)
