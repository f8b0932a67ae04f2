"""The result every solver returns, and the bookkeeping that fills it."""

from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

STOP_MODES = ("rel", "abs")


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
            `k - 1` times): the last evaluation measured its residual.
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
    """

    state: Any
    steps: tf.Tensor
    abs_residual: tf.Tensor
    rel_residual: tf.Tensor
    converged: tf.Tensor
    nonfinite: Any = None


def accumulation_dtype(dtype):
    """The dtype for norms and small linear solves: float32 or wider."""
    dtype = tf.as_dtype(dtype)
    return tf.float64 if dtype == tf.float64 else tf.float32


def relative(abs_res, f_norm):
    """`abs_res / f_norm` without an epsilon: 0 where `abs_res` is 0, finite (at most
    the dtype's largest value) where `abs_res` is finite, NaN/Inf where it is not.

    An additive epsilon (`f_norm + eps`) would accept any state whose image is
    below `eps * tol`, e.g. `z = 0` when `f(0)` is tiny but not 0.
    """
    dtype = abs_res.dtype
    ratio = abs_res / tf.maximum(f_norm, tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype))
    capped = tf.minimum(ratio, tf.constant(dtype.max, dtype))
    return tf.where(tf.math.is_finite(abs_res), capped, ratio)


def residuals(fz, z):
    """Per-sample absolute and relative residuals of flat `(batch, n)` states."""
    acc = accumulation_dtype(z.dtype)
    fz32 = tf.cast(fz, acc)
    diff = fz32 - tf.cast(z, acc)
    abs_res = tf.sqrt(tf.reduce_sum(tf.square(diff), axis=1))
    f_norm = tf.sqrt(tf.reduce_sum(tf.square(fz32), axis=1))
    # Residuals only steer the solve; without stop_gradient, differentiating
    # through an unrolled solve would keep `fz - z` of every iteration.
    return tf.stop_gradient(abs_res), tf.stop_gradient(relative(abs_res, f_norm))


class Best(NamedTuple):
    """The lowest-residual iterate seen so far, per sample, and whether the sample
    has met a non-finite value (after which it is frozen)."""

    z: tf.Tensor
    abs_residual: tf.Tensor
    rel_residual: tf.Tensor
    failed: tf.Tensor


def initial_best(z0):
    batch = tf.shape(z0)[0]
    inf = tf.fill([batch], tf.constant(float("inf"), accumulation_dtype(z0.dtype)))
    return Best(z0, inf, inf, tf.zeros([batch], tf.bool))


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
        tf.where(better[:, None], z, best.z),
        tf.where(better, abs_res, best.abs_residual),
        tf.where(better, rel_res, best.rel_residual),
        best.failed | ~tf.math.is_finite(residual),
    )


def guard(best, z_next):
    """Freezes the samples that met a non-finite value at their best iterate.

    A failed sample (non-finite `f(z)` so far, or a non-finite `z_next` now) goes
    on from its best iterate, where `f` was finite, so the solver never feeds NaN
    or Inf back into `f` (nor into autodiff of an unrolled solve), and it stops
    counting for `keep_going`.

    Returns:
        `(z_next, best)` with the failed samples' `z_next` replaced and marked.
    """
    failed = best.failed | ~tf.reduce_all(tf.math.is_finite(z_next), axis=1)
    return tf.where(failed[:, None], best.z, z_next), best._replace(failed=failed)


def converged(best, tol, stop_mode):
    return criterion(best.abs_residual, best.rel_residual, stop_mode) <= tol


def keep_going(best, tol, stop_mode):
    """True while some sample is unconverged and has not failed (see `guard`)."""
    return tf.reduce_any(~converged(best, tol, stop_mode) & ~best.failed)


def to_result(best, steps, tol, stop_mode, unpack):
    return SolverResult(
        state=unpack(best.z),
        steps=tf.cast(steps, tf.int32),
        abs_residual=best.abs_residual,
        rel_residual=best.rel_residual,
        converged=converged(best, tol, stop_mode),
        nonfinite=best.failed,
    )


def write_slot(buffer, slot, value):
    """Writes `value` `(batch, n)` into slot `slot` of a `(batch, slots, n)` history."""
    batch = tf.shape(value)[0]
    index = tf.stack([tf.range(batch), tf.fill([batch], slot)], axis=1)
    return tf.tensor_scatter_nd_update(buffer, index, value)
