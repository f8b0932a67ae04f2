"""`DEQ.solver_trace`: the forward solver's residual at every iteration, on request."""

import functools

import keras

from keras_deq.layers import deq_state as state
from keras_deq.layers.cell_state import FrozenCellState


class SolverTraceMixin:
    """Mixin of `DEQ`: `solver_trace`, a forward solve that records its residuals."""

    def solver_trace(self, inputs, initial_state=None, training=False):
        """The residuals of every forward iteration on `inputs`, to plot convergence.

        Runs the layer's forward solve as a call would (same cell, solver, start and
        budget) with a `keras_deq.solvers.SolverTrace` recorded, without gradient,
        metrics or warnings. A plain call records nothing, so it costs nothing there.

        Args:
            inputs: The injection `x`, as for a call.
            initial_state: Optional starting state, as for a call.
            training: Passed to the cell; also picks the budget of a
                `keras_deq.solvers.Budget` (in training: its `max_iter`, the most a
                training call may draw).

        Returns:
            A `SolverTrace`: residuals `(max_iter, samples)` per iteration, NaN after
            the last iteration run; `.batch_mean()` averages over the samples.

        Example:

        ```python
        trace = layer.solver_trace(x)
        plt.semilogy(keras.ops.convert_to_numpy(trace.batch_mean().rel_residual))
        ```
        """
        inputs = keras.tree.map_structure(keras.ops.convert_to_tensor, inputs)
        if not self.built:
            self.build(keras.tree.map_structure(lambda t: tuple(t.shape), inputs))
        z0, evaluate = self._start(inputs, initial_state, training)
        budget = self.max_iter if training or self.budget is None else self.budget.for_call(False)
        solve = self._solver(
            self._forward,
            None if budget == self.max_iter else budget,
            maps=state.solver_maps(self.cell, self._forward),
            trace=True,
        )
        fn = functools.partial(FrozenCellState(self.cell).call, evaluate)
        z0 = keras.tree.map_structure(keras.ops.stop_gradient, z0)
        x = keras.tree.map_structure(keras.ops.stop_gradient, inputs)
        return solve(lambda z: fn(z, x), z0).trace
