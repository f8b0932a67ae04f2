"""Limited-memory ("good") Broyden's method on g(z) = f(z) - z."""

import keras
from keras import ops

from keras_deq.solvers import common
from keras_deq.solvers import result as res
from keras_deq.solvers.base import Solver


@keras.saving.register_keras_serializable(package="keras_deq")
class Broyden(Solver):
    """Finds a root of `g(z) = f(z) - z` with a low-rank inverse-Jacobian model.

    The inverse Jacobian of `g` starts at `-I` (so the first step is a Picard step)
    and receives one rank-one "good Broyden" update per iteration. When `memory`
    updates are stored, the model restarts from `-I` plus the newest secant update.
    Unlike Picard iteration, it can converge when `f` is not a contraction, e.g. a
    linear map with spectral radius above 1.

    Args:
        max_iter: Maximum number of evaluations of `f`.
        tol: Tolerance on the per-sample residual named by `stop_mode`.
        stop_mode: `"rel"` for `||f(z) - z|| / ||f(z)||`, `"abs"` for `||f(z) - z||`.
        memory: Number of rank-one updates stored before the model restarts.

    Examples:
        >>> from keras import ops
        >>> solver = Broyden(tol=1e-6)
        >>> result = solver(lambda z: 1.5 * z + 1.0, ops.zeros((2, 3)))
        >>> bool(ops.all(result.converged))
        True
    """

    name = "broyden"

    def __init__(self, max_iter=50, tol=1e-4, stop_mode="rel", memory=20):
        super().__init__(max_iter, tol, stop_mode)
        self.memory = common.check_positive_int("memory", memory)

    def init(self, f, z0):
        # The previous iterate and residual (for the secant pair; the first iteration
        # makes no update), and the rank-one terms u_i, v_i of H = -I + sum_i u_i v_i^T.
        batch, n = ops.shape(z0)
        zeros = ops.zeros((batch, self.memory, n), z0.dtype)
        return z0, ops.zeros_like(z0), zeros, zeros

    def step(self, f, z, fz, state, k):
        z_prev, g_prev, us, vs = state
        g = fz - z
        # Update the model with the secant pair of the last step (none before the first
        # step). z is the iterate the loop kept: for a sample frozen by the non-finite
        # guard, s = its best iterate - z_prev. When the memory is full, restart from
        # H = -I and make the newest secant update against -I, so that H dg = s.
        slot = (k - 1) % self.memory
        restart = ops.logical_and(slot == 0, k > 1)
        branch = ops.where(k > 0, ops.where(restart, 2, 1), 0)
        s, dg = z - z_prev, g - g_prev
        us, vs = ops.switch(
            branch,
            [
                lambda us, vs: (us, vs),
                lambda us, vs: self._update(s, dg, slot, us, vs),
                lambda us, vs: self._update(s, dg, slot, ops.zeros_like(us), ops.zeros_like(vs)),
            ],
            us,
            vs,
        )
        z_next = z + -_apply_inverse(us, vs, g)
        return z_next, (z, g, us, vs)

    def _update(self, s, dg, slot, us, vs):
        """Writes the good-Broyden rank-one term of the pair `(s, dg)` into `slot`."""
        dtype = s.dtype
        acc = res.accumulation_dtype(dtype)
        v = _apply_inverse_transposed(us, vs, s)
        denom = res.row_sums(ops.cast(v, acc) * ops.cast(dg, acc))[:, None]
        ok = (ops.abs(denom) > res.tiny_for(acc)) & ops.all(ops.isfinite(dg), axis=1, keepdims=True)
        u = (s - _apply_inverse(us, vs, dg)) / ops.cast(
            ops.where(ok, denom, ops.ones_like(denom)), dtype
        )
        u = ops.where(ok, u, ops.zeros_like(u))
        return res.write_slot(us, slot, u), res.write_slot(vs, slot, v)


def broyden(f, z0, max_iter=50, tol=1e-4, stop_mode="rel", memory=20):
    """Finds a root of `g(z) = f(z) - z` with a low-rank inverse-Jacobian model.

    The function form of `Broyden(max_iter, tol, stop_mode, memory)(f, z0)`. The
    inverse Jacobian of `g` starts at `-I` (so the first step is a Picard step)
    and receives one rank-one "good Broyden" update per iteration. When `memory`
    updates are stored, the model restarts from `-I` plus the newest secant update.
    Unlike Picard iteration, it can converge when `f` is not a contraction, e.g. a
    linear map with spectral radius above 1.

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
        >>> from keras import ops
        >>> result = broyden(lambda z: 1.5 * z + 1.0, ops.zeros((2, 3)), tol=1e-6)
        >>> bool(ops.all(result.converged))
        True
    """
    common.check_callable("f", f)
    return Broyden(max_iter, tol, stop_mode, memory)(f, z0)


def _low_rank(left, right, x):
    """`sum_i left_i (right_i . x)` per sample; buffers are `(batch, memory, n)`."""
    coefficients = ops.matmul(right, x[:, :, None])  # (batch, memory, 1)
    row = ops.reshape(coefficients, (-1, 1, left.shape[1]))  # (batch, 1, memory)
    return ops.matmul(row, left)[:, 0, :]


def _apply_inverse(us, vs, x):
    """`H x` with `H = -I + sum_i u_i v_i^T`."""
    return -x + _low_rank(us, vs, x)


def _apply_inverse_transposed(us, vs, x):
    """`H^T x` with `H = -I + sum_i u_i v_i^T`."""
    return -x + _low_rank(vs, us, x)
