"""`Phantom`: autodiff through a few damped steps from the fixed point."""

import keras

from keras_deq.backward.base import JacobianFree
from keras_deq.solvers import common
from keras_deq.solvers.base import differentiable_loops
from keras_deq.solvers.fixed_point import FixedPoint


@keras.saving.register_keras_serializable(package="keras_deq")
class Phantom(JacobianFree):
    """`steps` damped steps `z <- (1 - damping) z + damping f(z, x)` from `z*`, differentiated.

    A phantom gradient: an approximation whose cost and memory grow with `steps`,
    not with the solver's iterations. With `damping=1` and many steps it tends to
    the exact (implicit) gradient of a contractive cell. The steps are the shared
    solver loop, `FixedPoint(max_iter=steps, damping=damping, fixed_steps=True)`,
    differentiated through (`differentiable_loops`): a sample for which the cell
    gives NaN or Inf keeps its last iterate where the cell was finite.

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
        steps = FixedPoint(self.steps, damping=self.damping, fixed_steps=True)
        with differentiable_loops():
            return steps(lambda v: fn(v, x), z).state
