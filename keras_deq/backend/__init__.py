"""The backend seam: what must differ between Keras backends lives here and nowhere else.

Everything else in keras_deq is written with `keras.ops` and `keras.tree`, except the
TensorFlow path of the `DEQ` layer (`keras_deq.backend.tensorflow` and the modules
that import TensorFlow for it), which predates the seam. This package holds the few
operations each backend spells differently: loops that reverse-mode autodiff can go
through, vector-Jacobian products, gradients rewritten on the way back, host
callbacks, compilation of a function with Python-value arguments, and the linear
algebra Keras lacks (`keras_deq.backend.eigen`: eigenvalues without eigenvectors,
complex eigenvalues).

`keras_deq.backend.tensorflow`, `keras_deq.backend.jax` and `keras_deq.backend.torch` hold
each framework's code (imported on first use); this module dispatches. The `DEQ` layer runs
JAX and PyTorch on one path (the cell's weights passed in, `implicit_stateless`);
PyTorch runs eagerly, so failures are reported and raised directly there.
"""

import contextlib
import sys

import keras
from keras import ops


def name():
    """The Keras backend in use: `"tensorflow"`, `"jax"` or `"torch"`."""
    return keras.backend.backend()


def is_float(t):
    return "float" in keras.backend.standardize_dtype(t.dtype)


def compiled_solve(solve):
    """`solve(f, z0)` run as one compiled program where the backend would otherwise
    run its loop op by op: TensorFlow graphs outside XLA (Keras' default on CPU),
    where each small op of a solver iteration costs a few microseconds of dispatch.

    Elsewhere (eager TensorFlow, XLA, `tf.saved_model.save`, JAX, whose whole step
    is compiled) `solve` runs as it is. The compiled solve is not differentiable:
    use it for solves whose gradient is defined otherwise (`stop_gradient`, a custom
    gradient, an adjoint).

    Args:
        solve: `(f, z0) -> SolverResult`.

    Returns:
        A function like `solve`.
    """
    if name() != "tensorflow":
        return solve

    def compiled(f, z0):
        return compiled_step(lambda z: solve(f, z))(z0)

    return compiled


def compiled_step(fn):
    """`fn` run as one compiled program where `compiled_solve` would compile (a
    TensorFlow graph outside XLA), else `fn` itself: a whole solve (`compiled_solve`),
    or a solver's own small computation that holds no layer (Anderson's coefficients),
    whose few dozen tiny ops would each pay a graph's per-op dispatch."""
    if name() != "tensorflow":
        return fn
    from keras_deq.backend import tensorflow as tf_backend  # noqa: PLC0415

    def compiled(*args):
        if not tf_backend.outside_xla_graph():
            return fn(*args)
        return tf_backend.xla_call(fn, *args)

    return compiled


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


def cond(pred, true_fn, false_fn):
    """`keras.ops.cond(pred, true_fn, false_fn)`; on PyTorch a Python `if`, which is
    what Keras' op runs there, without the `Operation` object the op builds at each
    call (about as long as the rest of a skipped `solvers.result.replace_rows`)."""
    if name() == "torch":
        return _torch().cond(pred, true_fn, false_fn)
    return ops.cond(pred, true_fn, false_fn)


def remat(fn):
    """`keras.remat(fn)` for `fn(*tensors) -> tuple of tensors` with integer or boolean
    tensors among them (a loop's counter, flags): on TensorFlow keras_deq's own
    recomputation (`tf.recompute_grad` needs a gradient for every output)."""
    if name() == "tensorflow":
        return _tf().recompute(fn)
    return keras.remat(fn)


# ------------------------------------------------- layer statistics, failures, saving
# Used by `keras_deq.layers.monitor` (metrics and `on_failure` on TensorFlow) and `DEQ`.


def _tf():
    from keras_deq.backend import tensorflow as tf_backend  # noqa: PLC0415

    return tf_backend


def _jax():
    from keras_deq.backend import jax as jax_backend  # noqa: PLC0415

    return jax_backend


def _torch():
    from keras_deq.backend import torch as torch_backend  # noqa: PLC0415

    return torch_backend


def layer_metrics():
    """Whether a layer may own Keras metrics updated in its `call` under `fit`, so
    that `fit` logs them: on TensorFlow and PyTorch; not on JAX
    (keras-team/keras#21639), where statistics are kept in variables instead."""
    return name() in ("tensorflow", "torch")


def float32_metrics():
    """A scope in which metric variables are read in float32 under mixed precision.

    Under a mixed-precision policy Keras reads float32 variables in the compute
    dtype inside `call` (TensorFlow and PyTorch); metric totals accumulated in
    float16/bfloat16 drift (or overflow). Keras has no public switch for this, so
    its private scope is used when present.
    """
    if not layer_metrics():
        return contextlib.nullcontext()
    try:
        from keras.src.backend import AutocastScope  # noqa: PLC0415
    except ImportError:  # pragma: no cover - private API moved
        return contextlib.nullcontext()
    return AutocastScope(None)


def in_xla_context():
    """True inside a TensorFlow XLA cluster, where no host call or assertion can run."""
    return name() == "tensorflow" and _tf().in_xla_context()


def in_save_context():
    """True while TensorFlow traces functions for `tf.saved_model.save` / `export()`
    (on JAX: while jax2tf converts the layer for `export()`)."""
    if name() == "tensorflow":
        return _tf().in_save_context()
    # JAX: `model.export()` converts the layer with jax2tf, which traces it while a
    # TensorFlow graph is being built (the only way JAX code runs there); a host
    # callback cannot be serialized.
    return name() == "jax" and "tensorflow" in sys.modules and not _tf().executing_eagerly()


def runs_op_by_op():
    """True where each op runs apart: TensorFlow eager or in a graph outside XLA, and
    eager PyTorch (not while `torch.compile` traces). There each op costs its own
    dispatch and memory pass, so a computation written as a few fused-by-hand
    elementwise ops beats one that a compiler would fuse (a batched product of a
    stacked copy). False inside XLA and on JAX, whose steps are compiled."""
    if name() == "torch":
        return _torch().runs_op_by_op()
    return name() == "tensorflow" and not _tf().in_xla_context()


def select_rows(rows, new, old):
    """`new`'s rows (samples) where `rows` `(batch,)` is True, else `old`'s: tensors of
    any rank >= 1. Where TensorFlow runs ops one by one, its row select (no broadcast
    of `rows`: half the time of a broadcasting `where` on a `(64, 512)` state)."""
    if (
        name() == "tensorflow"
        and runs_op_by_op()
        and tuple(new.shape) == tuple(old.shape)
        and new.dtype == old.dtype
    ):
        return _tf().select_rows(rows, new, old)
    return ops.where(ops.reshape(rows, (-1,) + (1,) * (len(old.shape) - 1)), new, old)


def slice_update(inputs, start_indices, updates):
    """`keras.ops.slice_update(inputs, start_indices, updates)`, differentiable on every
    backend: on TensorFlow under XLA (`jit_compile=True`) Keras' op has no gradient, so a
    solver loop that writes its history with it could not be unrolled for autodiff."""
    if name() != "tensorflow":
        return ops.slice_update(inputs, start_indices, updates)
    return _tf().slice_update(inputs, start_indices, updates)


def row_sums(matrix):
    """The sums of the rows of a `(batch, n)` matrix, `(batch,)`.

    Compiled for a CPU (XLA in TensorFlow, or JAX), the product with a vector of
    ones: XLA's CPU row reductions are slow next to its matrix-vector products.
    Elsewhere `ops.sum`. See `keras_deq.solvers.result.row_sums` for when to use it.
    """
    if _compiled_on_cpu():
        return ops.matmul(matrix, ops.ones((ops.shape(matrix)[1],), dtype=matrix.dtype))
    return ops.sum(matrix, axis=1)


def _compiled_on_cpu():
    if name() == "jax":
        return _jax().compiled_on_cpu()
    return name() == "tensorflow" and not runs_op_by_op() and not has_accelerator()


def has_accelerator():
    """True where TensorFlow sees a GPU or TPU (False on other backends, which do not
    compile solves apart)."""
    return name() == "tensorflow" and _tf().has_accelerator()


def executing_eagerly():
    """True where tensors hold values now (eager TensorFlow), so a failure can be
    reported directly; False while tracing a graph (and on JAX, whose `call` is
    traced under `fit`); always True on PyTorch."""
    return name() == "torch" or (name() == "tensorflow" and _tf().executing_eagerly())


def graph_assert(condition, data, name):  # noqa: A002 - TensorFlow's own argument name
    """A TensorFlow graph assertion: fails the step with `data` if `condition` is False."""
    return _tf().graph_assert(condition, data, name)


def gate_later_ops(checks):
    """Makes the ops created later in the traced TensorFlow step wait for `checks`."""
    _tf().gate_later_ops(checks)


def after(checks, structure):
    """`structure`, computed only after the ops `checks` (TensorFlow graphs); as is
    when `checks` is empty (always, elsewhere)."""
    if not checks:
        return structure
    return _tf().after(checks, structure)


def host_call_if(condition, fn, *args):
    """Calls the Python function `fn` with the values of `args` when the scalar bool
    tensor `condition` is True, from inside a traced function (the return value of
    `fn` is ignored)."""
    if name() == "tensorflow":
        _tf().host_call_if(condition, fn, *args)
        return

    if name() == "jax":
        _jax().host_call_if(condition, fn, *args)
        return
    if bool(condition):  # PyTorch: eager, the values are here
        host_call(fn, *args)


def serialize_shareable(cell):
    """`keras.saving.serialize_keras_object(cell)`, marked so that a cell shared by several DEQ
    layers is shared again when a `.keras` file is loaded.

    While Keras saves a model it notes every object it serializes and marks the
    second occurrence of one with `shared_object_id`, and on load returns the
    object already made for that id. The first occurrence's mark is lost here,
    because Keras copies the layer's config after `get_config` returns, so the
    loaded layers would each build their own cell and the weights file (which
    holds the shared cell once) would not load. Marking every cell while saving
    keeps the first occurrence findable; an unshared mark is unused on load.
    """
    config = keras.saving.serialize_keras_object(cell)
    try:
        from keras.src.backend.common import global_state  # noqa: PLC0415
    except ImportError:  # pragma: no cover - private module moved
        return config
    if global_state.get_global_attribute("shared_objects/id_to_config_map") is not None:
        config["shared_object_id"] = int(id(cell))
    return config


def implicit_gradient_tensorflow(problem, adjoint_solver):
    """The implicit gradient through `tf.custom_gradient` on TensorFlow (it may close
    over the cell's variables there); see `keras_deq.backward.implicit`."""
    return _tf().implicit_gradient(problem, adjoint_solver)


def not_recorded():
    """A context in which eager gradient tapes do not record (a no-op where autodiff
    only follows the data: `stop_gradient` on the inputs is enough there)."""
    if name() == "tensorflow":
        return _tf().not_recorded()
    return contextlib.nullcontext()


def vjp(fn, *primals):
    """`(fn(*primals), vjp_fn)`: `vjp_fn(cotangent)` is the tuple of `cotangent^T J`
    for each primal (nests in, nests out; differentiable, for second-order use).
    """
    if name() == "jax":
        return _jax().vjp(fn, *primals)
    if name() == "tensorflow":
        return _tf().vjp(fn, *primals)
    return _torch().vjp(fn, *primals)


def compiled(fn, static_argnums=()):
    """`fn` compiled once per signature and run as one program, also when called eagerly.

    TensorFlow: a `tf.function` without autograph (Python-value arguments are part of
    its cache key), so that an eager call runs its loops in C++ rather than op by op
    in Python. JAX: `jax.jit` with the arguments at `static_argnums` (Python values:
    shapes, strides, counts) static. Elsewhere `fn` itself.

    Args:
        fn: A function of tensors and Python values, written with `keras.ops`.
        static_argnums: The positions of the Python-value arguments (used by JAX).

    Returns:
        A function with `fn`'s signature.
    """
    if name() == "tensorflow":
        return _tf().compiled(fn)
    if name() == "jax":
        return _jax().compiled(fn, static_argnums)
    return fn


def identity_with_gradient(flat, rewrite):
    """The list of tensors `flat`, whose upstream gradients (a list like `flat`, with
    None for missing ones) are replaced by `rewrite(upstream)` on the way back."""
    if name() == "tensorflow":
        return _tf().identity_with_gradient(flat, rewrite)

    @custom_gradient
    def identity(*tensors):
        def grad(*args, upstream=None):
            return tuple(rewrite(upstream_list(args, upstream)))

        return list(tensors), grad

    return list(identity(*flat))


def custom_gradient(fn):
    """`keras.ops.custom_gradient` for functions of several tensors with a list of
    outputs: `fn(*tensors) -> (outputs, grad)`, `grad(*args, upstream=None)` (read the
    upstream gradients with `upstream_list`) returning one gradient per input.

    On PyTorch a `torch.autograd.Function` of our own: Keras' allows one output and
    turns an error raised in `fn` into NaN gradients.
    """
    if name() == "torch":
        return _torch().custom_gradient(fn)
    return keras.ops.custom_gradient(fn)


def twice_differentiable():
    """A context in which the ops made can be differentiated twice (the Jacobian
    penalty's gradient): on PyTorch, attention by its plain math kernel, since the
    fused CPU kernels of `scaled_dot_product_attention` have no double backward.
    Elsewhere a no-op."""
    if name() == "torch":
        return _torch().twice_differentiable()
    return contextlib.nullcontext()


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
        _jax().host_call(fn, *args)
        return
    if name() == "torch":  # eager: call it now
        fn(*(_torch().to_numpy(a) for a in args))
        return
    raise NotImplementedError(f"host_call is not used on the {name()!r} backend.")


# ------------------------------------------------------------------ layers (paper cells)
# Used by the paper layers (`keras_deq.layers.multiscale_cell`, `keras_deq.models.language`).


def init_scope():
    """A context that runs its body eagerly, outside any function being traced, e.g.
    to apply weight constraints once when a layer is built inside a `tf.function`
    (TensorFlow's `tf.init_scope`). Elsewhere a no-op: Keras builds layers eagerly
    there, before tracing."""
    if name() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        return tf.init_scope()
    return contextlib.nullcontext()


def has_values(tensor):
    """Whether the values of `tensor` can be read now (eager), rather than being
    traced into a graph (`tf.function`) or a compiled function (`jax.jit`)."""
    if name() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        return tf.executing_eagerly()
    if name() == "jax":
        return _jax().has_values(tensor)
    return True


def detached(variable):
    """Whether the variable's value is held outside it right now: during an epoch of
    `fit` on JAX, Keras' trainer keeps the values in its own state and attaches them
    again at the epoch's end (or on `model.jax_state_sync()`)."""
    return name() == "jax" and getattr(variable, "_value", True) is None


def with_runtime_checks(value, conditions, message):
    """`value`, with run-time assertions that every boolean tensor of `conditions()`
    (a function, called only where the checks run) holds: in a TensorFlow graph an
    `InvalidArgumentError` carrying `message` when it runs (XLA drops the
    assertions). Where values cannot be checked inside a compiled function (JAX),
    `value` unchecked; check eagerly before (`has_values`)."""
    if name() != "tensorflow":
        return value
    import tensorflow as tf  # noqa: PLC0415

    checks = [tf.debugging.Assert(tf.reduce_all(c), [message]) for c in conditions()]
    with tf.control_dependencies(checks):
        return tf.identity(value)


def shape_polymorphic_function(fn, shape, dtype):
    """`fn` of one tensor, compiled once for every input of rank `len(shape)` (`None`
    for a dimension of any size) and `dtype` where the backend can (a `tf.function`
    with an input signature); elsewhere `fn` as is (JAX compiles the loops inside)."""
    if name() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        return tf.function(fn, input_signature=[tf.TensorSpec(shape, dtype)])
    return fn


def stateless_uniform(shape, seed, dtype="float32"):
    """Uniform `[0, 1)` values of `shape`, a pure function of the int32 `(2,)` tensor
    `seed` (the same seed gives the same values, at every call and inside loops).
    `keras.random` takes only Python ints or a stateful `SeedGenerator` as seeds.
    TensorFlow's `tf.random.stateless_uniform`; JAX's `jax.random.uniform` with the
    seed as a raw key."""
    if name() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        return tf.random.stateless_uniform(shape, seed=seed, dtype=dtype)
    if name() == "jax":
        return _jax().stateless_uniform(shape, seed, dtype)
    return _torch().stateless_uniform(shape, seed, dtype)
