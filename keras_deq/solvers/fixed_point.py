"""Fixed-point (Picard) iteration with optional damping."""

import keras

from keras_deq.solvers import common
from keras_deq.solvers.base import Solver


@keras.saving.register_keras_serializable(package="keras_deq")
class FixedPoint(Solver):
    """Iterates `z <- (1 - damping) * z + damping * f(z)` to a fixed point.

    Args:
        max_iter: Maximum number of iterations (each evaluates `f` once).
        tol: Tolerance on the per-sample residual named by `stop_mode`.
        stop_mode: `"rel"` for `||f(z) - z|| / ||f(z)||`, `"abs"` for `||f(z) - z||`.
        damping: Step size in (0, 1]; 1 is plain Picard iteration.
        fixed_steps: If True, run exactly `max_iter` iterations and return the
            last iterate, `f` applied `max_iter` times for `damping=1` (the
            unrolled iterations of OptEq); `tol` then only decides `converged`.
            See `Solver`.

    Examples:
        >>> from keras import ops
        >>> solver = FixedPoint(tol=1e-6)
        >>> result = solver(lambda z: 0.5 * z + 1.0, ops.zeros((2, 3)))
        >>> bool(ops.all(result.converged))
        True
    """

    name = "fixed_point"
    cheap_step = True

    def __init__(self, max_iter=50, tol=1e-4, stop_mode="rel", damping=1.0, fixed_steps=False):
        super().__init__(max_iter, tol, stop_mode)
        self.damping = common.check_fraction("damping", damping)
        self.fixed_steps = common.check_bool("fixed_steps", fixed_steps)

    def step(self, f, z, fz, state, k):
        if self.damping == 1.0:
            return fz, state
        # A Python float takes the iterate's dtype exactly (no float32 rounding in
        # float64) on every backend.
        return z + self.damping * (fz - z), state


def fixed_point(f, z0, max_iter=50, tol=1e-4, stop_mode="rel", damping=1.0, fixed_steps=False):
    """Iterates `z <- (1 - damping) * z + damping * f(z)` to a fixed point.

    The function form of `FixedPoint(max_iter, tol, stop_mode, damping, fixed_steps)(f, z0)`.

    Args:
        f: The map, taking and returning a structure like `z0`.
        z0: The initial state: a `(batch, ...)` tensor or a nest of such tensors.
        max_iter: Maximum number of iterations (each evaluates `f` once).
        tol: Tolerance on the per-sample residual named by `stop_mode`.
        stop_mode: `"rel"` for `||f(z) - z|| / ||f(z)||`, `"abs"` for `||f(z) - z||`.
        damping: Step size in (0, 1]; 1 is plain Picard iteration.
        fixed_steps: If True, run exactly `max_iter` iterations and return the last
            iterate (see `FixedPoint`).

    Returns:
        A `SolverResult`.

    Examples:
        >>> from keras import ops
        >>> result = fixed_point(lambda z: 0.5 * z + 1.0, ops.zeros((2, 3)), tol=1e-6)
        >>> bool(ops.all(result.converged))
        True
    """
    common.check_callable("f", f)
    return FixedPoint(max_iter, tol, stop_mode, damping, fixed_steps)(f, z0)
