"""`Unrolled`: autodiff through the whole forward solve (the reference)."""

import keras

from keras_deq import backend
from keras_deq.backward.base import Backward
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

    Examples:
        >>> Unrolled()
        Unrolled()
    """

    name = "unrolled"
    differentiates_forward = True

    def __call__(self, problem):
        if backend.name() == "tensorflow":
            result = problem.forward(lambda z: problem.fn(z, problem.x), problem.z0)
            return result.state, result
        with differentiable_loops(problem.max_steps):
            result = problem.forward(lambda z: problem.fn(z, problem.x), problem.z0)
        return result.state, result
