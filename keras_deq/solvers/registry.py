"""Look-up of solvers by name, and the checks of the function API's options.

Which solvers exist, and which options each takes, come from the `Solver` classes
themselves: a subclass that sets `name` is reachable by that name, and its options
are its constructor arguments, checked by constructing it. Nothing is listed twice.
"""

import inspect
import sys

from keras_deq.solvers import common
from keras_deq.solvers.base import Solver, named_solvers

# Arguments every solver function takes; the rest are solver-specific options.
COMMON_ARGS = ("f", "z0", "max_iter", "tol", "stop_mode")
# The settings of every `Solver`; the rest of its constructor arguments are options.
SETTINGS = ("max_iter", "tol", "stop_mode")

_FUNCTIONS = {}  # class -> function form built for it (see `function_of`)


def names():
    """The names accepted by `get`, in registration order."""
    return tuple(named_solvers())


def solver_class(name, argument="solver"):
    """The `Solver` subclass whose `name` is `name`."""
    classes = named_solvers()
    if isinstance(name, str) and name in classes:
        return classes[name]
    raise ValueError(f"Unknown solver. Expected one of {names()}. Received: {argument}={name!r}")


def get(identifier):
    """Returns the solver function named `identifier`.

    Args:
        identifier: A solver name (see `names()`), or a callable, returned as is.

    Returns:
        A solver function with the shared call shape
            `solver(f, z0, max_iter=..., tol=..., stop_mode=..., **options)`.

    Examples:
        >>> get("anderson").__name__
        'anderson'
    """
    if callable(identifier):
        return identifier
    return function_of(solver_class(identifier))


def function_of(cls):
    """The function form `fn(f, z0, **settings)` of the `Solver` subclass `cls`.

    The module-level function of `cls`'s module named `cls.name` if there is one
    (`anderson` for `Anderson`), else a function built from the constructor.
    """
    fn = getattr(sys.modules.get(cls.__module__), cls.name or "", None)
    if inspect.isfunction(fn):
        return fn
    if cls not in _FUNCTIONS:
        _FUNCTIONS[cls] = _build_function(cls)
    return _FUNCTIONS[cls]


def _build_function(cls):
    def solve(f, z0, **settings):
        common.check_callable("f", f)
        return cls(**settings)(f, z0)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("f", kind), inspect.Parameter("z0", kind)]
    params += [inspect.Parameter(k, kind, default=v) for k, v in cls.settings().items()]
    solve.__signature__ = inspect.Signature(params)
    solve.__name__ = solve.__qualname__ = cls.name or cls.__name__
    solve.__doc__ = f"The function form of `{cls.__name__}(**settings)(f, z0)`."
    return solve


def _class_of(solver):
    """The `Solver` class behind `solver` (a name, a class or an instance); None for a
    plain function."""
    if isinstance(solver, Solver):
        return type(solver)
    if isinstance(solver, type) and issubclass(solver, Solver):
        return solver
    if callable(solver):
        return None
    return solver_class(solver)


def options_of(solver):
    """The solver-specific keyword options of `solver` and their defaults."""
    cls = _class_of(solver)
    if cls is not None:
        return {k: v for k, v in cls.settings().items() if k not in SETTINGS}
    params = inspect.signature(solver).parameters
    return {k: p.default for k, p in params.items() if k not in COMMON_ARGS}


def check_options(solver, options, argument="solver_options"):
    """Refuses options that `solver` does not take or bad values; returns a dict.

    The values are checked by constructing the solver's class with them (so a new
    option is declared once, in its constructor); errors name `argument`.
    """
    options = common.check_mapping(argument, options)
    cls = _class_of(solver)
    known = options_of(solver)
    unknown = sorted((set(options) - set(known)), key=repr)
    if unknown:
        label = solver if isinstance(solver, str) else getattr(solver, "__name__", solver)
        raise ValueError(
            f"Unknown option(s) {unknown} for solver {label!r}. "
            f"Expected a subset of {sorted(known)}. Received: {argument}={options!r}"
        )
    if cls is not None:
        for key, value in options.items():
            _construct(cls, {key: value}, key, f"{argument}['{key}']")
        _construct(cls, options, None, argument)  # options that constrain each other
    return options


def _construct(cls, options, key, label):
    try:
        cls(**options)
    except ValueError as error:
        message = str(error)
        if key is not None:
            message = message.replace(f"`{key}`", f"`{label}`")
            message = message.replace(f"Received: {key}=", f"Received: {label}=")
        if label not in message:
            message = f"Invalid `{label}`: {message}"
        raise ValueError(message) from error
