"""Fixed-point solvers sharing one call shape: `solver(f, z0, max_iter, tol, stop_mode, **options)`."""

from keras_deq.solvers.anderson import anderson
from keras_deq.solvers.broyden import broyden
from keras_deq.solvers.fixed_point import fixed_point
from keras_deq.solvers.registry import get, names
from keras_deq.solvers.result import SolverResult

__all__ = ["SolverResult", "anderson", "broyden", "fixed_point", "get", "names"]
