"""The backend seam: what must differ between Keras backends lives here and nowhere else.

Everything else in keras_deq is written with `keras.ops` and `keras.tree`, except the
TensorFlow path of the `DEQ` layer (`keras_deq.backend.tensorflow` and the modules
that import TensorFlow for it), which predates the seam. This package holds the few
operations each backend spells differently: loops that reverse-mode autodiff can go
through, vector-Jacobian products, gradients rewritten on the way back, and host
callbacks.
"""

import contextlib

import keras


def name():
    """The Keras backend in use: `"tensorflow"`, `"jax"` or `"torch"`."""
    return keras.backend.backend()


def is_float(t):
    return "float" in keras.backend.standardize_dtype(t.dtype)


def differentiable_loop(step, state, steps):
    """`step` applied `steps` times from `state`, so that autodiff can go through it.

    JAX cannot reverse-differentiate a while loop, so there the loop is a `fori_loop`
    with static bounds (a scan); TensorFlow's while loop needs `maximum_iterations`
    to be differentiated under XLA.

    Args:
        step: A function `state -> next state` on nests.
        state: The starting nest.
        steps: A positive Python int.

    Returns:
        The nest after `steps` applications of `step`.
    """
    if name() == "jax":
        return keras.ops.fori_loop(0, steps, lambda i, s: step(s), state)
    _, out = keras.ops.while_loop(
        lambda i, s: i < steps,
        lambda i, s: (i + 1, step(s)),
        (0, state),
        maximum_iterations=steps,
    )
    return out


def masked_while_loop(cond, body, loop_vars, max_steps):
    """`keras.ops.while_loop(cond, body, loop_vars)`, so that autodiff can go through it.

    On JAX, which cannot reverse-differentiate a while loop, a `fori_loop` of exactly
    `max_steps` iterations (a scan) whose iterations after `cond` turns False are
    no-ops: each runs `body` under `keras.ops.cond`, so an iteration that is skipped
    computes nothing and passes no gradient, and the gradient is the autodiff of
    the iterations the while loop would have run. Elsewhere a while loop with
    `maximum_iterations=max_steps`.

    Args:
        cond: `(*loop_vars) -> scalar bool`.
        body: `(*loop_vars) -> next loop_vars` (a tuple like `loop_vars`).
        loop_vars: A tuple of nests.
        max_steps: A positive Python int, the most iterations run.

    Returns:
        The final `loop_vars`, a tuple.
    """
    loop_vars = tuple(loop_vars)
    if name() == "jax":

        def step(i, v):
            return keras.ops.cond(cond(*v), lambda: tuple(body(*v)), lambda: v)

        return tuple(keras.ops.fori_loop(0, max_steps, step, loop_vars))
    return tuple(keras.ops.while_loop(cond, body, loop_vars, maximum_iterations=max_steps))


def not_recorded():
    """A context in which eager gradient tapes do not record (a no-op where autodiff
    only follows the data: `stop_gradient` on the inputs is enough there)."""
    if name() == "tensorflow":
        from keras_deq.backend import tensorflow as tf_backend  # noqa: PLC0415

        return tf_backend.not_recorded()
    return contextlib.nullcontext()


def vjp(fn, *primals):
    """`(fn(*primals), vjp_fn)`: `vjp_fn(cotangent)` is the tuple of `cotangent^T J`
    for each primal (nests in, nests out; differentiable, for second-order use).
    """
    if name() == "jax":
        import jax  # noqa: PLC0415

        out, pullback = jax.vjp(fn, *primals)
        return out, pullback
    if name() == "tensorflow":
        from keras_deq.backend import tensorflow as tf_backend  # noqa: PLC0415

        return tf_backend.vjp(fn, *primals)
    raise NotImplementedError(f"keras_deq does not run on the {name()!r} backend yet.")


def identity_with_gradient(flat, rewrite):
    """The list of tensors `flat`, whose upstream gradients (a list like `flat`, with
    None for missing ones) are replaced by `rewrite(upstream)` on the way back."""
    if name() == "tensorflow":
        from keras_deq.backend import tensorflow as tf_backend  # noqa: PLC0415

        return tf_backend.identity_with_gradient(flat, rewrite)

    @keras.ops.custom_gradient
    def identity(*tensors):
        def grad(*args, upstream=None):
            return tuple(rewrite(upstream_list(args, upstream)))

        return list(tensors), grad

    return list(identity(*flat))


def upstream_list(args, upstream=None):
    """The upstream gradients a `keras.ops.custom_gradient` backward function received,
    as a list: backends pass them positionally (TensorFlow) or as one structure (JAX)."""
    if upstream is None:
        upstream = args[0] if len(args) == 1 else args
    return list(upstream) if isinstance(upstream, (list, tuple)) else [upstream]


def host_call(fn, *args):
    """Calls the Python function `fn` on the host with the values of `args` (numpy),
    from inside a compiled function; its return value is ignored."""
    if name() == "jax":
        import jax  # noqa: PLC0415

        jax.debug.callback(fn, *args)
        return
    raise NotImplementedError(f"host_call is not used on the {name()!r} backend.")
