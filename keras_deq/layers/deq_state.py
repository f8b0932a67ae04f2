"""The state of a `DEQ` layer: its shapes, its symbolic specs and its starting value.

A cell may carry its own state shape and start (`keras_deq.layers.Cell`): `DEQ`
consults its `state_shape(input_shape)` and `initial_state(x, state_shape)` methods
when it has them (any layer that has them; the base class is optional).
"""

import numbers

import keras


def is_multi(input_shape):
    """Whether the input is several tensors (a list, tuple or dict of them)."""
    if isinstance(input_shape, dict):
        return True
    return (
        isinstance(input_shape, (list, tuple))
        and bool(input_shape)
        and isinstance(input_shape[0], (list, tuple))
    )


def first_shape(input_shape):
    if isinstance(input_shape, dict):
        return next(iter(input_shape.values()))
    return input_shape[0]


def own_shape(state_shape, input_shape, cell):
    """`state_shape`, else the cell's `state_shape(input_shape)` when the cell has that
    method; None means the input's shape."""
    method = getattr(cell, "state_shape", None)
    if state_shape is not None or not callable(method):
        return state_shape
    return _check_cell_shape(method(input_shape), cell)


def state_shapes(state_shape, input_shape, cell=None):
    """Sample shape(s) of the state: `state_shape`, the cell's, or the input's (a single
    tensor)."""
    shape = own_shape(state_shape, input_shape, cell)
    if shape is not None:
        return shape
    if is_multi(input_shape):
        raise ValueError(
            "The input is a list or dict of tensors, so the state shape cannot be "
            "inferred: pass `state_shape=` (or give the cell a `state_shape(input_shape)` "
            f"method). Received: input_shape={input_shape}"
        )
    return tuple(input_shape[1:])


def shape_of(x):
    """The static shape(s) of the injection `x`, structured like `x` (tuples as leaves)."""
    if isinstance(x, dict):
        return {k: tuple(t.shape) for k, t in x.items()}
    if isinstance(x, (list, tuple)):
        return [tuple(t.shape) for t in x]
    return tuple(x.shape)


def _check_cell_shape(shape, cell):
    """A cell's `state_shape(...)`: None, a tuple of dims (positive ints, or None for a
    size known only at run time), or a list of such tuples."""

    def is_dims(s):
        return (
            isinstance(s, (tuple, list))
            and len(s) > 0
            and all(
                d is None or (isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0)
                for d in s
            )
        )

    if shape is None:
        return None
    if is_dims(shape):
        return tuple(shape)
    if isinstance(shape, (tuple, list)) and shape and all(is_dims(s) for s in shape):
        return [tuple(s) for s in shape]
    raise ValueError(
        f"The cell's `state_shape(input_shape)` must return None, a tuple of positive ints "
        "(the state's shape without the batch dimension) or a list of such tuples. "
        f"Received: {type(cell).__name__}.state_shape(...) = {shape!r}"
    )


def batched(batch, shapes):
    if isinstance(shapes, list):
        return [(batch, *s) for s in shapes]
    return (batch, *shapes)


def spec(shapes, dtype):
    """`keras.KerasTensor`s of `shapes` (a shape, a list or a dict of them)."""
    if isinstance(shapes, dict):
        return {k: keras.KerasTensor(tuple(s), dtype=dtype) for k, s in shapes.items()}
    if isinstance(shapes, list):
        return [keras.KerasTensor(tuple(s), dtype=dtype) for s in shapes]
    return keras.KerasTensor(tuple(shapes), dtype=dtype)


def check_solver_batch_dims(solver_batch_dims, z_spec):
    if solver_batch_dims == 1:
        return
    if isinstance(z_spec, list) or solver_batch_dims >= len(z_spec.shape):
        raise ValueError(
            "`solver_batch_dims` > 1 needs a single-tensor state with more axes than "
            f"`solver_batch_dims`. Received: solver_batch_dims={solver_batch_dims}, "
            f"state shape={[t.shape for t in keras.tree.flatten(z_spec)]}"
        )


def check_cell_output(out, z_spec):
    want = [tuple(t.shape[1:]) for t in keras.tree.flatten(z_spec)]
    try:
        got = [tuple(t.shape[1:]) for t in keras.tree.flatten(out)]
    except AttributeError:
        got = None
    if got != want:
        got_desc = got if got is not None else type(out).__name__
        raise ValueError(
            "The cell's output must have the shape of the state. "
            f"Received: cell output shape={got_desc} (without batch), state shape={want}. "
            "Pass `state_shape=` if the state differs from the input's shape."
        )


def zeros(x, state_shape, dtype):
    """The zero state for the injection `x` (the input's shape if `state_shape` is None)."""
    first = keras.tree.flatten(x)[0]
    if state_shape is None:
        return keras.ops.zeros(keras.ops.shape(first), dtype)
    batch = keras.ops.shape(first)[0]
    shapes = state_shape if isinstance(state_shape, list) else [state_shape]
    out = [keras.ops.zeros((batch, *s), dtype) for s in shapes]
    return out if isinstance(state_shape, list) else out[0]


def solver_maps(cell, solver):
    """`{name: cell.name}` for the maps `solver` asks for besides `f` (its `extra_maps`,
    e.g. SAM's `prior_gradient`) that the cell has as methods; the solver goes without
    the others."""
    methods = {name: _method(cell, name) for name in getattr(solver, "extra_maps", ())}
    return {name: method for name, method in methods.items() if callable(method)}


def _method(cell, name):
    """`cell.name`, or, for a cell wrapped by a kernel reparametrization, the wrapped
    cell's method computed with the effective kernels."""
    method = getattr(cell, name, None)
    if callable(method) or not callable(getattr(cell, "wrapped_method", None)):
        return method
    return cell.wrapped_method(name)


def start(cell, x, state_shape, dtype):
    """The solver's starting state for the injection `x` and the layer's `state_shape`:
    the cell's `initial_state(x, shape)` when it has that method (checked against the
    state, differentiable), else zeros."""
    state_shape = own_shape(state_shape, shape_of(x), cell)
    method = getattr(cell, "initial_state", None)
    if not callable(method):
        return zeros(x, state_shape, dtype)
    want = x if state_shape is None else spec(batched(None, state_shape), dtype)
    name = f"{type(cell).__name__}.initial_state(x, state_shape)"
    return check_initial_state(method(x, state_shape), want, dtype, name, constant=False)


def check_initial_state(initial_state, want, dtype, argument="initial_state", constant=True):
    """`initial_state` cast to `dtype`, after checking it against the state `want` (tensors
    or specs); without gradient if `constant`."""
    try:
        keras.tree.assert_same_structure(initial_state, want)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"`{argument}` must have the structure of the state "
            f"({keras.tree.map_structure(lambda t: t.shape, want)}). "
            f"Received: {argument}={initial_state!r}"
        ) from error
    out = []
    flat = zip(keras.tree.flatten(initial_state), keras.tree.flatten(want), strict=True)
    for given, wanted in flat:
        given = keras.ops.cast(keras.ops.convert_to_tensor(given), dtype)
        if not _compatible(given.shape, wanted.shape):
            raise ValueError(
                f"`{argument}` must have the state's shape {tuple(wanted.shape)}. "
                f"Received: {argument} with shape {tuple(given.shape)}"
            )
        out.append(keras.ops.stop_gradient(given) if constant else given)
    return keras.tree.pack_sequence_as(want, out)


def _compatible(a, b):
    """Whether two static shapes can be the same (None matches any size)."""
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(
        p is None or q is None or p == q for p, q in zip(a, b, strict=True)
    )
