"""Limited-memory ("good") Broyden's method on g(z) = f(z) - z."""

import tensorflow as tf

from keras_deq.solvers import common
from keras_deq.solvers import result as res


def broyden(f, z0, max_iter=50, tol=1e-4, stop_mode="rel", memory=20):
    """Finds a root of `g(z) = f(z) - z` with a low-rank inverse-Jacobian model.

    The inverse Jacobian of `g` starts at `-I` (so the first step is a Picard step)
    and receives one rank-one "good Broyden" update per iteration. When `memory`
    updates are stored, the model restarts from `-I` plus the newest secant update. Unlike Picard iteration, it can converge when `f`
    is not a contraction, e.g. a linear map with spectral radius above 1.

    Args:
        f: The map, taking and returning a structure like `z0`.
        z0: The initial state: a `(batch, ...)` tensor or a nest of such tensors.
        max_iter: Maximum number of evaluations of `f`.
        tol: Tolerance on the per-sample residual named by `stop_mode`.
        stop_mode: `"rel"` for `||f(z) - z|| / ||f(z)||`, `"abs"` for `||f(z) - z||`.
        memory: Number of rank-one updates stored before the model restarts.

    Returns:
        A `SolverResult`.

    Examples:
        >>> import tensorflow as tf
        >>> result = broyden(lambda z: 1.5 * z + 1.0, tf.zeros([2, 3]), tol=1e-6)
        >>> bool(tf.reduce_all(result.converged))
        True
    """
    max_iter, tol, stop_mode = common.check_common(f, max_iter, tol, stop_mode)
    memory = common.check_positive_int("memory", memory)
    return common.solve_structure(
        _broyden, f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, memory=memory
    )


def _low_rank(left, right, x):
    """`sum_i left_i (right_i . x)` per sample; buffers are `(batch, memory, n)`."""
    coefficients = tf.matmul(right, x[:, :, None])  # (batch, memory, 1)
    return tf.matmul(coefficients, left, transpose_a=True)[:, 0, :]


def _apply_inverse(us, vs, x):
    """`H x` with `H = -I + sum_i u_i v_i^T`."""
    return -x + _low_rank(us, vs, x)


def _apply_inverse_transposed(us, vs, x):
    """`H^T x` with `H = -I + sum_i u_i v_i^T`."""
    return -x + _low_rank(vs, us, x)


def _broyden(f, z0, unpack, max_iter, tol, stop_mode, memory):
    dtype = z0.dtype
    acc = res.accumulation_dtype(dtype)
    batch, n = tf.shape(z0)[0], tf.shape(z0)[1]
    tiny = tf.constant(1e-30 if acc == tf.float64 else 1e-20, acc)

    fz0 = f(z0)
    abs0, rel0 = res.residuals(fz0, z0)
    best0 = res.update_best(res.initial_best(z0), z0, abs0, rel0, stop_mode, tol)

    def body(k, z, g, us, vs, best, _):
        step = -_apply_inverse(us, vs, g)
        z_new, best = res.guard(best, z + step)
        step = z_new - z
        fz_new = f(z_new)
        g_new = fz_new - z_new
        abs_res, rel_res = res.residuals(fz_new, z_new)
        best = res.update_best(best, z_new, abs_res, rel_res, stop_mode, tol)
        dg = g_new - g
        # When the memory is full, restart from H = -I and make the newest secant
        # update against -I, so that the new model satisfies H dg = step.
        slot = (k - 1) % memory
        full = tf.logical_and(slot == 0, k > 1)
        us, vs = tf.cond(full, lambda: (tf.zeros_like(us), tf.zeros_like(vs)), lambda: (us, vs))
        v = _apply_inverse_transposed(us, vs, step)
        denom = tf.reduce_sum(tf.cast(v, acc) * tf.cast(dg, acc), axis=1, keepdims=True)
        ok = (tf.abs(denom) > tiny) & tf.reduce_all(tf.math.is_finite(dg), axis=1, keepdims=True)
        u = (step - _apply_inverse(us, vs, dg)) / tf.cast(
            tf.where(ok, denom, tf.ones_like(denom)), dtype
        )
        u = tf.where(ok, u, tf.zeros_like(u))
        us = res.write_slot(us, slot, u)
        vs = res.write_slot(vs, slot, v)
        return (
            k + 1,
            z_new,
            g_new,
            us,
            vs,
            best,
            res.keep_going(best, tol, stop_mode),
        )

    def cond(k, *rest):
        return tf.logical_and(rest[-1], k < max_iter)

    zeros = tf.zeros([batch, memory, n], dtype)
    go = res.keep_going(best0, tol, stop_mode)
    loop_vars = (tf.constant(1), z0, fz0 - z0, zeros, zeros, best0, go)
    steps, *_, best, _ = tf.while_loop(cond, body, loop_vars, maximum_iterations=max_iter)
    return res.to_result(best, steps, tol, stop_mode, unpack)
