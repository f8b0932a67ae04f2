"""`Explicit`: the cell applied a fixed number of times, no solver (pre-training)."""

import keras

from keras_deq import backend
from keras_deq.backward.base import Backward
from keras_deq.solvers import common
from keras_deq.solvers import result as result_lib
from keras_deq.solvers.packing import Packer


@keras.saving.register_keras_serializable(package="keras_deq")
class Explicit(Backward):
    """Applies the cell `depth` times from the starting state, differentiated by autodiff.

    The layer is then an explicit weight-tied network of `depth` layers: the
    "pretrain" phase of the DEQ recipes, which trains the cell briefly before the
    solver takes over (`keras_deq.callbacks.ExplicitPretraining` switches a `DEQ`
    into this mode and back). No solver runs; memory grows with `depth`. The
    returned `SolverResult` has the residuals of the last application
    (`z_depth - z_{depth-1}`), compared with the problem's `tol`.

    Args:
        depth: Number of cell applications, >= 1.

    Example:
        >>> Explicit(depth=6)
        Explicit(depth=6)
    """

    # It differentiates the whole forward computation (a cell's own start included).
    differentiates_forward = True

    def __init__(self, depth):
        self.depth = common.check_positive_int("depth", depth)

    def __call__(self, problem):
        fn, x = problem.fn, problem.x
        z = problem.z0
        if self.depth > 1:
            z = backend.differentiable_loop(lambda z: fn(z, x), z, self.depth - 1)
        fz = fn(z, x)
        packer = Packer(z)
        abs_res, rel_res = result_lib.residuals(packer.pack(fz), packer.pack(z))
        residual = rel_res if problem.stop_mode == "rel" else abs_res
        steps = keras.ops.convert_to_tensor(self.depth, "int32")
        result = result_lib.SolverResult(fz, steps, abs_res, rel_res, residual <= problem.tol)
        return fz, result
