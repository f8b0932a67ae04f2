"""`FixedPointCorrection`: losses on states sampled along the forward solve."""

import keras

from keras_deq import backward as backward_lib
from keras_deq import configurable
from keras_deq.backward import rows
from keras_deq.backward.base import JacobianFree
from keras_deq.solvers import common
from keras_deq.solvers.base import recording

WEIGHTINGS = ("exponential", "linear", "constant")


@keras.saving.register_keras_serializable(package="keras_deq")
class FixedPointCorrection(configurable.Configurable):
    """Supervises states sampled along the forward solve (fixed-point correction).

    As in DEQ optical flow and TorchDEQ's `n_states` / `indexing`: the forward
    solver keeps the iterates `z_i` at a few iterations `i`, each gets a cheap
    gradient (`gradient.refine` from `z_i`: one differentiated step for
    `OneStep`, a few damped ones for `Phantom`), and a `DEQ(correction=...)`
    returns them before its fixed point: `[state_1, ..., state_n, z*]`, `z*` with
    the layer's own backward mode. Put a head on each and weight their losses
    with `loss_weights()` in `model.compile`. An iteration past the solver's stop
    gets `z*` (with the cheap gradient).

    Args:
        states: Number of sampled states `n`, >= 1; evenly spaced along the
            forward budget `max_iter` unless `indexing` is given.
        indexing: None, or the iterations to sample (`n` distinct positive ints,
            increasing, at most the layer's `max_iter`).
        gradient: The cheap gradient of each sampled state: a Jacobian-free
            backward mode (`"one_step"`, `"phantom"`, or such an object).
        weighting: How `loss_weights()` weights the `n + 1` losses, the last
            (`z*`) weighing 1: `"exponential"` (`gamma ** (n - j)` for the `j`-th),
            `"linear"` (`(j + 1) / (n + 1)`) or `"constant"` (1).
        gamma: The ratio of the exponential weighting, in (0, 1].

    Examples:
        >>> correction = FixedPointCorrection(states=2)
        >>> correction.indices(12)  # for `DEQ(max_iter=12, correction=correction)`
        (4, 8)
        >>> [round(w, 2) for w in correction.loss_weights()]
        [0.64, 0.8, 1.0]
    """

    def __init__(
        self, states=2, indexing=None, gradient="one_step", weighting="exponential", gamma=0.8
    ):
        self.states = common.check_positive_int("states", states)
        if indexing is not None:
            indexing = [common.check_positive_int("indexing", i) for i in indexing]
            if len(indexing) != self.states or sorted(set(indexing)) != indexing:
                raise ValueError(
                    "`indexing` must hold `states` distinct increasing iterations. "
                    f"Received: indexing={indexing}, states={states}"
                )
        self.indexing = indexing
        mode = backward_lib.get(gradient)
        if not isinstance(mode, JacobianFree):
            raise ValueError(
                "`gradient` must be a Jacobian-free backward mode (`OneStep`, `Phantom`). "
                f"Received: gradient={gradient!r}"
            )
        self.gradient = mode
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"`weighting` must be one of {WEIGHTINGS}. Received: weighting={weighting!r}"
            )
        self.weighting = weighting
        self.gamma = common.check_fraction("gamma", gamma)

    def get_config(self):
        return {**super().get_config(), "gradient": backward_lib.serialize(self.gradient)}

    def indices(self, max_iter):
        """The sampled iterations for a forward budget `max_iter` (a Python int).

        Raises:
            ValueError: if they do not fit in `max_iter` distinct iterations.
        """
        if self.indexing is not None:
            if self.indexing[-1] > max_iter:
                raise ValueError(
                    "`indexing` must stay within the forward budget. "
                    f"Received: indexing={self.indexing}, max_iter={max_iter}"
                )
            return tuple(self.indexing)
        n = self.states
        if n >= max_iter:
            raise ValueError(
                "`states` must be below the forward `max_iter` to sample distinct iterations. "
                f"Received: states={n}, max_iter={max_iter}"
            )
        return tuple(round((j + 1) * max_iter / (n + 1)) for j in range(n))

    def recorded(self, solve, max_iter):
        """The solve `(f, z0, ...) -> SolverResult` keeping its iterates at `indices`."""
        indices = self.indices(max_iter)

        def solve_recorded(f, z0, **maps):
            with recording(indices):
                return solve(f, z0, **maps)

        return solve_recorded

    def loss_weights(self):
        """The `n + 1` loss weights, for `model.compile(loss_weights=...)`."""
        n = self.states
        if self.weighting == "exponential":
            return [self.gamma ** (n - j) for j in range(n + 1)]
        if self.weighting == "linear":
            return [(j + 1) / (n + 1) for j in range(n + 1)]
        return [1.0] * (n + 1)

    def __call__(self, fn, x, result, z):
        """The sampled states of the solve `result` with their cheap gradient, a list.

        Args:
            fn: The cell, `(z, x) -> next z`.
            x: The injection.
            result: The forward `SolverResult`, with the sampled states in `recorded`
                (None: the solve was not recorded, e.g. explicit pre-training; then
                each sampled state is `z`).
            z: The layer's output state.
        """
        if result.recorded is None:
            return [z] * self.states
        ok = rows.solved_rows(result, x)
        return [self.gradient.differentiate(fn, x, state, ok) for state in result.recorded]
