"""`SolverTrace`: the residual of every iteration of a solve, recorded on request."""

import inspect
from typing import Any, NamedTuple

from keras import ops


class SolverTrace(NamedTuple):
    """The residuals of each iteration of one solve, per sample, to plot convergence.

    Recorded only when asked for (`solver(f, z0, trace=True)`, or
    `keras_deq.DEQ.solver_trace`): otherwise the loop carries no buffer and
    `SolverResult.trace` is None. Row `k` holds the residuals of the iterate that
    iteration `k` evaluated (`z_0` is the start), `f` evaluated once per row; rows
    from `steps` on, which the solver did not run, are NaN.

    Attributes:
        abs_residual: `||f(z_k) - z_k||` per iteration and sample, shape
            `(max_iter, batch)` (float32, or float64 for a float64 state).
        rel_residual: `||f(z_k) - z_k|| / ||f(z_k)||`, same shape.
        steps: Scalar int32, the number of rows the solver filled.

    Example:

    ```python
    result = keras_deq.solvers.Anderson(max_iter=20)(f, z0, trace=True)
    per_sample = result.trace.rel_residual        # (20, batch)
    mean = result.trace.batch_mean().rel_residual  # (20,)
    ```
    """

    abs_residual: Any
    rel_residual: Any
    steps: Any

    def batch_mean(self):
        """The trace averaged over the samples: residuals of shape `(max_iter,)`.

        Returns:
            A `SolverTrace` whose residuals are the per-iteration means over the batch.
        """
        return self._replace(
            abs_residual=ops.mean(self.abs_residual, axis=1),
            rel_residual=ops.mean(self.rel_residual, axis=1),
        )


def empty(length, batch, dtype):
    """`(abs, rel)` buffers of `length` rows of NaN for a batch of `batch` samples."""
    nan = ops.full((length, batch), float("nan"), dtype=dtype)
    return nan, nan


def record(buffers, k, abs_residual, rel_residual):
    """`buffers` with row `k` (a scalar int tensor) set to the residuals `(batch,)`."""
    row = ops.expand_dims(ops.arange(ops.shape(buffers[0])[0], dtype="int32") == k, 1)
    return tuple(
        ops.where(row, ops.expand_dims(new, 0), old)
        for new, old in zip((abs_residual, rel_residual), buffers, strict=True)
    )


def check_traceable(solver):
    """True if `solver` can record a trace: it runs the shared loop (not a solver of
    its own, like `GMRES`) with an int `max_iter` (the buffer's static length)."""
    own = "trace" not in inspect.signature(solver.solve_flat).parameters
    if own or ops.is_tensor(solver.max_iter):
        raise ValueError(
            "`trace=True` needs a solver that runs the shared loop with an int `max_iter` "
            f"(the trace's static length). Received: solver={solver!r}"
        )
    return True
