"""`Explicit`: the cell applied a fixed number of times (pre-training), on the solver loop."""

import keras

from keras_deq.backward.base import Backward
from keras_deq.solvers import common
from keras_deq.solvers.base import differentiable_loops
from keras_deq.solvers.fixed_point import FixedPoint


@keras.saving.register_keras_serializable(package="keras_deq")
class Explicit(Backward):
    """Applies the cell `depth` times from the starting state, differentiated by autodiff.

    The layer is then an explicit weight-tied network of `depth` layers: the
    "pretrain" phase of the DEQ recipes, which trains the cell briefly before the
    solver takes over (`keras_deq.callbacks.ExplicitPretraining` switches a `DEQ`
    into this mode and back). Memory grows with `depth`. It is the shared solver
    loop run for exactly `depth` steps, `FixedPoint(max_iter=depth,
    fixed_steps=True)`, differentiated through (`differentiable_loops`): the
    returned `SolverResult` has the residuals of the last application
    (`z_depth - z_{depth-1}`), compared with the problem's `tol`, and a sample
    for which the cell gives NaN or Inf is frozen at its last finite iterate.

    Args:
        depth: Number of cell applications, >= 1.

    Examples:
        >>> Explicit(depth=6)
        Explicit(depth=6)
    """

    # It differentiates the whole forward computation (a cell's own start included).
    differentiates_forward = True

    def __init__(self, depth):
        self.depth = common.check_positive_int("depth", depth)

    def __call__(self, problem):
        steps = FixedPoint(self.depth, problem.tol, problem.stop_mode, fixed_steps=True)
        with differentiable_loops():
            result = steps(lambda z: problem.fn(z, problem.x), problem.z0)
        return result.state, result
