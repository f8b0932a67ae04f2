"""Look-up of solvers by name."""

import inspect

from keras_deq.solvers import common
from keras_deq.solvers.anderson import anderson
from keras_deq.solvers.broyden import broyden
from keras_deq.solvers.fixed_point import fixed_point

_SOLVERS = {"fixed_point": fixed_point, "anderson": anderson, "broyden": broyden}
# Arguments every solver takes; the rest are solver-specific options.
COMMON_ARGS = ("f", "z0", "max_iter", "tol", "stop_mode")


def names():
    """The names accepted by `get`."""
    return tuple(_SOLVERS)


def get(identifier):
    """Returns the solver function named `identifier`.

    Args:
        identifier: `"fixed_point"`, `"anderson"` or `"broyden"`, or a solver
            function, returned as is.

    Returns:
        A solver function with the shared call shape
            `solver(f, z0, max_iter=..., tol=..., stop_mode=..., **options)`.

    Examples:
        >>> get("anderson").__name__
        'anderson'
    """
    if callable(identifier):
        return identifier
    if isinstance(identifier, str) and identifier in _SOLVERS:
        return _SOLVERS[identifier]
    raise ValueError(f"Unknown solver. Expected one of {names()}. Received: solver={identifier!r}")


def options_of(solver):
    """The solver-specific keyword options of `solver` and their defaults."""
    params = inspect.signature(get(solver)).parameters
    return {k: p.default for k, p in params.items() if k not in COMMON_ARGS}


_OPTION_CHECKS = {
    "damping": common.check_fraction,
    "beta": common.check_fraction,
    "window": common.check_positive_int,
    "memory": common.check_positive_int,
    "ridge": lambda name, value: common.check_nonnegative_float(name, value, finite=False),
}


def check_options(solver, options, argument="solver_options"):
    """Refuses options that `solver` does not take or bad values; returns a dict."""
    options = common.check_mapping(argument, options)
    known = options_of(solver)
    unknown = sorted((set(options) - set(known)), key=repr)
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for solver {getattr(get(solver), '__name__', solver)!r}. "
            f"Expected a subset of {sorted(known)}. Received: {argument}={options!r}"
        )
    for key, value in options.items():
        if key in _OPTION_CHECKS:
            _OPTION_CHECKS[key](f"{argument}['{key}']", value)
    return options
