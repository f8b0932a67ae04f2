"""TensorFlow-specific wiring of the DEQ layer (private TensorFlow and Keras APIs).

Each function here degrades to a harmless default if the private API it uses moves.
"""

import contextlib

import tensorflow as tf

from keras_deq.backend import nests


def in_save_context():
    """True while `tf.saved_model.save` (and so `model.export()`) traces functions."""
    try:
        from tensorflow.python.saved_model import save_context  # noqa: PLC0415

        return save_context.in_save_context()
    except Exception:  # pragma: no cover - private API moved
        return False


def in_xla_context():
    try:
        from tensorflow.python.ops import control_flow_util  # noqa: PLC0415

        return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    except Exception:  # pragma: no cover - private API moved
        return False


def outside_xla_graph():
    """True while tracing a graph that TensorFlow will run op by op: not eager, not
    inside an XLA cluster, not tracing for `tf.saved_model.save`."""
    return not tf.executing_eagerly() and not in_xla_context() and not in_save_context()


def select_rows(rows, new, old):
    """The rows of `new` where `rows` `(batch,)` is True, else of `old` (same shapes)."""
    return tf.raw_ops.Select(condition=rows, x=new, y=old)


def xla_call(fn, *args):
    """`fn(*args)` compiled by XLA as one cluster inside the graph being traced.

    The caller's graph keeps running op by op around it; only `fn` (a solver loop,
    its cell included) becomes one compiled program. Compiled again for each new
    input shape; not differentiable through `fn` by design (use it on solves whose
    gradient is defined otherwise).
    """
    return tf.function(fn, jit_compile=True, autograph=False)(*args)


def slice_update(inputs, start_indices, updates):
    """`keras.ops.slice_update` with a gradient: Keras writes it as XLA's
    DynamicUpdateSlice, for which TensorFlow registers none. The gradient is the
    upstream with the slice zeroed for `inputs`, the slice itself for `updates`."""
    from tensorflow.compiler.tf2xla.python.xla import dynamic_update_slice  # noqa: PLC0415

    start = tf.stack([tf.cast(i, tf.int32) for i in start_indices])

    @tf.custom_gradient
    def update(inputs, updates):
        def grad(upstream):
            rest = dynamic_update_slice(upstream, tf.zeros_like(updates), start)
            return rest, tf.slice(upstream, start, tf.shape(updates))

        return dynamic_update_slice(inputs, updates, start), grad

    return update(inputs, updates)


def has_accelerator():
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def executing_eagerly():
    return tf.executing_eagerly()


def graph_assert(condition, data, name):
    return tf.debugging.Assert(condition, data, name=name)


def after(checks, structure):
    """`structure` through identities that wait for the ops `checks`."""
    with tf.control_dependencies(checks):
        return tf.nest.map_structure(tf.identity, structure)


def host_call_if(condition, fn, *args):
    """`fn(*args)` on the host (`tf.py_function`, eager tensors) when `condition`."""

    def call(*values):
        fn(*values)
        return 0

    tf.cond(condition, lambda: tf.py_function(call, list(args), tf.int32), lambda: tf.constant(0))


def gate_later_ops(checks):
    """Makes every op created after this point in the current graph wait for `checks`.

    The adjoint solve runs inside the gradient computation, after the gradients of
    the layers above were computed: only the cell's gradients depend on its check
    by data. For `on_failure="raise"` to stop the step before *any* weight moves,
    the optimizer's updates, created later in the same traced step, must wait for
    the assertion too. The dependency stays open until the graph is finished; it
    goes to the bottom of the graph's control-dependency stack, so that `with
    tf.control_dependencies(...)` blocks around the gradient still close in order.
    (Under a `tf.distribute` strategy the stack is per replica thread, so the
    cross-replica updates are not gated: there the cell's own weights stay put.)
    """
    graph = tf.compat.v1.get_default_graph()
    controller = graph.control_dependencies(checks)
    graph._control_dependencies_stack = [controller, *graph._control_dependencies_stack]


def vjp(fn, *primals):
    """TensorFlow's `(fn(*primals), vjp_fn)` for nests of tensors, with a persistent
    tape (so `vjp_fn` may be called many times, e.g. in an adjoint solve)."""
    flat = [tf.nest.flatten(p) for p in primals]
    with tf.GradientTape(persistent=True) as tape:
        for tensors in flat:
            tape.watch(tensors)
        out = fn(*primals)
    out_flat = tf.nest.flatten(out)

    def pullback(cotangent):
        sources = [t for tensors in flat for t in tensors]
        grads = tape.gradient(out_flat, sources, output_gradients=tf.nest.flatten(cotangent))
        grads = [tf.zeros_like(t) if g is None else g for g, t in zip(grads, sources, strict=True)]
        return nests.split_like(primals, flat, grads)

    return out, pullback


def compiled(fn):
    """`fn` as a graph without autograph (also when called eagerly: loops run in C++)."""
    return tf.function(fn, autograph=False)


def eigvalsh(real, imag=None):
    """Eigenvalues of the Hermitian `real + i imag` (`tf.linalg.eigvalsh`), in `real`'s dtype."""
    if imag is None:
        return tf.linalg.eigvalsh(real)
    return tf.math.real(tf.linalg.eigvalsh(tf.complex(real, imag)))


def eigenvalue_moduli(matrices):
    """`|eigenvalues|` of real square matrices, in their dtype (`tf.linalg.eigvals`)."""
    return tf.cast(tf.abs(tf.linalg.eigvals(matrices)), matrices.dtype)


def identity_with_gradient(flat, rewrite):
    """`flat` (a list of tensors) whose upstream gradients become `rewrite(upstream)`."""

    @tf.custom_gradient
    def identity(*tensors):
        def grad(*upstream):
            return rewrite(list(upstream))

        return [tf.identity(t) for t in tensors], grad

    return list(identity(*flat))


def recompute(fn):
    """`fn` (`(*tensors) -> tuple of tensors`) whose gradient recomputes it from its
    inputs, as `tf.recompute_grad`, which needs a gradient for every output of `fn`:
    here an output that is not floating point (a loop counter, a flag) needs none,
    and an input that is not floating point gets none. The outputs that get no
    gradient (None: unconnected) count as zeros."""
    from tensorflow.python.eager import record  # noqa: PLC0415

    @tf.custom_gradient
    def inner(*args):
        with record.stop_recording():
            result = tuple(fn(*args))
        # The shapes, not the outputs: the gradient keeps nothing of the forward pass.
        shapes = [tf.shape(t) for t in result]

        def grad(*upstream):
            sources = [i for i, t in enumerate(args) if t.dtype.is_floating]
            outs = [i for i, t in enumerate(result) if t.dtype.is_floating]
            cotangents = [
                tf.zeros(shapes[i], result[i].dtype) if upstream[i] is None else upstream[i]
                for i in outs
            ]
            inputs = list(args)
            if cotangents and not tf.executing_eagerly():
                # A data dependency on the upstream gradient (XLA ignores control
                # dependencies), through a zero that graph optimizations cannot fold away
                # (as `tf.recompute_grad` does): the recomputation runs when it is needed,
                # not with the forward pass.
                first = tf.reduce_max(tf.reshape(cotangents[0], [-1])[:1])
                known = tf.cast(first, tf.bool)
                zero = tf.where(tf.equal(known, known), 0.0, float("nan"))
                inputs = [
                    t + tf.cast(zero, t.dtype) if i in sources else t for i, t in enumerate(args)
                ]
            with tf.GradientTape() as tape:
                inputs = [tf.identity(t) for t in inputs]
                tape.watch([inputs[i] for i in sources])
                again = tuple(fn(*inputs))
            grads = tape.gradient(
                [again[i] for i in outs],
                [inputs[i] for i in sources],
                output_gradients=cotangents,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            out = [None] * len(args)
            for i, g in zip(sources, grads, strict=True):
                out[i] = g
            return out

        return result, grad

    return inner


@contextlib.contextmanager
def not_recorded():
    """Keeps eager gradient tapes from recording (the forward solve)."""
    if not tf.executing_eagerly():
        yield
        return
    from tensorflow.python.eager import record  # noqa: PLC0415

    with record.stop_recording():
        yield


def implicit_gradient(problem, adjoint_solver):
    """`Implicit`'s gradient wired with `tf.custom_gradient` (which hands the cell's
    variables to the gradient): the forward solve inside, not recorded; the adjoint
    solve inside the gradient, on a persistent tape of one cell evaluation.

    Returns `(z*, forward SolverResult)`; see `keras_deq.backward.Implicit`.
    """
    from keras_deq import backend  # noqa: PLC0415 - the package imports this module
    from keras_deq.backward import rows  # noqa: PLC0415

    fn, x_struct, z0 = problem.fn, problem.x, problem.z0
    variables = list(problem.variables)
    holder = {}

    @tf.custom_gradient
    def solve(*x_flat):
        x_in = tf.nest.pack_sequence_as(x_struct, list(x_flat))
        # Read each variable once where the tape can see it, so that
        # tf.custom_gradient hands them to `grad` even though the solve
        # itself is not recorded.
        for v in variables:
            tf.convert_to_tensor(v)
        with backend.not_recorded():
            result = problem.forward(lambda z: fn(z, x_in), z0)
        holder["result"] = result
        z_star = tf.nest.map_structure(tf.identity, result.state)
        z_flat = tf.nest.flatten(z_star)

        def grad(*upstream, variables=None):
            variables = list(variables or [])
            # Samples without a finite iterate are left out of the gradient.
            ok = rows.solved_rows(result, x_in)
            upstream = rows.mask_rows(rows.zeros_for_none(upstream, z_flat), ok)
            # The cell at z* with the failed samples' rows zeroed. The adjoint map
            # differentiates with respect to that masked state itself, not through the
            # mask (whose gradient would cost two selects per iteration): a failed
            # sample's row of u stays 0 (its upstream is 0), and u is masked once more
            # before the final pullback.
            z_safe = rows.mask_rows(z_flat, ok)
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(z_safe)
                tape.watch(list(x_flat))
                z_in = tf.nest.pack_sequence_as(z_star, z_safe)
                x_safe = tf.nest.pack_sequence_as(x_struct, rows.mask_rows(list(x_flat), ok))
                fz_flat = tf.nest.flatten(fn(z_in, x_safe))

            def adjoint_map(u):
                vjp = tape.gradient(fz_flat, z_safe, output_gradients=tf.nest.flatten(u))
                vjp = rows.zeros_for_none(vjp, z_flat)
                return tf.nest.pack_sequence_as(
                    z_star, [a + b for a, b in zip(vjp, upstream, strict=True)]
                )

            g = tf.nest.pack_sequence_as(z_star, upstream)
            adjoint = adjoint_solver(adjoint_map, g)
            on_backward = problem.on_backward
            checks = on_backward(adjoint) if on_backward is not None else None
            with tf.control_dependencies(checks or []):
                u = rows.mask_rows(tf.nest.flatten(adjoint.state), ok)
            grads = tape.gradient(fz_flat, list(x_flat) + variables, output_gradients=u)
            x_grads = rows.zeros_for_none(grads[: len(x_flat)], x_flat)
            return x_grads, grads[len(x_flat) :]

        return z_flat, grad

    z_flat = solve(*tf.nest.flatten(x_struct))
    z = tf.nest.pack_sequence_as(z0, tf.nest.flatten(z_flat))
    return z, holder["result"]
