"""Fixed-point solvers: objects whose settings are constructor arguments, one shared loop.

`FixedPoint`, `Anderson` and `Broyden` subclass `Solver`; `get` turns a name, a config
dict or an instance into a solver, like `keras.optimizers.get`. The function forms
(`anderson(f, z0, max_iter=..., ...)`) call the objects.
"""

from collections.abc import Mapping

import keras

from keras_deq.solvers.base import Solver, named_solvers

# isort: off
# Built-in solvers, in the order of `names()` (a solver registers its name on import).
from keras_deq.solvers.fixed_point import FixedPoint, fixed_point
from keras_deq.solvers.anderson import Anderson, anderson
from keras_deq.solvers.broyden import Broyden, broyden

# isort: on
from keras_deq.solvers.registry import names
from keras_deq.solvers.result import SolverResult

__all__ = [
    "Anderson",
    "Broyden",
    "FixedPoint",
    "Solver",
    "SolverResult",
    "anderson",
    "broyden",
    "deserialize",
    "fixed_point",
    "get",
    "names",
    "serialize",
]


def get(identifier, **overrides):
    """Returns a `Solver` from a name, a config dict or an instance.

    Args:
        identifier: A name from `names()` (`"fixed_point"`, `"anderson"`,
            `"broyden"`), a config dict as made by `serialize` (for example
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
    if isinstance(identifier, Solver):
        if not overrides:
            return identifier
        return type(identifier).from_config({**identifier.get_config(), **overrides})
    if isinstance(identifier, str) and identifier in named_solvers():
        return named_solvers()[identifier](**overrides)
    if isinstance(identifier, Mapping):
        return get(deserialize(identifier), **overrides)
    raise ValueError(
        f"Unknown solver. Expected one of {names()}, a config dict or a `Solver` instance. "
        f"Received: solver={identifier!r}"
    )


def serialize(solver):
    """The config dict of `solver` (`keras.saving.serialize_keras_object`)."""
    if not isinstance(solver, Solver):
        raise ValueError(f"`solver` must be a `Solver` instance. Received: solver={solver!r}")
    return keras.saving.serialize_keras_object(solver)


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
    if not isinstance(config, Mapping) or "class_name" not in config:
        raise ValueError(
            "`config` must be a dict with 'class_name' and 'config' keys, as made by "
            f"`keras_deq.solvers.serialize`. Received: config={config!r}"
        )
    module_objects = {cls.__name__: cls for cls in named_solvers().values()}
    try:
        solver = keras.saving.deserialize_keras_object(
            dict(config), module_objects=module_objects, custom_objects=custom_objects
        )
    except TypeError as error:  # unknown constructor arguments
        raise ValueError(f"{error}. Received: config={config!r}") from error
    if not isinstance(solver, Solver):
        raise ValueError(
            "`config` must describe a `Solver`: a built-in class "
            f"({', '.join(sorted(module_objects))}) or one registered with "
            f"`keras.saving.register_keras_serializable`. Received: config={config!r}"
        )
    return solver
