"""GMRES: the restarted Krylov solver of affine fixed points (the implicit adjoint)."""

import keras
import numpy as np
from keras import ops

from keras_deq.solvers import common
from keras_deq.solvers import result as res
from keras_deq.solvers.base import Solver, _differentiable_bound

_BUCKETS = 4
"""The Krylov steps of a cycle fall in up to this many groups of basis sizes."""


@keras.saving.register_keras_serializable(package="keras_deq")
class GMRES(Solver):
    """Restarted GMRES for affine maps: solves `u = h(u)` with `h(u) = A u + b`.

    The fixed point of an affine map `h` is the solution of the linear system
    `(I - A) u = b`, with `b = h(0)` and `A v = h(v) - h(0)`. This is the adjoint
    system of the implicit gradient, `u = J^T u + g`, which `keras_deq.DEQ` solves
    with its backward solver: `DEQ(..., backward_solver="gmres")` or
    `backward=keras_deq.backward.Implicit(solver="gmres")`. GMRES minimizes the
    residual `||h(u) - u||` over a Krylov space that grows by one vector per
    evaluation of `h`. Without restarts (`restart` at least the number of unknowns
    `n`) it solves any system with `I - A` invertible in at most `n + 2`
    evaluations in exact arithmetic, also where fixed-point iteration diverges
    (an eigenvalue of `A` outside the unit disk). Restarted every `restart`
    vectors, it converges when the symmetric part of `I - A` is definite (for
    instance `||A||_2 < 1`) and may stall otherwise.

    **Affine maps only.** The solver reads `A v` off differences of `h`, which is
    exact only for an affine `h`. A DEQ's cell is not affine, so `DEQ` refuses it
    as the forward solver (`solver="gmres"`: a `ValueError`); called directly on a
    non-affine map it still returns its best measured iterate with honest
    residuals, but is not expected to converge.

    Each sample of the batch is its own linear system, with its own Krylov process,
    least-squares problem and stopping test, as the fixed-point solvers treat rows:
    a sample's iterates and result do not depend on the rest of the batch. A process
    evaluates `h` once at the sample's iterate `x` (measuring its residual
    `r = h(x) - x`, which the result's residuals, best iterate and `converged` come
    from, as for the other solvers), then once per Krylov vector `v_j`, at
    `x + c v_j`, `c` of the size of `x` and `h(x)` (so that
    `A v_j = (h(x + c v_j) - h(x)) / c` keeps the precision of `h`). The basis is
    orthogonalized by classical Gram-Schmidt applied twice; Givens rotations keep the
    small least-squares problem triangular and give the residual of the current
    Krylov iterate without evaluating `h`. When that estimate meets `tol`, or before
    the last evaluation `max_iter` allows, the sample forms its iterate, and the next
    evaluation measures it; if it misses `tol` (the estimate's rounding), a new
    process starts from there. The basis has `restart` slots, which the batch fills
    in step (slot `j` at evaluation `j + 1` of every `restart + 1`, so that the
    writes are in place under XLA): a process runs until the last slot is filled,
    then its sample measures its iterate and starts again from the first slot
    (restarted GMRES; a process started mid-way has fewer slots). So `steps` counts
    evaluations of `h`, which are vector-Jacobian products in the adjoint (the
    Krylov matrix-vector products and one measurement per process), every returned
    state was measured, and a solve stopped by `max_iter` ends on a measurement.

    The loop runs in the solver's float32 or float64 with `keras.ops` only, and
    keeps `(batch, restart, n)` Krylov vectors: an evaluation costs about four passes
    over the slots filled so far (rounded up to a quarter of `restart`) besides `h`.
    A sample whose `h` gives NaN or Inf is frozen at its best finite iterate, as in
    the other solvers.

    Args:
        max_iter: Maximum number of evaluations of `h`.
        tol: Tolerance on the per-sample residual named by `stop_mode`.
        stop_mode: `"rel"` for `||h(u) - u|| / ||h(u)||`, `"abs"` for `||h(u) - u||`.
        restart: Slots of the Krylov basis (the `m` of GMRES(m)): the most Krylov
            vectors a process keeps before it restarts, a positive integer. Larger
            converges in fewer evaluations on hard systems, at `O(m n)` memory per
            sample and up to `O(m n)` work per evaluation.

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
        if _differentiable_bound(max_iter) is not None:
            raise ValueError(
                "GMRES is an adjoint solver: its iterations are not differentiated "
                "(`differentiable_loops`, `backward.Unrolled`). Received: "
                f"{self!r} inside `keras_deq.solvers.base.differentiable_loops`"
            )
        dtype = keras.backend.standardize_dtype(z0.dtype)
        tiny = res.tiny_for(dtype)
        eye = ops.convert_to_tensor(np.eye(m + 1, dtype=dtype))

        def body(k, p, krylov, fresh, first, x, hx, c, v, basis, xv, qt, rinv, beta, best, go):
            position = ops.mod(k, m + 1)
            i = ops.maximum(position - 1, 0)  # the Arnoldi step of v_i (none at 0)
            # The vector v_i of the probe evaluated now joins the basis before any read
            # of it (written at the end of the step, XLA would copy the basis), and a
            # sample whose process starts here has fresh rotations and R^-1.
            basis = ops.slice_update(basis, (0, i, 0), v[:, None, :])
            xv = ops.slice_update(xv, (0, i), res.row_sums(x * v)[:, None])
            qt = ops.where(fresh[:, None, None], eye, qt)
            rinv = ops.where(fresh[:, None, None], 0.0, rinv)
            fp = f(p)
            # 1. The residual of the evaluated point: a measurement where it is the
            # sample's iterate (not in a Krylov process), else a Krylov probe.
            residual = res.residuals(fp, p)
            finite = ops.isfinite(residual.abs_residual)
            measured = res.update_best(
                best, p, residual.abs_residual, residual.rel_residual, stop_mode, tol
            )
            best = res.Best(*res.where_rows(~krylov, measured[:3], best[:3]), best.failed | ~finite)
            # A non-finite image is replaced by `p` (its sample is frozen from now on), so
            # that its row of the Krylov state stays finite.
            fp = res.where_rows(finite, fp, p)
            last = k + 2 >= max_iter  # the next evaluation is the last: a measurement

            # 2. A measured sample short of `tol` starts a process from its iterate p:
            # r = h(p) - p, v_0 = r / ||r||, in the slots from `position` on (none left
            # at the last position: it measures again at the next, the slots' start).
            r = fp - p
            beta_new = _norm(r)
            v0 = r / ops.where(beta_new > tiny, beta_new, 1.0)[:, None]
            c_new = _norm(p) + _norm(fp)
            c_new = ops.where(c_new > tiny, c_new, 1.0)
            stay = res.converged(best, tol, stop_mode) | best.failed | last | (position == m)
            restarting = ~krylov & ~stay

            # 3. The Arnoldi step of a process (slots first .. i), w = (I - A) v_i with
            # A v_i = (h(x + c v_i) - h(x)) / c.
            w = v - (fp - hx) / c[:, None]
            w, coefficients = _orthogonalize(basis, w, first, i)
            beta_next = _norm(w)
            v_next = w / ops.where(beta_next > tiny, beta_next, 1.0)[:, None]
            qt, rinv, y, estimate = _least_squares(
                qt, rinv, coefficients, beta_next, beta, first, i
            )
            # ||x_i||^2 = ||x||^2 + 2 <x, V y> + ||y||^2 (V orthonormal): the relative
            # estimate, with ||h(x_i)|| >= ||x_i|| - ||r_i||.
            squared = res.row_sums(x * x) + ops.sum((2.0 * xv + y) * y, axis=1)
            x_norm = ops.sqrt(ops.maximum(squared, 0.0))
            estimate_rel = res.relative(estimate, ops.maximum(x_norm - estimate, 0.0))
            done = res.criterion(estimate, estimate_rel, stop_mode) <= tol
            switch = krylov & (done | last | (i + 1 >= m))
            # The Krylov iterate, formed only when a sample leaves its process.
            x_i = ops.cond(
                ops.any(switch), lambda: x + ops.einsum("bm,bmn->bn", y, basis), lambda: x
            )

            # 4. The next point: the iterate (measured at the next evaluation), or the
            # next Krylov probe x + c v.
            x = res.where_rows(restarting, p, x)
            c = ops.where(restarting, c_new, c)
            v = res.where_rows(restarting, v0, v_next)
            krylov_next = restarting | (krylov & ~switch)
            p_next = res.where_rows(krylov_next, x + c[:, None] * v, res.where_rows(switch, x_i, p))
            hx = res.where_rows(restarting, fp, hx)
            beta = ops.where(restarting, beta_new, beta)
            first = ops.where(restarting, position, first)
            p_next, best = res.guard(best, p_next)
            go = res.keep_going(best, tol, stop_mode)
            state = (x, hx, c, v, basis, xv, qt, rinv, beta)
            return (k + 1, p_next, krylov_next, restarting, first, *state, best, go)

        def cond(k, *loop_vars):
            return ops.logical_and(loop_vars[-1], k < max_iter)

        batch = ops.shape(z0)[0]
        zeros = ops.zeros((batch,), dtype=dtype)
        loop_vars = (
            ops.convert_to_tensor(0, "int32"),
            z0,
            ops.zeros((batch,), dtype="bool"),
            ops.zeros((batch,), dtype="bool"),
            ops.zeros((batch,), dtype="int32"),
            z0,
            ops.zeros_like(z0),
            zeros + 1.0,
            ops.zeros_like(z0),
            ops.zeros((batch, m, ops.shape(z0)[1]), dtype=dtype),
            ops.zeros((batch, m), dtype=dtype),
            ops.broadcast_to(eye, (batch, m + 1, m + 1)),
            ops.zeros((batch, m, m), dtype=dtype),
            zeros,
            res.initial_best(z0),
            ops.convert_to_tensor(True),
        )
        out = ops.while_loop(cond, body, loop_vars, maximum_iterations=max_iter)
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


def _norm(t):
    return ops.sqrt(res.row_sums(t * t))


def _orthogonalize(basis, w, first, i):
    """`(w', h)`: `w` `(batch, n)` made orthogonal to the basis vectors `v_first .. v_i` of
    `basis` `(batch, m, n)` (`first` `(batch,)`, a sample's own) by classical Gram-Schmidt
    applied twice, and the coefficients `h` `(batch, m)` it removed (0 elsewhere).

    It reads the first `size` vectors only, the smallest of up to `_BUCKETS` sizes that
    holds `v_0 .. v_i` (an `ops.switch`): the work of a step grows with `i`, not `m`.
    """
    m = basis.shape[1]
    sizes = sorted({min(m, -(-m * q // _BUCKETS)) for q in range(1, _BUCKETS + 1)})

    def gram_schmidt(size):
        def run(basis, w, first, i):
            part = basis[:, :size]
            slots = ops.arange(size, dtype="int32")[None, :]
            active = (slots >= first[:, None]) & (slots <= i)
            coefficients = ops.zeros((ops.shape(w)[0], m), dtype=w.dtype)
            for _ in range(2):
                projection = ops.where(active, ops.einsum("bmn,bn->bm", part, w), 0.0)
                w = w - ops.einsum("bm,bmn->bn", projection, part)
                coefficients = coefficients + ops.pad(projection, ((0, 0), (0, m - size)))
            return w, coefficients

        return run

    if len(sizes) == 1:
        return gram_schmidt(m)(basis, w, first, i)
    index = ops.sum(ops.cast(i + 1 > ops.convert_to_tensor(sizes[:-1]), "int32"))
    return ops.switch(index, [gram_schmidt(size) for size in sizes], basis, w, first, i)


def _least_squares(qt, rinv, coefficients, beta_next, beta, first, i):
    """Column `i` of the Hessenberg matrix into a process's small least-squares problem.

    A sample's process occupies rows and columns `first .. i` (`first` `(batch,)`) of the
    cycle's matrices; the rest of its `qt` is the identity and of its `rinv` zero.

    Args:
        qt: `(batch, m + 1, m + 1)`, the product of the Givens rotations so far (one
            orthogonal matrix, applied to the new column at once).
        rinv: `(batch, m, m)`, the inverse of the triangular factor `R` so far (upper
            triangular; its columns past `i` are not read).
        coefficients: `(batch, m)`, the column's Gram-Schmidt coefficients (0 outside
            `first .. i`).
        beta_next: `(batch,)`, its subdiagonal entry `||w'||`.
        beta: `(batch,)`, the norm of the process's first residual.
        first: `(batch,)`, the first slot of each sample's process.
        i: The column, a scalar int32.

    Returns:
        `(qt, rinv, y, estimate)`: the rotations with the new one (of rows `i` and
        `i + 1`, which zeroes the subdiagonal entry), `R^-1` with its column `i`,
        the coefficients `y` of the Krylov iterate `x + V y`
        (`y = R^-1 Q^T beta e_first`, 0 outside `first .. i`) and its residual norm
        `(batch,)`.
    """
    m = rinv.shape[1]
    dtype = keras.backend.standardize_dtype(qt.dtype)
    tiny = res.tiny_for(dtype)
    slots = ops.arange(m, dtype="int32")
    column = ops.concatenate([coefficients, ops.zeros_like(beta[:, None])], axis=1)
    column = ops.where(ops.arange(m + 1) == i + 1, beta_next[:, None], column)
    rotated = ops.einsum("bij,bj->bi", qt, column)
    a = ops.take(rotated, i, axis=1)
    radius = ops.sqrt(a * a + beta_next * beta_next)
    safe = ops.where(radius > tiny, radius, 1.0)
    cos = ops.where(radius > tiny, a / safe, 1.0)[:, None]
    sin = ops.where(radius > tiny, beta_next / safe, 0.0)[:, None]
    rows = ops.slice(qt, (0, i, 0), (ops.shape(qt)[0], 2, m + 1))
    row_i, row_i1 = rows[:, 0], rows[:, 1]
    rows = ops.stack([cos * row_i + sin * row_i1, cos * row_i1 - sin * row_i], axis=1)
    qt = ops.slice_update(qt, (0, i, 0), rows)
    start = ops.cast(ops.arange(m + 1)[None, :] == first[:, None], dtype)
    g = beta[:, None] * ops.einsum("bij,bj->bi", qt, start)  # Q^T (beta e_first)
    estimate = ops.abs(ops.take(g, i + 1, axis=1))
    # Column i of R is final: (R^-1)[:, i] = (e_i - R^-1 u) / r_ii, u the column above
    # the diagonal (a zero pivot, I - A singular on the Krylov space, counts as 1).
    above = ops.where(slots < i, rotated[:, :m], 0.0)
    pivot = ops.where(radius != 0.0, radius, 1.0)[:, None]
    new_column = (ops.cast(slots == i, dtype) - ops.einsum("bik,bk->bi", rinv, above)) / pivot
    rinv = ops.slice_update(rinv, (0, 0, i), new_column[:, :, None])
    own = (slots[None, :] >= first[:, None]) & (slots[None, :] <= i)
    y = ops.einsum("bik,bk->bi", rinv, ops.where(own, g[:, :m], 0.0))
    return qt, rinv, y, estimate
