"""Argument checks and the structure wrapper shared by every solver."""

import numbers

import tensorflow as tf

from keras_deq.solvers.packing import Packer
from keras_deq.solvers.result import STOP_MODES


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


def check_positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number. Received: {name}={value!r}")
    return float(value)


def check_nonnegative_float(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"`{name}` must be a non-negative number. Received: {name}={value!r}")
    return float(value)


def check_fraction(name, value):
    """A number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError(f"`{name}` must be a number in (0, 1]. Received: {name}={value!r}")
    return float(value)


def check_stop_mode(stop_mode):
    if stop_mode not in STOP_MODES:
        raise ValueError(
            f"`stop_mode` must be one of {STOP_MODES}. Received: stop_mode={stop_mode!r}"
        )
    return stop_mode


def check_common(f, max_iter, tol, stop_mode):
    if not callable(f):
        raise ValueError(f"`f` must be callable. Received: f={f!r}")
    return (
        check_positive_int("max_iter", max_iter),
        check_positive_float("tol", tol),
        check_stop_mode(stop_mode),
    )


def solve_structure(flat_solver, f, z0, **kwargs):
    """Runs `flat_solver` on the packed form of `z0` and unpacks its result.

    Args:
        flat_solver: A function `(f_flat, z0_flat, unpack, **kwargs) -> SolverResult`
            working on `(batch, n)` matrices.
        f: The map, taking and returning the structure of `z0`.
        z0: The initial state: a tensor or a nest of tensors sharing the batch dim.
        **kwargs: Passed to `flat_solver`.
    """
    z0 = tf.nest.map_structure(tf.convert_to_tensor, z0)
    packer = Packer(z0)
    if not packer.dtype.is_floating:
        raise ValueError(
            f"`z0` must be a floating-point tensor or a nest of them. Received: z0 with dtype={packer.dtype.name}"
        )
    return flat_solver(packer.flat_fn(f), packer.pack(z0), packer.unpack, **kwargs)


def per_entry(solve, batch_dims):
    """Wraps `solve(f, z0)` so that the first `batch_dims` axes are all batch axes.

    With `batch_dims=2` and a `(batch, T, d)` state, each of the `batch * T`
    positions is its own sample for the solver: its own mixing weights (Anderson),
    Jacobian estimate (Broyden), residual, tolerance test and returned iterate.
    A cell that is causal along `T` then stays exactly causal whatever the solver.

    Args:
        solve: A function `(f, z0) -> SolverResult` on single-tensor states.
        batch_dims: Number of leading axes to treat as batch axes, >= 1.

    Returns:
        A function `(f, z0) -> SolverResult` whose state has `z0`'s shape and whose
        residuals and `converged` have shape `(prod(z0.shape[:batch_dims]),)`.
    """
    if batch_dims == 1:
        return solve

    def solve_entries(f, z0):
        lead = tf.shape(z0)[:batch_dims]

        def merge(z):
            return tf.reshape(z, tf.concat([[-1], tf.shape(z)[batch_dims:]], 0))

        def split(z):
            return tf.reshape(z, tf.concat([lead, tf.shape(z)[1:]], 0))

        result = solve(lambda z: merge(f(split(z))), merge(z0))
        return result._replace(state=split(result.state))

    return solve_entries
