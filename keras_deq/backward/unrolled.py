"""`Unrolled`: autodiff through the whole forward solve (the reference)."""

import keras

from keras_deq import backend
from keras_deq.backward.base import Backward
from keras_deq.solvers import common
from keras_deq.solvers.base import differentiable_loops


@keras.saving.register_keras_serializable(package="keras_deq")
class Unrolled(Backward):
    """Autodiff through every iteration of the forward solver.

    The reference gradient of what the solver computed (not of the exact fixed
    point); memory grows with the number of solver steps.

    On JAX, which cannot reverse-differentiate a while loop, the solver loop runs
    as a `fori_loop` of `max_iter` iterations whose iterations after the solver's
    stop are skipped (see `keras_deq.solvers.base.differentiable_loops`): the
    gradient is the same, but memory grows with `max_iter`, not with the steps run.

    With `remat=True` every cell evaluation is rematerialized (`keras.remat`:
    `tf.recompute_grad`, `jax.checkpoint`, `torch.utils.checkpoint`): the backward
    pass keeps only each iteration's input state and recomputes the cell's
    intermediate tensors from it, one evaluation at a time. The gradient is the
    same; memory still grows with the steps, by the state (and the solver's own
    history) per step instead of everything the cell computes, at the cost of one
    more cell evaluation per step.

    Args:
        remat: If True, recompute each cell evaluation in the backward pass instead
            of keeping its intermediate tensors.

    Examples:
        >>> Unrolled(remat=True)
        Unrolled(remat=True)
    """

    name = "unrolled"
    differentiates_forward = True

    def __init__(self, remat=False):
        self.remat = common.check_bool("remat", remat)

    def _cell(self, problem):
        """`z -> fn(z, x)`, rematerialized on flat tensors when `remat` is set."""
        fn, x = problem.fn, problem.x
        if not self.remat:
            return lambda z: fn(z, x)
        # The weights' values are inputs of the rematerialized function, not captures:
        # TensorFlow cannot differentiate a `tf.recompute_grad` that reads a variable
        # inside a while loop.
        variables = problem.variables if backend.name() == "tensorflow" else ()
        values = [v.value for v in variables]
        x_flat = keras.tree.flatten(x)
        n, m = len(keras.tree.flatten(problem.z0)), len(x_flat)

        def flat_fn(*tensors):
            z = keras.tree.pack_sequence_as(problem.z0, tensors[:n])
            x_in = keras.tree.pack_sequence_as(x, tensors[n : n + m])
            if not variables:  # an empty scope would hide the enclosing one (JAX's step)
                return tuple(keras.tree.flatten(fn(z, x_in)))
            with keras.StatelessScope(state_mapping=zip(variables, tensors[n + m :], strict=True)):
                return tuple(keras.tree.flatten(fn(z, x_in)))

        step = keras.remat(flat_fn)
        return lambda z: keras.tree.pack_sequence_as(
            problem.z0, step(*keras.tree.flatten(z), *x_flat, *values)
        )

    def __call__(self, problem):
        cell = self._cell(problem)
        if backend.name() == "tensorflow":
            result = problem.forward(cell, problem.z0)
            return result.state, result
        with differentiable_loops(problem.max_steps):
            result = problem.forward(cell, problem.z0)
        return result.state, result
