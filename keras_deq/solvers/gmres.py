"""GMRES: the restarted Krylov solver of affine fixed points (the implicit adjoint)."""

import keras
import numpy as np
from keras import ops

from keras_deq.solvers import common
from keras_deq.solvers import gmres_entries as entries_lib
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
    a sample's iterates and result do not depend on the rest of the batch. Under
    `DEQ(solver_batch_dims=2)` a sample is a whole sequence, one process over all its
    positions (which attention couples: processes per position would read each
    other's probes), with a residual and a tolerance test per position: it stops
    when every position meets `tol` (see `solve_flat`'s `entry_size`). A process
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

    The loop runs in the solver's float32 or float64 with `keras.ops` only. It keeps
    two `(batch, restart, n)` buffers, the Krylov vectors and the directions
    `V R^-1` that update the Krylov iterate at each step (so the iterate is never
    formed by a triangular solve), and `(batch, restart + 1, restart + 1)` for the
    rotations: an evaluation costs about five passes over the slots filled so far
    (rounded up to a quarter of `restart`) and two over the rotations, besides `h`.
    A sample whose `h` gives NaN or Inf is frozen at its best finite iterate, as in
    the other solvers.

    Args:
        max_iter: Maximum number of evaluations of `h`.
        tol: Tolerance on the per-sample residual named by `stop_mode`.
        stop_mode: `"rel"` for `||h(u) - u|| / ||h(u)||`, `"abs"` for `||h(u) - u||`.
        restart: Slots of the Krylov basis (the `m` of GMRES(m)): the most Krylov
            vectors a process keeps before it restarts, a positive integer. Larger
            converges in fewer evaluations on hard systems, at `O(m n + m^2)` memory
            per sample and up to as much work per evaluation.

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
    joint_entries = True

    def __init__(self, max_iter=50, tol=1e-4, stop_mode="rel", restart=20):
        super().__init__(max_iter, tol, stop_mode)
        self.restart = common.check_positive_int("restart", restart)

    def solve_flat(self, f, z0, unpack=None, entry_size=None):
        """The GMRES loop on `(batch, n)` matrices; see the class docstring.

        Args:
            f: The affine map on `(batch, n)` matrices.
            z0: The starting iterate, `(batch, n)`, float32 or float64.
            unpack: Applied to the returned state (identity if None).
            entry_size: None: each sample has one residual and tolerance test. An int
                (or scalar tensor) dividing `n`: each sample's entries of that width
                (the rows of `reshape(z, (-1, entry_size))`) have their own, and the
                result's residuals and `converged` are per entry (see
                `keras_deq.solvers.common.per_entry`).

        Returns:
            A `SolverResult`.
        """
        tol, stop_mode, m = self.tol, self.stop_mode, self.restart
        if entry_size is None:
            rows = entries_lib.Samples(tol, stop_mode)
        else:
            rows = entries_lib.Entries(tol, stop_mode, entry_size, ops.shape(z0)[1] // entry_size)
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

        def body(k, p, krylov, fresh, first, state, best, go):
            x, hx, c, v, direction, xk, g, basis, directions, qt = state
            position = ops.mod(k, m + 1)
            i = ops.maximum(position - 1, 0)  # the Arnoldi step of v_i (none at 0)
            # The vectors computed last step join their buffers before any read of them
            # (written at the end of the step, XLA would copy the buffers): v_i, and the
            # direction p_{i-1} (see 3.). A process starting here has fresh rotations.
            basis = ops.slice_update(basis, (0, i, 0), v[:, None, :])
            slot = ops.clip(position - 2, 0, m - 1)
            directions = ops.slice_update(directions, (0, slot, 0), direction[:, None, :])
            qt = ops.where(fresh[:, None, None], eye, qt)
            fp = f(p)
            # 1. The residual of the evaluated point: a measurement where it is the
            # sample's iterate (not in a Krylov process), else a Krylov probe.
            best, finite = rows.measure(best, p, fp, krylov)
            # A non-finite image is replaced by `p` (its sample is frozen from now on), so
            # that its row of the Krylov state stays finite.
            fp = res.where_rows(finite, fp, p)
            last = k + 2 >= max_iter  # the next evaluation is the last: a measurement

            # 2. A measured sample short of `tol` starts a process from its iterate p:
            # r = h(p) - p, v_0 = r / ||r||, in the slots from `position` on (none left
            # at the last position: it measures again at the next, the slots' start).
            r = fp - p
            beta = entries_lib.norm(r)
            v0 = r / ops.where(beta > tiny, beta, 1.0)[:, None]
            c_new = entries_lib.norm(p) + entries_lib.norm(fp)
            c_new = ops.where(c_new > tiny, c_new, 1.0)
            stay = rows.settled(best) | last | (position == m)
            restarting = ~krylov & ~stay

            # 3. The Arnoldi step of a process (slots first .. i), w = (I - A) v_i with
            # A v_i = (h(x + c v_i) - h(x)) / c; then the new column of the Hessenberg
            # matrix rotated into column i of the triangular factor R, whose entries
            # give the direction p_i = (v_i - sum_j R_ji p_j) / R_ii (the columns of
            # V R^-1) and the Krylov iterate x_i = x_{i-1} + g_i p_i.
            w = v - (fp - hx) / c[:, None]
            w, coefficients = _orthogonalize(basis, w, first, i)
            beta_next = entries_lib.norm(w)
            v_next = w / ops.where(beta_next > tiny, beta_next, 1.0)[:, None]
            qt, g, above, pivot = _rotate(qt, g, coefficients, beta_next, first, i)
            direction = (v - _combine(directions, above, i)) / pivot[:, None]
            # Out of a process, a sample's step is meaningless: its direction is kept
            # at 0, so that no large value from it reaches the buffer.
            direction = res.where_rows(krylov, direction, ops.zeros_like(direction))
            xk = xk + ops.take(g, i, axis=1)[:, None] * direction
            estimate = ops.abs(ops.take(g, i + 1, axis=1))
            estimate_rel = rows.estimate_rel(estimate, xk)
            done = res.criterion(estimate, estimate_rel, stop_mode) <= tol
            switch = krylov & (done | last | (i + 1 >= m))

            # 4. The next point: the iterate (measured at the next evaluation), or the
            # next Krylov probe x + c v.
            x = res.where_rows(restarting, p, x)
            c = ops.where(restarting, c_new, c)
            v = res.where_rows(restarting, v0, v_next)
            xk = res.where_rows(restarting, p, xk)
            start = ops.cast(ops.arange(m + 1)[None, :] == position, dtype)
            g = res.where_rows(restarting, beta[:, None] * start, g)  # beta e_first
            krylov_next = restarting | (krylov & ~switch)
            p_next = res.where_rows(krylov_next, x + c[:, None] * v, res.where_rows(switch, xk, p))
            hx = res.where_rows(restarting, fp, hx)
            first = ops.where(restarting, position, first)
            p_next, best = rows.guard(best, p_next)
            go = rows.keep_going(best)
            state = (x, hx, c, v, direction, xk, g, basis, directions, qt)
            return k + 1, p_next, krylov_next, restarting, first, state, best, go

        def cond(k, *loop_vars):
            return ops.logical_and(loop_vars[-1], k < max_iter)

        batch = ops.shape(z0)[0]
        buffer = ops.zeros((batch, m, ops.shape(z0)[1]), dtype=dtype)
        state = (
            z0,  # x: the process's first iterate
            ops.zeros_like(z0),  # hx: h(x)
            ops.ones((batch,), dtype=dtype),  # c: the probes' scale
            ops.zeros_like(z0),  # v: the Krylov vector of the next probe
            ops.zeros_like(z0),  # direction: the newest p_i
            z0,  # xk: the Krylov iterate
            ops.zeros((batch, m + 1), dtype=dtype),  # g: Q^T beta e_first
            buffer,  # basis: v_first .. v_i
            buffer,  # directions: p_first .. p_i
            ops.broadcast_to(eye, (batch, m + 1, m + 1)),  # qt: the rotations, Q^T
        )
        false = ops.zeros((batch,), dtype="bool")
        int_zero = ops.convert_to_tensor(0, "int32")
        loop_vars = (int_zero, z0, false, false, ops.zeros((batch,), dtype="int32"), state)
        loop_vars += (rows.initial_best(z0), ops.convert_to_tensor(True))
        out = ops.while_loop(cond, body, loop_vars, maximum_iterations=max_iter)
        steps, best = out[0], out[-2]
        return rows.to_result(best, steps, unpack or (lambda z: z))


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


def _sizes(m):
    """The basis sizes the steps of a cycle read: up to `_BUCKETS` of them, the last `m`."""
    return sorted({min(m, -(-m * q // _BUCKETS)) for q in range(1, _BUCKETS + 1)})


def _by_size(fn, m, i, *args):
    """`fn(size)(*args)` for the smallest size of `_sizes(m)` above `i` (an `ops.switch`):
    the work of a step on the first `size` slots grows with `i`, not with `m`."""
    sizes = _sizes(m)
    if len(sizes) == 1:
        return fn(m)(*args)
    index = ops.sum(ops.cast(i + 1 > ops.convert_to_tensor(sizes[:-1]), "int32"))
    return ops.switch(index, [fn(size) for size in sizes], *args)


def _orthogonalize(basis, w, first, i):
    """`(w', h)`: `w` `(batch, n)` made orthogonal to the basis vectors `v_first .. v_i` of
    `basis` `(batch, m, n)` (`first` `(batch,)`, a sample's own) by classical Gram-Schmidt
    applied twice, and the coefficients `h` `(batch, m)` it removed (0 elsewhere)."""
    m = basis.shape[1]

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

    return _by_size(gram_schmidt, m, i, basis, w, first, i)


def _combine(directions, weights, i):
    """`sum_j weights_j p_j` `(batch, n)` over the slots of `directions` `(batch, m, n)`
    below `i` (`weights` `(batch, m)`, 0 elsewhere)."""
    m = directions.shape[1]

    def combine(size):
        def run(directions, weights):
            return ops.einsum("bm,bmn->bn", weights[:, :size], directions[:, :size])

        return run

    return _by_size(combine, m, i, directions, weights)


def _rotate(qt, g, coefficients, beta_next, first, i):
    """Column `i` of the Hessenberg matrix into a process's triangular factor `R`.

    A sample's process occupies rows and columns `first .. i` of the cycle's
    matrices; the rest of its `qt` is the identity.

    Args:
        qt: `(batch, m + 1, m + 1)`, the product `Q^T` of the Givens rotations so far
            (one orthogonal matrix, applied to the new column at once).
        g: `(batch, m + 1)`, `Q^T beta e_first`, `beta` the norm of the process's first
            residual.
        coefficients: `(batch, m)`, the column's Gram-Schmidt coefficients (0 outside
            `first .. i`).
        beta_next: `(batch,)`, its subdiagonal entry `||w'||`.
        first: `(batch,)`, the first slot of each sample's process.
        i: The column, a scalar int32.

    Returns:
        `(qt, g, above, pivot)`: the rotations and `g` with the new rotation (of rows
        `i` and `i + 1`, which zeroes the subdiagonal entry; `g[i]` is then final and
        `|g[i + 1]|` is the residual norm of the Krylov iterate), and column `i` of `R`:
        its entries above the diagonal `(batch, m)` (0 elsewhere) and its diagonal
        `(batch,)` (a zero one, `I - A` singular on the Krylov space, counts as 1).
    """
    m = coefficients.shape[1]
    tiny = res.tiny_for(keras.backend.standardize_dtype(qt.dtype))
    rows1 = ops.arange(m + 1, dtype="int32")
    column = ops.concatenate([coefficients, ops.zeros_like(beta_next[:, None])], axis=1)
    column = ops.where(rows1 == i + 1, beta_next[:, None], column)
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
    g_i = ops.take(g, i, axis=1)[:, None]
    g = ops.where(rows1 == i, cos * g_i, ops.where(rows1 == i + 1, -sin * g_i, g))
    slots = ops.arange(m, dtype="int32")[None, :]
    above = ops.where((slots >= first[:, None]) & (slots < i), rotated[:, :m], 0.0)
    return qt, g, above, ops.where(radius != 0.0, radius, 1.0)
