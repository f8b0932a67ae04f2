"""Anderson acceleration (type II) with a relative ridge."""

import numpy as np
import tensorflow as tf

from keras_deq.solvers import common
from keras_deq.solvers import result as res


def anderson(f, z0, max_iter=50, tol=1e-4, stop_mode="rel", window=5, beta=1.0, ridge=1e-4):
    """Anderson-accelerated fixed-point iteration.

    Each iteration mixes the last `window` iterates with weights `alpha` that
    minimize `||sum_i alpha_i g_i||^2 + lam ||alpha||^2` subject to
    `sum_i alpha_i = 1`, where `g_i = f(z_i) - z_i`. The ridge `lam` is relative:
    `lam = ridge * mean_i ||g_i||^2`, so it shrinks with the residuals and the
    acceleration does not stall near the solution. If the small system is
    singular or not finite for a sample, that sample takes a plain step instead.

    Args:
        f: The map, taking and returning a structure like `z0`.
        z0: The initial state: a `(batch, ...)` tensor or a nest of such tensors.
        max_iter: Maximum number of iterations (each evaluates `f` once).
        tol: Tolerance on the per-sample residual named by `stop_mode`.
        stop_mode: `"rel"` for `||f(z) - z|| / ||f(z)||`, `"abs"` for `||f(z) - z||`.
        window: Number of past iterates mixed (the history size `m`).
        beta: Mixing parameter in (0, 1]: 1 mixes the `f(z_i)`, smaller values
            move part way from the mixed `z_i`.
        ridge: Relative Tikhonov regularization of the least-squares system, >= 0.
            Values below 100 machine epsilons of the accumulation dtype are raised
            to that floor, which keeps the small system invertible.

    Returns:
        A `SolverResult`.

    Examples:
        >>> import tensorflow as tf
        >>> result = anderson(lambda z: 0.9 * tf.tanh(z) + 1.0, tf.zeros([4, 8]))
        >>> bool(tf.reduce_all(result.converged))
        True
    """
    max_iter, tol, stop_mode = common.check_common(f, max_iter, tol, stop_mode)
    window = common.check_positive_int("window", window)
    beta = common.check_fraction("beta", beta)
    ridge = common.check_nonnegative_float("ridge", ridge, finite=False)
    return common.solve_structure(
        _anderson,
        f,
        z0,
        max_iter=max_iter,
        tol=tol,
        stop_mode=stop_mode,
        window=window,
        beta=beta,
        ridge=ridge,
    )


def _update_gram(gram, slot, row, window):
    """Replaces row and column `slot` of the `(batch, m, m)` Gram matrix by `row`."""
    e = tf.one_hot(slot, window, dtype=gram.dtype)
    keep = (1.0 - e)[:, None] * (1.0 - e)[None, :]
    new = e[:, None] * row[:, None, :] + row[:, :, None] * e[None, :]
    diag = e[:, None] * e[None, :] * tf.reduce_sum(row * e, axis=1)[:, None, None]
    return gram * keep + new - diag


def _mixing_weights(gram, k, slot, window, ridge):
    """Solves for the Anderson weights, falling back to the newest iterate."""
    acc = gram.dtype
    n_valid = tf.minimum(k + 1, window)
    valid = tf.cast(tf.range(window) < n_valid, acc)
    # A sample whose Gram matrix overflowed solves the identity system instead and
    # falls back to the newest iterate below.
    finite = tf.reduce_all(tf.math.is_finite(gram), axis=[1, 2])
    gram = tf.where(finite[:, None, None], gram, tf.zeros_like(gram))
    mean_sq = tf.linalg.trace(gram) / tf.cast(n_valid, acc)
    tiny = tf.constant(1e-30 if acc == tf.float64 else 1e-20, acc)
    # The ridge never drops below a few machine epsilons (relative), so that the
    # system stays invertible with `ridge=0` and a linearly dependent history:
    # tf.linalg.solve raises on an exactly singular matrix.
    floor = tf.constant(100.0, acc) * tf.constant(np.finfo(acc.as_numpy_dtype).eps, acc)
    lam = tf.maximum(tf.constant(ridge, acc), floor) * mean_sq + tiny
    system = gram + tf.linalg.diag(lam[:, None] * valid[None, :] + (1.0 - valid)[None, :])
    rhs = tf.broadcast_to(valid[None, :, None], tf.shape(gram[:, :, :1]))
    w = tf.linalg.solve(system, rhs)[:, :, 0]
    total = tf.reduce_sum(w, axis=1, keepdims=True)
    alpha = w / total
    ok = (
        tf.reduce_all(tf.math.is_finite(alpha), axis=1, keepdims=True)
        & (tf.abs(total) > tiny)
        & finite[:, None]
    )
    newest = tf.one_hot(slot, window, dtype=acc)[None, :]
    return tf.where(ok, alpha, newest)


def _anderson(f, z0, unpack, max_iter, tol, stop_mode, window, beta, ridge):
    dtype = z0.dtype
    acc = res.accumulation_dtype(dtype)
    batch, n = tf.shape(z0)[0], tf.shape(z0)[1]
    # Histories of f(z_i) and of the residuals g_i = f(z_i) - z_i, (batch, window, n),
    # kept in the state's dtype; the Gram matrix of the g_i in `acc`.
    history_f = tf.zeros([batch, window, n], dtype)
    history_g = tf.zeros([batch, window, n], dtype)
    gram = tf.zeros([batch, window, window], acc)

    def body(k, z, history_f, history_g, gram, best, _):
        fz = f(z)
        abs_res, rel_res = res.residuals(fz, z)
        best = res.update_best(best, z, abs_res, rel_res, stop_mode, tol)
        # A sample with a non-finite residual gets g = 0 and f = z in its history so
        # that it cannot spoil anything; its weights then fall back to a plain step.
        finite = tf.math.is_finite(abs_res)[:, None]
        g = tf.where(finite, fz - z, tf.zeros_like(z))
        slot = k % window
        history_f = res.write_slot(history_f, slot, tf.where(finite, fz, z))
        history_g = res.write_slot(history_g, slot, g)
        row = tf.matmul(tf.cast(history_g, acc), tf.cast(g, acc)[:, :, None])[:, :, 0]
        gram = _update_gram(gram, slot, row, window)
        alpha = tf.cast(_mixing_weights(gram, k, slot, window, ridge), dtype)[:, None, :]
        z_next = tf.matmul(alpha, history_f)[:, 0, :]
        if beta != 1.0:
            z_next -= (1.0 - beta) * tf.matmul(alpha, history_g)[:, 0, :]
        z_next, best = res.guard(best, z_next)
        return (
            k + 1,
            z_next,
            history_f,
            history_g,
            gram,
            best,
            res.keep_going(best, tol, stop_mode),
        )

    def cond(k, *rest):
        return tf.logical_and(rest[-1], k < max_iter)

    loop_vars = (
        tf.constant(0),
        z0,
        history_f,
        history_g,
        gram,
        res.initial_best(z0),
        tf.constant(True),
    )
    steps, *_, best, _ = tf.while_loop(cond, body, loop_vars, maximum_iterations=max_iter)
    return res.to_result(best, steps, tol, stop_mode, unpack)
