"""The state of a `DEQ` layer: its shapes, its symbolic specs and its starting value."""

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


def state_shapes(state_shape, input_shape):
    """Sample shape(s) of the state: `state_shape`, or the input's (a single tensor)."""
    if state_shape is not None:
        return state_shape
    if is_multi(input_shape):
        raise ValueError(
            "The input is a list or dict of tensors, so the state shape cannot be "
            f"inferred: pass `state_shape=`. Received: input_shape={input_shape}"
        )
    return tuple(input_shape[1:])


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


def check_initial_state(initial_state, zeros, dtype):
    """`initial_state` cast to `dtype` (no gradient), after checking it against the state."""
    try:
        keras.tree.assert_same_structure(initial_state, zeros)
    except (TypeError, ValueError) as error:
        raise ValueError(
            "`initial_state` must have the structure of the state "
            f"({keras.tree.map_structure(lambda t: t.shape, zeros)}). "
            f"Received: initial_state={initial_state!r}"
        ) from error
    out = []
    flat = zip(keras.tree.flatten(initial_state), keras.tree.flatten(zeros), strict=True)
    for given, want in flat:
        given = keras.ops.convert_to_tensor(given)
        if not _compatible(given.shape, want.shape):
            raise ValueError(
                f"`initial_state` must have the state's shape {tuple(want.shape)}. "
                f"Received: initial_state with shape {tuple(given.shape)}"
            )
        out.append(keras.ops.stop_gradient(keras.ops.cast(given, dtype)))
    return keras.tree.pack_sequence_as(zeros, out)


def _compatible(a, b):
    """Whether two static shapes can be the same (None matches any size)."""
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(
        p is None or q is None or p == q for p, q in zip(a, b, strict=True)
    )
