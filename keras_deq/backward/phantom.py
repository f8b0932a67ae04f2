"""`Phantom`: autodiff through a few damped steps from the fixed point."""

import keras

from keras_deq import backend
from keras_deq.backward import rows
from keras_deq.backward.base import JacobianFree
from keras_deq.solvers import common


@keras.saving.register_keras_serializable(package="keras_deq")
class Phantom(JacobianFree):
    """`steps` damped steps `z <- (1 - damping) z + damping f(z, x)` from `z*`, differentiated.

    A phantom gradient: an approximation whose cost and memory grow with `steps`,
    not with the solver's iterations. With `damping=1` and many steps it tends to
    the exact (implicit) gradient of a contractive cell. A sample whose step is not
    finite keeps its last finite state.

    Args:
        steps: Number of damped steps, >= 1.
        damping: The damping `tau` in (0, 1].

    Examples:
        >>> Phantom(steps=8)
        Phantom(steps=8, damping=0.5)
    """

    name = "phantom"

    def __init__(self, steps=5, damping=0.5):
        self.steps = common.check_positive_int("steps", steps)
        self.damping = common.check_fraction("damping", damping)

    def refine(self, fn, x, z):
        tau = self.damping

        def damped_step(z):
            fz = fn(z, x)
            z_next = keras.tree.map_structure(lambda a, b: (1.0 - tau) * a + tau * b, z, fz)
            return rows.select_rows(rows.finite_rows(z_next), z_next, z)

        return backend.differentiable_loop(damped_step, z, self.steps)
