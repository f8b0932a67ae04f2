"""`OneStep`: the Jacobian-free gradient of one cell application at the fixed point."""

import keras

from keras_deq.backward.base import JacobianFree


@keras.saving.register_keras_serializable(package="keras_deq")
class OneStep(JacobianFree):
    """One step `f(z*, x)` differentiated by autodiff: `(I - J)^{-1} ~ I`.

    The cheapest gradient: one extra cell application, no adjoint solve. An
    approximation that is good when the cell is strongly contractive.

    Examples:
        >>> OneStep()
        OneStep()
    """

    name = "one_step"

    def refine(self, fn, x, z):
        return fn(z, x)
