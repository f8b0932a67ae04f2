"""The result every solver returns, and the bookkeeping that fills it.

Backend-agnostic: `keras.ops` only, so the same code runs on every Keras backend
(TensorFlow graphs, XLA and `tf.custom_gradient` included, and `jax.jit`).
"""

import contextlib
import threading
from typing import Any, NamedTuple

import keras
import ml_dtypes
from keras import ops

from keras_deq import backend

STOP_MODES = ("rel", "abs")

# Whether the loops being traced sum rows as products (see `row_sums`).
_ROW_SUMS = threading.local()


@contextlib.contextmanager
def row_sums_as_products(enabled):
    """A scope in which `row_sums` may compute with matrix-vector products (`enabled`:
    the solver's state is a `(batch, n)` matrix for its caller too, see `row_sums`)."""
    previous = getattr(_ROW_SUMS, "products", False)
    _ROW_SUMS.products = bool(enabled)
    try:
        yield
    finally:
        _ROW_SUMS.products = previous


def row_sums(matrix):
    """The sums of the rows of a `(batch, n)` matrix in the solver loop, `(batch,)`.

    Inside `row_sums_as_products(True)`, compiled for a CPU, products with a vector of
    ones (`backend.row_sums`): XLA's CPU row reductions cost more than the rest of a
    fixed-point iteration's bookkeeping (the shared loop at batch 64, width 128: 1.22x
    -> 1.02x the bare cell calls, `benchmarks/solvers.py`). Not for a state flattened
    from images (`solve_structure` knows): there XLA fuses the product with the
    reshaped output of a convolution into a loop about 15x slower than on a matrix
    (30 against 2 us at 64 x 512), more than the reduction costs.
    """
    if getattr(_ROW_SUMS, "products", False):
        return backend.row_sums(matrix)
    return ops.sum(matrix, axis=1)


class SolverResult(NamedTuple):
    """What a fixed-point solver returns.

    Attributes:
        state: The returned state, with the structure of `z0`. For each sample,
            the first iterate that met the tolerance, or, if none did, the iterate
            with the lowest absolute residual `||f(z) - z||` seen (not necessarily
            the last; with either stop mode, so that a diverging iterate, whose
            relative residual can be small, is never preferred to the start).
            Only iterates whose residual was measured count, so after `k`
            fixed-point iterations the state is at most `z_{k-1}` (`f` applied
            `k - 1` times): the last evaluation measured its residual. A solver
            with `fixed_steps` returns its last iterate instead (`z_k`), with the
            residuals of `z_{k-1}`, the last ones measured.
        steps: Scalar int32, the number of iterations run. Every iteration evaluates
            `f` exactly once, so this is also the number of evaluations of `f`.
        abs_residual: Per-sample `||f(z) - z||_2` of the returned state, shape
            `(batch,)`, in float32 or wider.
        rel_residual: Per-sample `||f(z) - z|| / ||f(z)||` of the returned state,
            shape `(batch,)`: 0 at an exact fixed point (also `f(z) = z = 0`), and
            capped at the dtype's largest value where `||f(z)||` is 0 or tiny
            (no epsilon is added, so a tiny `f(z)` far from `z` is never accepted).
        converged: Per-sample bool, whether the residual named by `stop_mode` is
            at most `tol`. A sample whose iterates were never finite has
            residual `inf` and is not converged.
        nonfinite: Per-sample bool, whether `f` or the solver produced NaN or Inf
            for the sample during the solve. From then on the sample is frozen at
            its best finite iterate (which is what `state` holds) and no longer
            keeps the solver running. None where not tracked.
        trace: A `SolverTrace` (the residuals of every iteration) when the solver
            was called with `trace=True`, else None.
        recorded: The iterates kept inside `keras_deq.solvers.base.recording`, a tuple
            of states; None outside it.
    """

    state: Any
    steps: Any
    abs_residual: Any
    rel_residual: Any
    converged: Any
    nonfinite: Any = None
    trace: Any = None
    recorded: Any = None


def accumulation_dtype(dtype):
    """The dtype name for norms and small linear solves: `"float32"` or `"float64"`.

    Args:
        dtype: A dtype of any backend, a numpy dtype or a name (`"bfloat16"`).
    """
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


def finfo(dtype):
    """`numpy.finfo` of a floating dtype (bfloat16 too), from any dtype or name."""
    return ml_dtypes.finfo(keras.backend.standardize_dtype(dtype))


def tiny_for(dtype):
    """A floor for denominators in the accumulation dtype of `dtype`: far below any
    meaningful value, far above the smallest normal number."""
    return 1e-30 if accumulation_dtype(dtype) == "float64" else 1e-20


def relative(abs_res, f_norm):
    """`abs_res / f_norm` without an epsilon: 0 where `abs_res` is 0, finite (at most
    the dtype's largest value) where both are finite, NaN/Inf where `abs_res` is not,
    and Inf where `f_norm` is not (a norm that overflowed: the ratio would be 0 and
    pass any tolerance, though the iterate diverged).

    An additive epsilon (`f_norm + eps`) would accept any state whose image is
    below `eps * tol`, e.g. `z = 0` when `f(0)` is tiny but not 0.
    """
    dtype = keras.backend.standardize_dtype(abs_res.dtype)
    info = finfo(dtype)
    ratio = abs_res / ops.maximum(f_norm, ops.convert_to_tensor(float(info.tiny), dtype))
    capped = ops.minimum(ratio, ops.convert_to_tensor(float(info.max), dtype))
    ratio = ops.where(ops.isfinite(abs_res), capped, ratio)
    return ops.where(ops.isfinite(f_norm), ratio, ops.convert_to_tensor(float("inf"), dtype))


class Residual(NamedTuple):
    """An iterate's residual `g = f(z) - z` `(batch, n)`, its squared norm `square`
    `(batch,)`, and the absolute and relative residuals `(batch,)` (see `residuals`)."""

    g: Any
    square: Any
    abs_residual: Any
    rel_residual: Any


def residuals(fz, z):
    """The `Residual` of flat `(batch, n)` states `z` (float32 or float64) and their
    images `fz`. The norms carry no gradient: they only steer the solve (without
    `stop_gradient`, differentiating an unrolled solve would keep `fz - z` of every
    iteration); `g` does."""
    g = fz - z
    square = ops.stop_gradient(row_sums(g * g))
    abs_res = ops.sqrt(square)
    f_norm = ops.sqrt(ops.stop_gradient(row_sums(fz * fz)))
    return Residual(g, square, abs_res, relative(abs_res, f_norm))


class Best(NamedTuple):
    """The lowest-residual iterate seen so far, per sample, and whether the sample
    has met a non-finite value (after which it is frozen)."""

    z: Any
    abs_residual: Any
    rel_residual: Any
    failed: Any


def initial_best(z0):
    batch = (ops.shape(z0)[0],)  # not from z0[:, 0]: a state may have no entries
    inf = ops.full(batch, float("inf"), dtype=accumulation_dtype(z0.dtype))
    return Best(z0, inf, inf, ops.zeros(batch, dtype="bool"))


def criterion(abs_res, rel_res, stop_mode):
    return rel_res if stop_mode == "rel" else abs_res


def update_best(best, z, abs_res, rel_res, stop_mode, tol):
    """Keeps, per sample, the first iterate that meets `tol`, else the one with the
    lowest absolute residual.

    A sample whose best iterate already meets `tol` keeps it: its result is the
    first iterate that converged, so it does not depend on how long the other
    samples of the batch keep the loop running. Until then iterates are ranked by
    `||f(z) - z||` whatever the stop mode: the relative residual of a diverging
    iterate tends to `1 - 1/L` for a map expanding by `L`, below the 1 of a zero
    start, so ranking by it would return the diverged iterate. A NaN residual
    never counts as better, so a finite iterate is never replaced by a
    non-finite one.
    """
    best_residual = criterion(best.abs_residual, best.rel_residual, stop_mode)
    residual = criterion(abs_res, rel_res, stop_mode)
    meets = residual <= tol
    better = (meets | (abs_res < best.abs_residual)) & ~(best_residual <= tol) & ~best.failed
    return Best(
        where_rows(better, z, best.z),
        ops.where(better, abs_res, best.abs_residual),
        ops.where(better, rel_res, best.rel_residual),
        best.failed | ~ops.isfinite(residual),
    )


def update_last(best, z, abs_res, rel_res, stop_mode):
    """Keeps, per sample, the latest iterate whose residual is finite (for solvers that
    run a fixed number of steps); as in `update_best`, a sample that met a non-finite
    value is marked failed, and keeps that iterate (where `f` was last finite)."""
    finite = ops.isfinite(criterion(abs_res, rel_res, stop_mode))
    take = finite & ~best.failed
    return Best(
        where_rows(take, z, best.z),
        ops.where(take, abs_res, best.abs_residual),
        ops.where(take, rel_res, best.rel_residual),
        best.failed | ~finite,
    )


def nonfinite_rows(residual, best, z, fz):
    """`(z, fz, g, square)` with the rows whose residual is not finite replaced by
    `(best.z, best.z, 0, 0)`: what `step` receives (`square` is `residual.square`).

    A sample's residual is not finite when `f(z)` is not, when `z` is not (a step that
    overflowed: the loop checks the new iterate only here, at its next evaluation,
    where it runs op by op and no gradient goes through the loop), or when the two
    are so far apart that the norm overflows. Its step is discarded (the loop
    freezes the sample at its best iterate) but still computed, and autodiff through
    an unrolled solve goes through it; a `where` passes it a zero cotangent, and zero
    times a NaN or Inf value is NaN, which reached the gradient (Broyden on JAX).
    From the best iterate, where `f` was finite, with a zero residual, the step
    computes on finite values only; the other samples are unchanged.
    """
    g, square = residual.g, residual.square
    return replace_rows(
        ~ops.isfinite(residual.abs_residual),
        lambda: (best.z, best.z, ops.zeros_like(g), ops.zeros_like(square)),
        (z, fz, g, square),
    )


def guard(best, z_next):
    """Freezes the samples whose new iterate is not finite at their best iterate.

    A failed sample (non-finite `f(z)` so far, or a non-finite `z_next` now) goes
    on from its best iterate, where `f` was finite, so the solver never feeds NaN
    or Inf to `f` (nor to autodiff of an unrolled solve), and it stops counting for
    `keep_going`. Where the loop runs op by op and is not differentiated, it checks
    `z_next` at its next evaluation instead (`nonfinite_rows`), and here only after
    the last iteration.

    Returns:
        `(z_next, best)` with the failed samples' `z_next` replaced and marked.
    """
    # A row's sum is not finite when one of its entries is not (or when the entries
    # are so large that it overflows, where the residual would overflow next anyway).
    failed = best.failed | ~ops.isfinite(row_sums(z_next))
    return replace_rows(failed, best.z, z_next), best._replace(failed=failed)


def where_rows(rows, new, old):
    """`old` (a nest of `(batch, ...)` tensors) with the rows (samples) where `rows`
    `(batch,)` is True taken from `new`: a nest like `old`, or a function returning one.
    """
    new = new() if callable(new) else new

    def select(n, o):
        return backend.select_rows(rows, n, o)

    return keras.tree.map_structure(select, new, old)


def replace_rows(rows, new, old):
    """`where_rows(rows, new, old)`, skipped where ops run one by one when no row is
    replaced (the common case: every sample finite), under a `cond` that also builds
    `new` only when needed (pass a function); compiled, the select fuses with its
    neighbours and costs nothing. Not for values that a gradient compiled by XLA
    differentiates through: XLA cannot compile a `cond`'s gradient state.
    """
    if not backend.runs_op_by_op():
        return where_rows(rows, new, old)
    return backend.cond(ops.any(rows), lambda: where_rows(rows, new, old), lambda: old)


def converged(best, tol, stop_mode):
    return criterion(best.abs_residual, best.rel_residual, stop_mode) <= tol


def keep_going(best, tol, stop_mode):
    """True while some sample is unconverged and has not failed (see `guard`)."""
    return ops.any(~converged(best, tol, stop_mode) & ~best.failed)


def to_result(best, steps, tol, stop_mode, unpack):
    return SolverResult(
        state=unpack(best.z),
        steps=ops.cast(steps, "int32"),
        abs_residual=best.abs_residual,
        rel_residual=best.rel_residual,
        converged=converged(best, tol, stop_mode),
        nonfinite=best.failed,
    )


def write_slot(buffer, slot, value):
    """Writes `value` `(batch, n)` into slot `slot` of a `(batch, slots, n)` history."""
    rows = ops.arange(ops.shape(value)[0], dtype="int32")
    index = ops.stack([rows, ops.zeros_like(rows) + ops.cast(slot, "int32")], axis=1)
    return ops.scatter_update(buffer, index, value)
