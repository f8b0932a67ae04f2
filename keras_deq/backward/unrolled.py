"""`Unrolled`: autodiff through the whole forward solve (the reference)."""

import keras

from keras_deq.backward.base import Backward


@keras.saving.register_keras_serializable(package="keras_deq")
class Unrolled(Backward):
    """Autodiff through every iteration of the forward solver.

    The reference gradient of what the solver computed (not of the exact fixed
    point); memory grows with the number of solver steps.

    Example:
        >>> Unrolled()
        Unrolled()
    """

    name = "unrolled"
    differentiates_forward = True

    def __call__(self, problem):
        result = problem.forward(lambda z: problem.fn(z, problem.x), problem.z0)
        return result.state, result
