"""`MonDEQ`: the monotone operator DEQ (Winston & Kolter, NeurIPS 2020) as a layer.

A `MonotoneCell` (whose `I - W` is strongly monotone by construction) solved by plain
iteration of its splitting step, which is a contraction for every weight: the
equilibrium exists, is unique, and the forward and the adjoint iterations converge
to it whatever the weights' norms are.
"""

import keras

from keras_deq.layers.deq import DEQ
from keras_deq.layers.deq_arguments import is_fixed_point
from keras_deq.layers.monotone_cell import MonotoneCell


@keras.saving.register_keras_serializable(package="keras_deq")
class MonDEQ(DEQ):
    """A monotone operator DEQ layer (Winston & Kolter, NeurIPS 2020).

    Returns the unique `z*` with `z* = relu(W z* + U x + b)`,
    `W = (1 - m) I - A^T A + B - B^T`, for inputs `x` of shape `(batch, features)`;
    `z*` has shape `(batch, units)`. `A`, `B`, `U`, `b` are the weights of a
    `keras_deq.layers.MonotoneCell` (see there for the splittings and their step
    sizes): `I - W >= m I` for every `A` and `B`, so the equilibrium is unique and
    the splitting iteration is a contraction at every weight norm, with its step
    size derived from the weights at every call. The implicit backward's adjoint
    iteration is then a contraction too (the transposed Jacobian of a contraction).

    Args:
        units: Size of the equilibrium state.
        monotonicity: `m > 0` (see `MonotoneCell`); 0.1 as in the paper's code
            for its fully connected model.
        splitting: `"peaceman_rachford"` (default; a dense `units x units` inverse per
            solve, tens of iterations) or `"forward_backward"` (no inverse, but its
            guaranteed step `m / L^2` makes it slow when `||I - W||_2 / m` is large).
        alpha: Peaceman-Rachford's step (any positive float), or None (default)
            for `1 / sqrt(m L)` from the weights at every call. Must be None for
            forward-backward.
        kernel_initializer: Initializer of `A` and `B` (see `MonotoneCell`).
        injection_initializer: Initializer of `U`.
        solver: `"fixed_point"` (the default; `solver_options={"damping": t}` with
            `0 < t <= 1` is allowed), the iteration whose convergence the splitting
            guarantees. Anderson and Broyden are refused: they would find the same
            (unique) equilibrium when they converge, but nothing guarantees that they
            do. The adjoint solve (`backward_solver`) is linear and may use any solver.
        max_iter: As for `keras_deq.DEQ`.
        tol: As for `keras_deq.DEQ`, on the splitting's state.
        **kwargs: Other `keras_deq.DEQ` arguments (backward mode, Jacobian
            regularizer, ...) and base layer arguments.

    Example:

    ```python
    model = keras.Sequential([
        keras.Input((64,)),
        keras_deq.MonDEQ(units=64, monotonicity=0.1),
        keras.layers.Dense(10),
    ])
    ```
    """

    def __init__(
        self,
        units,
        monotonicity=0.1,
        splitting="peaceman_rachford",
        alpha=None,
        kernel_initializer=None,
        injection_initializer="glorot_uniform",
        solver="fixed_point",
        max_iter=100,
        tol=1e-4,
        **kwargs,
    ):
        kwargs.pop("cell", None)
        if not is_fixed_point(solver):
            raise ValueError(
                "MonDEQ's convergence is guaranteed for fixed-point iteration of the "
                "splitting step (a contraction); Anderson and Broyden have no such "
                "guarantee. Use solver='fixed_point' (optionally "
                f"solver_options={{'damping': t}}). Received: solver={solver!r}"
            )
        cell = MonotoneCell(
            units,
            monotonicity=monotonicity,
            splitting=splitting,
            alpha=alpha,
            kernel_initializer=kernel_initializer,
            injection_initializer=injection_initializer,
            dtype=kwargs.get("dtype"),
        )
        super().__init__(cell, solver=solver, max_iter=max_iter, tol=tol, **kwargs)

    @property
    def units(self):
        """Size of the equilibrium state (the cell's `units`)."""
        return self.cell.units

    def build(self, input_shape):
        if (
            isinstance(input_shape, dict)
            or len(input_shape) != 2
            or (isinstance(input_shape[0], (list, tuple)))
        ):
            raise ValueError(
                "MonDEQ expects inputs of shape (batch, features). "
                f"Received: input_shape={input_shape}"
            )
        super().build(input_shape)

    def call(self, inputs, initial_state=None, training=None):
        """Solves for the unique equilibrium.

        Args:
            inputs: `x`, of shape `(batch, features)`.
            initial_state: Optional starting state of the splitting, `(batch, units)`
                (`v` with `z = relu(v)` for Peaceman-Rachford, `z` for
                forward-backward); any start converges.
            training: Passed to the cell.

        Returns:
            `z*`, of shape `(batch, units)`, elementwise nonnegative.
        """
        state = super().call(inputs, initial_state=initial_state, training=training)
        return self.cell.readout(state)

    def get_config(self):
        config = super().get_config()
        config.pop("cell")
        config.pop("state_shape")
        cell = self.cell.get_config()
        for key in (
            "units",
            "monotonicity",
            "splitting",
            "alpha",
            "kernel_initializer",
            "injection_initializer",
        ):
            config[key] = cell[key]
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
