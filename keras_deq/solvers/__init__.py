"""Fixed-point solvers: objects whose settings are constructor arguments, one shared loop.

`FixedPoint`, `Anderson` and `Broyden` subclass `Solver`; `get` turns a name, a config
dict or an instance into a solver, like `keras.optimizers.get`. The function forms
(`anderson(f, z0, max_iter=..., ...)`) call the objects. `GMRES` (`"gmres"`) solves
affine fixed points only: the adjoint of the implicit gradient, not a DEQ's forward
pass. `SAM`, OptEq's sequential averaging method, is reachable as an object only (it
takes a prior's gradient).
"""

from keras_deq import configurable
from keras_deq.solvers.base import Solver

# isort: off
# Built-in solvers, in the order of `names()` (a solver registers its name on import).
from keras_deq.solvers.fixed_point import FixedPoint, fixed_point
from keras_deq.solvers.anderson import Anderson, anderson
from keras_deq.solvers.broyden import Broyden, broyden
from keras_deq.solvers.gmres import GMRES, gmres

# isort: on
from keras_deq.solvers.budget import Budget
from keras_deq.solvers.registry import names
from keras_deq.solvers.result import SolverResult
from keras_deq.solvers.sam import SAM
from keras_deq.solvers.trace import SolverTrace

__all__ = [
    "Anderson",
    "Broyden",
    "Budget",
    "FixedPoint",
    "GMRES",
    "SAM",
    "Solver",
    "SolverResult",
    "SolverTrace",
    "anderson",
    "broyden",
    "deserialize",
    "fixed_point",
    "get",
    "gmres",
    "names",
    "serialize",
]


def get(identifier, **overrides):
    """Returns a `Solver` from a name, a config dict or an instance.

    Args:
        identifier: A name from `names()` (`"fixed_point"`, `"anderson"`,
            `"broyden"`, `"gmres"`), a config dict as made by `serialize` (for example
            `{"class_name": "Anderson", "config": {"window": 3}}`), or a `Solver`
            instance, returned as is when there are no `overrides`.
        **overrides: Settings for the solver (`max_iter=30, window=3`), checked by
            its constructor; with an instance or a dict, they replace its settings
            in a new solver.

    Returns:
        A `Solver`.

    Examples:
        >>> get("anderson", window=3)
        Anderson(max_iter=50, tol=0.0001, stop_mode='rel', window=3, beta=1.0, ridge=0.0001)
        >>> get({"class_name": "FixedPoint", "config": {"damping": 0.5}}).damping
        0.5
    """
    return configurable.get(Solver, identifier, "solver", **overrides)


def serialize(solver):
    """The config dict of `solver` (`keras.saving.serialize_keras_object`)."""
    return configurable.serialize(Solver, solver, "solver")


def deserialize(config, custom_objects=None):
    """The `Solver` described by `config`, as made by `serialize`.

    Args:
        config: A dict with `"class_name"` (a built-in class such as `"Anderson"`, or
            a class registered with `keras.saving.register_keras_serializable`) and
            `"config"` (its constructor arguments).
        custom_objects: Optional `{name: class}` for unregistered classes.

    Returns:
        A `Solver`.
    """
    return configurable.deserialize(Solver, config, "config", custom_objects)
