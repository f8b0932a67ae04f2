"""`Backward`: how the gradient of an equilibrium reaches the injection and the weights.

A backward mode is an object whose settings are its constructor arguments. It is
called with an `Equilibrium` (the cell, the injection, the starting state and the
solvers) and returns the output state, with whatever gradient the mode defines,
and the forward `SolverResult`.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import keras

from keras_deq import backend, configurable
from keras_deq.backward import rows


class Equilibrium(NamedTuple):
    """The problem a backward mode differentiates: `z* = fn(z*, x)`.

    Attributes:
        fn: The cell as a function `(z, x) -> next z`, structures in and out.
        x: The injection: a tensor or a nest of tensors, differentiable.
        z0: The starting state, a nest matching `fn`'s output. Not differentiated.
        forward: `solve(f, z0) -> SolverResult` for the forward fixed point.
        adjoint: `solve(h, u0) -> SolverResult` for the adjoint fixed point (used by
            the modes that solve it, e.g. `Implicit`); None if there is none.
        variables: The trainable variables `fn` reads.
        on_backward: Optional callback receiving the adjoint `SolverResult` when the
            gradient is computed (for statistics); may return ops the gradient
            must wait for.
        tol: The forward tolerance (for modes that report convergence themselves).
        stop_mode: `"rel"` or `"abs"`, the residual compared with `tol`.
        stateless_fn: The cell with its trainable weights passed in,
            `(z, x, weights) -> next z`, for backends whose custom gradients cannot
            close over the weights (JAX); None where not needed.
        weights: The current values of `variables`, for `stateless_fn`.
        max_steps: A Python int bounding the forward solver's iterations when its
            `max_iter` is a tensor (a budget drawn at run time), for the modes that
            unroll the solver loop with static bounds (`Unrolled` on JAX); None
            where the solver's `max_iter` is an int.
    """

    fn: Callable
    x: Any
    z0: Any
    forward: Callable
    adjoint: Callable | None = None
    variables: tuple = ()
    on_backward: Callable | None = None
    tol: float = 1e-4
    stop_mode: str = "rel"
    stateless_fn: Callable | None = None
    weights: tuple = ()
    max_steps: int | None = None


class Backward(configurable.Configurable):
    """Base class of the backward modes.

    A subclass declares its settings as constructor arguments, checks them there
    and stores each under the attribute of the same name (read back by
    `get_config`), and implements `__call__`. Set the class attribute `name` to
    make it reachable by `keras_deq.backward.get(name)` and by `DEQ(backward=name)`;
    register it with `keras.saving.register_keras_serializable` for `.keras` files.
    A mode that refines the forward fixed point with a few differentiable steps
    only needs to subclass `JacobianFree` and implement `refine`.
    """

    family = "backward mode"
    # Whether the mode differentiates through the forward solve itself (then that
    # solve must stay differentiable: it is not compiled apart, see `DEQ.jit_compile`).
    differentiates_forward = False
    _registry = {}

    def __call__(self, problem):
        """Solves `problem` and returns `(z, forward_result)`.

        Args:
            problem: An `Equilibrium`.

        Returns:
            A tuple: the output state (the structure of `problem.z0`), differentiable
            as the mode defines, and the forward `SolverResult`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `__call__`.")


class JacobianFree(Backward):
    """A mode that solves without gradient, then differentiates a few steps from `z*`.

    The forward solve sees constant inputs and is not recorded. `refine(fn, x, z)`
    then maps the fixed point `z` (a constant) to the output by differentiable
    cell applications: the gradient is the autodiff of those applications. A
    sample whose solve found no finite iterate keeps `z*` and gets an exactly zero
    gradient (its inputs to `refine` are zeroed).
    """

    def refine(self, fn, x, z):
        """The differentiable map from the fixed point `z` to the output state."""
        raise NotImplementedError(f"{type(self).__name__} must implement `refine`.")

    def __call__(self, problem):
        fn, x = problem.fn, problem.x
        x_const = keras.tree.map_structure(keras.ops.stop_gradient, x)
        with backend.not_recorded():
            result = problem.forward(lambda z: fn(z, x_const), problem.z0)
        return self.differentiate(fn, x, result.state, rows.solved_rows(result, x)), result

    def differentiate(self, fn, x, z, ok):
        """`refine(fn, x, z)` from the constant state `z`; the samples not `ok` (no
        finite iterate) keep `z` with an exactly zero gradient."""
        z = keras.tree.map_structure(keras.ops.stop_gradient, z)
        out = self.refine(fn, rows.mask_rows(x, ok, lazy=True), rows.mask_rows(z, ok, lazy=True))
        return rows.select_rows(ok, out, z, lazy=True)


def get(identifier, **overrides):
    """Returns a `Backward` from a name, a config dict or an instance.

    Args:
        identifier: A name (`"implicit"`, `"phantom"`, `"one_step"`, `"unrolled"`),
            a config dict as made by `serialize`, or a `Backward` instance (returned
            as is when there are no `overrides`).
        **overrides: Settings (`steps=8` for `"phantom"`), checked by the constructor.

    Examples:
        >>> get("phantom", steps=8)
        Phantom(steps=8, damping=0.5)
    """
    return configurable.get(Backward, identifier, "backward", **overrides)


def serialize(backward):
    """The config dict of `backward` (`keras.saving.serialize_keras_object`)."""
    return configurable.serialize(Backward, backward, "backward")


def deserialize(config, custom_objects=None):
    """The `Backward` described by `config`, as made by `serialize`."""
    return configurable.deserialize(Backward, config, "backward", custom_objects)


def names():
    """The names `get` accepts, in registration order."""
    return tuple(Backward._registry)
