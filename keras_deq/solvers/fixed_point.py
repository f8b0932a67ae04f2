"""Fixed-point (Picard) iteration with optional damping."""

import tensorflow as tf

from keras_deq.solvers import common
from keras_deq.solvers import result as res


def fixed_point(f, z0, max_iter=50, tol=1e-4, stop_mode="rel", damping=1.0):
    """Iterates `z <- (1 - damping) * z + damping * f(z)` to a fixed point.

    Args:
        f: The map, taking and returning a structure like `z0`.
        z0: The initial state: a `(batch, ...)` tensor or a nest of such tensors.
        max_iter: Maximum number of iterations (each evaluates `f` once).
        tol: Tolerance on the per-sample residual named by `stop_mode`.
        stop_mode: `"rel"` for `||f(z) - z|| / ||f(z)||`, `"abs"` for `||f(z) - z||`.
        damping: Step size in (0, 1]; 1 is plain Picard iteration.

    Returns:
        A `SolverResult`.

    Examples:
        >>> import tensorflow as tf
        >>> result = fixed_point(lambda z: 0.5 * z + 1.0, tf.zeros([2, 3]), tol=1e-6)
        >>> bool(tf.reduce_all(result.converged))
        True
    """
    max_iter, tol, stop_mode = common.check_common(f, max_iter, tol, stop_mode)
    damping = common.check_fraction("damping", damping)
    return common.solve_structure(
        _fixed_point,
        f,
        z0,
        max_iter=max_iter,
        tol=tol,
        stop_mode=stop_mode,
        damping=damping,
    )


def _fixed_point(f, z0, unpack, max_iter, tol, stop_mode, damping):
    def body(k, z, best, _):
        fz = f(z)
        abs_res, rel_res = res.residuals(fz, z)
        best = res.update_best(best, z, abs_res, rel_res, stop_mode, tol)
        z_next = z + tf.constant(damping, z.dtype) * (fz - z) if damping != 1.0 else fz
        z_next, best = res.guard(best, z_next)
        return k + 1, z_next, best, res.keep_going(best, tol, stop_mode)

    def cond(k, z, best, go):
        return tf.logical_and(go, k < max_iter)

    loop_vars = (tf.constant(0), z0, res.initial_best(z0), tf.constant(True))
    steps, _, best, _ = tf.while_loop(cond, body, loop_vars, maximum_iterations=max_iter)
    return res.to_result(best, steps, tol, stop_mode, unpack)
