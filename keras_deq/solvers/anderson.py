"""Anderson acceleration (type II, difference form) with a ridge relative to the current
residual."""

import keras
import numpy as np
from keras import ops

from keras_deq import backend
from keras_deq.solvers import common
from keras_deq.solvers import result as res
from keras_deq.solvers.base import Solver

_MAX_RIDGE = 1e30
"""Cap of the scaled ridge, so that a huge ridge stays finite in float32."""

_DROP = 1e-3
"""A residual difference is dropped when less than this fraction of its squared norm
lies outside the span of the newer differences kept (an angle below about 1.8 degrees)."""


@keras.saving.register_keras_serializable(package="keras_deq")
class Anderson(Solver):
    """Anderson-accelerated fixed-point iteration.

    With residuals `g_i = f(z_i) - z_i`, mixed iterates `y_i = z_i + beta g_i`, and
    the differences `dg_i`, `dy_i` of consecutive ones over the last `window`
    iterates (newest first), each iteration steps to
    `z_{k+1} = y_k - sum_i gamma_i dy_i`, where `gamma` minimizes
    `||g_k - sum_i gamma_i dg_i||^2 + sum_i lam_i gamma_i^2` (Anderson type II in
    difference form; the same as mixing the iterates with weights that sum to 1).

    The ridge is relative to the current residual:
    `lam_i = max(ridge * ||g_k||^2, 100 eps ||dg_i||^2)` (`eps` the machine
    epsilon of the accumulation dtype). It shrinks with the residual, so the
    acceleration keeps its pace near the solution whatever the older, larger
    residuals in the window, and it holds near a zero solution too. The
    `100 eps ||dg_i||^2` floor, the precision of the small system's entries, keeps
    it invertible with `ridge=0`. A difference that is nearly in the span of the
    newer ones (less than 1e-3 of its squared norm outside it, in the regularized
    system) is left out of the window for that step: a longer window then costs no
    iterations on a low-dimensional or nearly linear problem (with one unknown,
    Anderson is the secant method). A sample whose small system is not finite (an
    overflowing residual) takes a plain step, `z_{k+1} = y_k`.

    Args:
        max_iter: Maximum number of iterations (each evaluates `f` once).
        tol: Tolerance on the per-sample residual named by `stop_mode`.
        stop_mode: `"rel"` for `||f(z) - z|| / ||f(z)||`, `"abs"` for `||f(z) - z||`.
        window: Number of past iterates mixed (the history size `m`).
        beta: Mixing parameter in (0, 1]: 1 mixes the `f(z_i)`, smaller values
            move part way from the mixed `z_i`.
        ridge: Tikhonov regularization of the least-squares system relative to the
            current squared residual `||g_k||^2`, >= 0 (0: none beyond the floor
            above; `inf`: plain steps).

    Examples:
        >>> from keras import ops
        >>> solver = Anderson(window=3)
        >>> result = solver(lambda z: 0.9 * ops.tanh(z) + 1.0, ops.zeros((4, 8)))
        >>> bool(ops.all(result.converged))
        True
    """

    name = "anderson"
    uses_residual = True

    def __init__(self, max_iter=50, tol=1e-4, stop_mode="rel", window=5, beta=1.0, ridge=1e-4):
        super().__init__(max_iter, tol, stop_mode)
        self.window = common.check_positive_int("window", window)
        self.beta = common.check_fraction("beta", beta)
        self.ridge = common.check_nonnegative_float("ridge", ridge, finite=False)

    def init(self, f, z0):
        # The last `window - 1` differences of the residuals g_i and of the mixed iterates
        # y_i = z_i + beta g_i (see `_history`), their Gram matrix and their inner
        # products with the last g, newest first, (batch, window - 1, window - 1) and
        # (batch, window - 1), which of them are real differences (window - 1,), and
        # the previous y and g.
        del f
        if self.window == 1:
            return ()
        zeros = ops.zeros_like(z0)
        size = self.window - 1
        batch_zeros = ops.zeros_like(ops.sum(ops.cast(zeros, _acc_dtype(z0.dtype)), axis=1))
        gram = ops.tile(batch_zeros[:, None, None], (1, size, size))
        rhs = ops.tile(batch_zeros[:, None], (1, size))
        valid = ops.zeros((size,), dtype="bool")
        history = _history(zeros, size)
        return zeros, zeros, history, history, gram, rhs, valid

    def step(self, f, z, fz, state, k, residual):
        del f
        # `current` = ||g_k||^2 only scales the ridge; the loop's carries no gradient.
        g, current = residual
        y = fz if self.beta == 1.0 else z + self.beta * g
        if self.window == 1:
            return y, state
        y_prev, g_prev, dys, dgs, gram, rhs_prev, valid = state
        acc = _acc_dtype(z.dtype)
        dg = g - g_prev
        if isinstance(dgs, tuple):  # ops run one by one
            dgs, dys = (dg, *dgs[:-1]), (y - y_prev, *dys[:-1])
            row, rhs = _inner_products(dgs, dg, g, rhs_prev, acc)
            # The small systems and the mixing, a few dozen tiny ops and 2p elementwise
            # passes: one compiled program (`backend.compiled_step`), which fuses the
            # passes (the inner products stay out: XLA's row sums on CPU are slower).
            z_next, gram, rhs, valid = backend.compiled_step(_solve_and_mix)(
                row, rhs, gram, valid, k, current, self.ridge, y, dys
            )
            return z_next, (y, g, dys, dgs, gram, rhs, valid)
        order = _newest_first(k, self.window - 1)
        dgs, dys = _write(dgs, k, dg), _write(dys, k, y - y_prev)
        stacked = ops.cast(dgs, acc)
        row, rhs = (
            ops.take(ops.einsum("bpn,bn->bp", stacked, ops.cast(v, acc)), order, axis=1)
            for v in (dg, g)
        )
        gamma, gram, rhs, valid = _small_system(row, rhs, gram, valid, k, current, self.ridge)
        # `order` maps slots to ages and back.
        gamma = ops.take(ops.cast(gamma, z.dtype), order, axis=1)
        z_next = y - ops.einsum("bp,bpn->bn", gamma, dys)
        return z_next, (y, g, dys, dgs, gram, rhs, valid)


def anderson(f, z0, max_iter=50, tol=1e-4, stop_mode="rel", window=5, beta=1.0, ridge=1e-4):
    """Anderson-accelerated fixed-point iteration.

    The function form of `Anderson(max_iter, tol, stop_mode, window, beta, ridge)(f, z0)`.
    Each iteration steps to `z_{k+1} = y_k - sum_i gamma_i dy_i` with
    `y_i = z_i + beta g_i`, `g_i = f(z_i) - z_i`, where `gamma` minimizes
    `||g_k - sum_i gamma_i dg_i||^2 + sum_i lam_i gamma_i^2` over the differences
    `dg_i`, `dy_i` of the last `window` iterates, with the ridge relative to the
    newest residual: `lam_i = max(ridge * ||g_k||^2, 100 eps ||dg_i||^2)`. See
    `Anderson`.

    Args:
        f: The map, taking and returning a structure like `z0`.
        z0: The initial state: a `(batch, ...)` tensor or a nest of such tensors.
        max_iter: Maximum number of iterations (each evaluates `f` once).
        tol: Tolerance on the per-sample residual named by `stop_mode`.
        stop_mode: `"rel"` for `||f(z) - z|| / ||f(z)||`, `"abs"` for `||f(z) - z||`.
        window: Number of past iterates mixed (the history size `m`).
        beta: Mixing parameter in (0, 1]: 1 mixes the `f(z_i)`, smaller values
            move part way from the mixed `z_i`.
        ridge: Tikhonov regularization of the least-squares system relative to the
            current squared residual `||g_k||^2`, >= 0 (0: none beyond the
            `100 eps ||dg_i||^2` floor; `inf`: plain steps).

    Returns:
        A `SolverResult`.

    Examples:
        >>> from keras import ops
        >>> result = anderson(lambda z: 0.9 * ops.tanh(z) + 1.0, ops.zeros((4, 8)))
        >>> bool(ops.all(result.converged))
        True
    """
    common.check_callable("f", f)
    return Anderson(max_iter, tol, stop_mode, window, beta, ridge)(f, z0)


def _history(zeros, size):
    """An empty history of `size` differences shaped like `zeros` `(batch, n)`.

    Where ops run one by one (a TensorFlow graph outside XLA, eager PyTorch), a tuple
    of `(batch, n)` tensors, newest first: a new difference shifts the tuple, which
    copies nothing. Compiled (XLA, JAX, `torch.compile`), a ring buffer
    `(batch, size, n)` written in place at slot `k % size` (a shifted tuple would be
    copied there at every iteration).
    """
    if backend.runs_op_by_op():
        return (zeros,) * size
    return ops.zeros((ops.shape(zeros)[0], size, ops.shape(zeros)[1]), dtype=zeros.dtype)


def _write(ring, k, value):
    """`ring` with iteration `k`'s difference `value` `(batch, n)` in slot `k % size`."""
    slot = ops.mod(ops.cast(k, "int32"), ring.shape[1])
    return backend.slice_update(ring, (0, slot, 0), value[:, None, :])


def _newest_first(k, size):
    """The ring's slots from the newest difference (iteration `k`'s) to the oldest; the
    same map takes a slot back to its age."""
    return ops.mod(ops.cast(k, "int32") - ops.arange(size, dtype="int32"), size)


def _inner_products(dgs, dg, g, rhs_prev, acc):
    """`(<dg_i, dg>, <dg_i, g>)` over the differences `dgs` (a tuple, newest first: `dg`
    is `dgs[0]`), `(batch, p)` each, in `acc`; `rhs_prev` is the previous iteration's
    `<dg_i, g>`. For graphs that run op by op, where each op costs a pass and a
    dispatch: `<dg_i, g>` one difference at a time (no stacked copy), and, for the
    older differences, `<dg_i, dg> = <dg_i, g> - <dg_i, g_prev>`, the second term
    being last iteration's `rhs` (`dg = g - g_prev`): p + 1 products instead of 2p.
    Its rounding error, about `eps ||g|| / ||dg||` relative, matters only when the
    residual stalls, where the ridge dominates.
    """
    dg, g = ops.cast(dg, acc), ops.cast(g, acc)
    dgs = [dg, *(ops.cast(d, acc) for d in dgs[1:])]
    rhs = ops.stack([ops.sum(d * g, axis=1) for d in dgs], axis=1)
    newest = ops.sum(dg * dg, axis=1, keepdims=True)
    return ops.concatenate([newest, rhs[:, 1:] - rhs_prev[:, :-1]], axis=1), rhs


def _acc_dtype(dtype):
    return keras.backend.standardize_dtype(res.accumulation_dtype(dtype))


def _small_system(row, rhs, gram, valid, k, current, ridge):
    """The coefficients `gamma` and the updated `(gram, rhs, valid)` of iteration `k`.

    `row` and `rhs` are the new difference's inner products with the differences
    (itself first) and the newest residual's, newest first; `gram` and `valid` the
    previous iteration's. Iteration 0's differences (from the zero history) are not
    real ones: marked invalid, their inner products are zeroed, so the solve drops
    them.
    """
    valid = ops.concatenate([ops.reshape(k > 0, (1,)), valid[:-1]], axis=0)
    row, rhs = (ops.where(valid[None, :], t, ops.zeros_like(t)) for t in (row, rhs))
    gram = ops.concatenate(
        [row[:, None, :], ops.concatenate([row[:, 1:, None], gram[:, :-1, :-1]], axis=2)],
        axis=1,
    )
    return _coefficients(gram, rhs, current, ridge), gram, rhs, valid


def _solve_and_mix(row, rhs, gram, valid, k, current, ridge, y, dys):
    """`_small_system`, and the next iterate `y - sum_i gamma_i dy_i` over the
    differences `dys` (a tuple, newest first): `(z_next, gram, rhs, valid)`."""
    gamma, gram, rhs, valid = _small_system(row, rhs, gram, valid, k, current, ridge)
    gamma = ops.split(ops.cast(gamma, y.dtype), len(dys), axis=1)
    terms = [c * d for c, d in zip(gamma, dys, strict=True)]
    return y - sum(terms[1:], terms[0]), gram, rhs, valid


def _coefficients(gram, rhs, current, ridge):
    """The coefficients `gamma` `(batch, p)` of the differences, newest first.

    Args:
        gram: `(batch, p, p)` inner products of the residual differences `dg_i` (zero
            rows and columns for differences that do not exist yet).
        rhs: `(batch, p)` inner products `<dg_i, g_k>` with the newest residual.
        current: `(batch,)` the newest squared residual `||g_k||^2`.
        ridge: The relative ridge.

    Solves `min ||g_k - sum_i gamma_i dg_i||^2 + sum_i lam_i gamma_i^2`, with
    `lam_i = max(ridge ||g_k||^2, 100 eps ||dg_i||^2)`, over the differences kept by
    `_filtered_solve` (a zero difference is never kept). A sample whose system is not
    finite gets `gamma = 0`: a plain step.
    """
    dtype = keras.backend.standardize_dtype(gram.dtype)
    size = gram.shape[-1]
    # Scaled by D = diag(1 / ||dg_i||): unit diagonal, off-diagonal entries the cosines,
    # so the system is well scaled whatever the sizes of the differences.
    squares = ops.diagonal(gram, axis1=1, axis2=2)
    squares = ops.where(squares > 0.0, squares, 1.0)
    d = ops.rsqrt(squares)
    floor = 100.0 * float(np.finfo(dtype).eps)
    ridges = ops.clip(min(ridge, _MAX_RIDGE) * current[:, None] / squares, floor, _MAX_RIDGE)
    scale = d[:, :, None] * ops.concatenate([d, ops.ones_like(d[:, :1])], axis=1)[:, None, :]
    unit = ops.convert_to_tensor(np.eye(size, size + 1, dtype=dtype))
    system = ops.concatenate([gram, rhs[:, :, None]], axis=2) * scale + ridges[:, :, None] * unit
    # A sample whose system overflowed solves the identity system: gamma = 0.
    finite = ops.all(ops.isfinite(system), axis=(1, 2))[:, None]
    system = ops.where(finite[:, :, None], system, unit)
    gamma = _filtered_solve(system, ridges + _DROP, unit) * d
    return ops.where(finite & ops.isfinite(gamma), gamma, 0.0)


def _filtered_solve(system, thresholds, unit):
    """Solves the augmented systems `system` `(batch, p, p + 1)` (`[a | b]`, `a`
    symmetric positive definite with unit diagonal plus ridges), dropping the nearly
    dependent unknowns; `unit` is the identity `(p, p + 1)` in `system`'s dtype.

    Gauss-Jordan elimination without pivoting (stable for such matrices), in order,
    unrolled over the `p` unknowns. Unknown j is dropped (set to 0, its column
    cleared) when its pivot is at most `thresholds[:, j]` (its ridge plus `_DROP`):
    the direction it stands for is then, to that tolerance, in the span of the
    earlier (newer) kept ones.
    """
    size = system.shape[1]
    x, keeps = system, []
    for j, threshold in enumerate(ops.split(thresholds[:, :, None], size, axis=1)):
        pivot = x[:, j : j + 1, j : j + 1]
        keep = pivot > threshold
        # A dropped unknown eliminates itself from the other rows with the row e_j; its
        # own row is then meaningless, and its value is set to 0 at the end.
        row = ops.where(
            keep, x[:, j : j + 1, :] / ops.where(keep, pivot, 1.0), unit[None, j : j + 1]
        )
        x = x - (x[:, :, j : j + 1] - unit[None, :, j : j + 1]) * row
        keeps.append(keep[:, 0])
    return ops.where(ops.concatenate(keeps, axis=1), x[:, :, size], 0.0)
