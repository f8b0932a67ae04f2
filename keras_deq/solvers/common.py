"""Argument checks and the structure wrapper shared by every solver."""

import numbers
from collections.abc import Mapping

import keras
import numpy as np
from keras import ops

from keras_deq.solvers.packing import Packer, static_shape
from keras_deq.solvers.result import STOP_MODES, row_sums_as_products

# Iteration counters are int32 inside the solver loop (`keras.ops.while_loop`).
MAX_COUNT = 2**31 - 1


def check_positive_int(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not 1 <= value <= MAX_COUNT
    ):
        raise ValueError(
            f"`{name}` must be a positive integer (at most 2**31 - 1). Received: {name}={value!r}"
        )
    return int(value)


def check_nonnegative_int(name, value, optional=False):
    """An integer >= 0 (numpy integers too), at most 2**31 - 1; or None if `optional`."""
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not 0 <= value <= MAX_COUNT
    ):
        what = "a non-negative integer (at most 2**31 - 1)" + (" or None" if optional else "")
        raise ValueError(f"`{name}` must be {what}. Received: {name}={value!r}")
    return int(value)


def check_positive_float(name, value, finite=True):
    """A number > 0; finite unless `finite=False` (then `inf` is allowed)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not value > 0
        or (finite and not value < float("inf"))
    ):
        what = "a finite positive number" if finite else "a positive number"
        raise ValueError(f"`{name}` must be {what}. Received: {name}={value!r}")
    return float(value)


def check_nonnegative_float(name, value, finite=True):
    """A number >= 0; finite unless `finite=False` (then `inf` is allowed)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not value >= 0
        or (finite and not value < float("inf"))
    ):
        what = "a finite non-negative number" if finite else "a non-negative number"
        raise ValueError(f"`{name}` must be {what}. Received: {name}={value!r}")
    return float(value)


def check_fraction(name, value):
    """A number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError(f"`{name}` must be a number in (0, 1]. Received: {name}={value!r}")
    return float(value)


def check_stop_mode(stop_mode):
    if stop_mode not in STOP_MODES:
        raise ValueError(
            f"`stop_mode` must be one of {STOP_MODES}. Received: stop_mode={stop_mode!r}"
        )
    return stop_mode


def check_max_iter(max_iter):
    """A positive int, or a scalar integer tensor (a budget drawn at run time, which
    changes without retracing; values below 1 act as 1, see `loop_bound`).

    A tensor (of the Keras backend) is returned as given: it is converted where the
    loop runs, so a solver built in one graph (or eagerly) can run in another.
    """
    if ops.is_tensor(max_iter):
        dtype = keras.backend.standardize_dtype(max_iter.dtype)
        if not keras.backend.is_int_dtype(dtype) or ops.ndim(max_iter) not in (None, 0):
            raise ValueError(
                "`max_iter` must be a positive integer or a scalar integer tensor. "
                f"Received: max_iter={max_iter!r}"
            )
        return max_iter
    return check_positive_int("max_iter", max_iter)


def loop_bound(max_iter):
    """`max_iter` as checked by `check_max_iter`, ready for a loop: an int, or an int32
    tensor of at least 1."""
    if ops.is_tensor(max_iter):
        return ops.maximum(ops.cast(max_iter, "int32"), 1)
    return max_iter


def check_callable(name, value):
    if not callable(value):
        raise ValueError(f"`{name}` must be callable. Received: {name}={value!r}")
    return value


def solve_structure(flat_solver, f, z0, maps=None, **kwargs):
    """Runs `flat_solver` on the packed form of `z0` and unpacks its result.

    Args:
        flat_solver: A function `(f_flat, z0_flat, unpack, **kwargs) -> SolverResult`
            working on `(batch, n)` matrices.
        f: The map, taking and returning the structure of `z0`.
        z0: The initial state: a tensor or a nest of tensors sharing the batch dim.
        maps: Optional `{name: map}` of further maps like `f`, passed to `flat_solver`
            packed like `f`, as keyword arguments.
        **kwargs: Passed to `flat_solver`.
    """
    z0 = keras.tree.map_structure(ops.convert_to_tensor, z0)
    _check_state(z0)
    packer = Packer(z0)
    if not keras.backend.is_float_dtype(packer.dtype):
        raise ValueError(
            f"`z0` must be a floating-point tensor or a nest of them. Received: z0 with dtype={packer.dtype}"
        )
    flat_maps = {name: packer.flat_fn(g) for name, g in (maps or {}).items()}
    with row_sums_as_products(packer.single_matrix):
        return flat_solver(packer.flat_fn(f), packer.pack(z0), packer.unpack, **flat_maps, **kwargs)


def per_entry(solve, batch_dims, joint=False):
    """Wraps `solve(f, z0)` so that the first `batch_dims` axes are all batch axes.

    With `batch_dims=2` and a `(batch, T, d)` state, each of the `batch * T`
    positions is its own sample for the solver: its own mixing weights (Anderson),
    Jacobian estimate (Broyden), residual, tolerance test and returned iterate.
    A cell that is causal along `T` then stays exactly causal whatever the solver.

    With `joint` (a solver with `joint_entries`: `GMRES`), each position has its own
    residual and tolerance test only: `solve` gets whole samples and
    `entry_size=prod(z0.shape[batch_dims:])`, and runs one Krylov process per sample.
    Processes per position would not solve a map that couples the positions (the
    adjoint of attention): each would read the other positions' Krylov probes in its
    differences of the map.

    Args:
        solve: A function `(f, z0, **maps) -> SolverResult` on single-tensor states
            (`maps`: further maps like `f`, see `Solver.extra_maps`).
        batch_dims: Number of leading axes to treat as batch axes, >= 1.
        joint: Whether `solve` takes `entry_size` and whole samples (see above).

    Returns:
        A function `(f, z0, **maps) -> SolverResult` whose state has `z0`'s shape and
        whose residuals and `converged` have shape `(prod(z0.shape[:batch_dims]),)`.
    """
    if batch_dims == 1:
        return solve
    if joint:

        def solve_joint(f, z0, **maps):
            return solve(f, z0, entry_size=_entry_size(z0, batch_dims), **maps)

        return solve_joint

    def solve_entries(f, z0, **maps):
        lead = ops.shape(z0)[:batch_dims]

        def merge(z):
            return ops.reshape(z, (-1, *ops.shape(z)[batch_dims:]))

        def split(z):
            return ops.reshape(z, (*lead, *ops.shape(z)[1:]))

        def entries(g):
            return lambda z: merge(g(split(z)))

        maps = {name: entries(g) for name, g in maps.items()}
        result = solve(entries(f), merge(z0), **maps)
        recorded = None if result.recorded is None else tuple(split(t) for t in result.recorded)
        return result._replace(state=split(result.state), recorded=recorded)

    return solve_entries


def _entry_size(z0, batch_dims):
    """The number of values of each entry of `z0` past its `batch_dims` axes: an int
    where the static shape knows it, else a scalar tensor."""
    static = tuple(z0.shape)[batch_dims:]
    if all(d is not None for d in static):
        return int(np.prod(static, dtype=np.int64))
    return ops.prod(ops.shape(z0)[batch_dims:])


def _check_state(z0):
    """Static checks of `z0`: batched tensors of known rank sharing one batch size."""
    shapes = [static_shape(t) for t in keras.tree.flatten(z0)]
    if any(shape is None for shape in shapes):
        raise ValueError(
            "`z0` must be a `(batch, ...)` tensor or a nest of them, of known rank. "
            f"Received: z0 with shapes {[None if s is None else list(s) for s in shapes]}"
        )
    if any(len(shape) == 0 for shape in shapes):
        raise ValueError(
            "`z0` must be a `(batch, ...)` tensor or a nest of them; a scalar has no batch "
            f"dimension. Received: z0 with shapes {[list(s) for s in shapes]}"
        )
    batches = {shape[0] for shape in shapes if shape[0] is not None}
    if len(batches) > 1:
        raise ValueError(
            "All tensors of `z0` must share the batch (first) dimension. "
            f"Received: z0 with shapes {[list(s) for s in shapes]}"
        )


# ------------------------------------------------------------- layer argument checks
def check_bool(name, value):
    """A Python or numpy boolean (not an int, a string or any other truthy value)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be a boolean. Received: {name}={value!r}")
    return bool(value)


def check_optional_positive_int(name, value):
    """None, or a positive integer (numpy integers too)."""
    return None if value is None else check_positive_int(name, value)


def check_rate(name, value):
    """A dropout rate: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be a number in [0, 1). Received: {name}={value!r}")
    return float(value)


_KERAS_KINDS = ("initializer", "constraint", "regularizer")


def get_keras_object(kind, name, value, default=None):
    """`keras.{kind}s.get(value)`, with an error that names the argument `name`.

    `None` means `default` (itself passed to `keras.{kind}s.get`, so None stays None for
    constraints and regularizers). Any other value, falsy ones (0, "", [], False)
    included, must be something Keras can interpret: it is never silently replaced.

    Args:
        kind: `"initializer"`, `"constraint"` or `"regularizer"`.
        name: The argument's name, for the error message.
        value: The identifier: an instance, a name, a config dict or a callable.
        default: What None means.
    """
    if kind not in _KERAS_KINDS:
        raise ValueError(f"`kind` must be one of {_KERAS_KINDS}. Received: kind={kind!r}")
    module = getattr(keras, f"{kind}s")
    if value is None:
        return None if default is None else module.get(default)
    try:
        return module.get(value)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(
            f"`{name}` must be a Keras {kind} (an instance, a name, a config dict or a "
            f"callable) or None: {error}. Received: {name}={value!r}"
        ) from error


def check_mapping(name, value):
    """A dict of keyword options, or None (an empty dict)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"`{name}` must be a dict or None. Received: {name}={value!r}")
    return dict(value)
