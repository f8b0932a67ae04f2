"""Gradients of an equilibrium: implicit, phantom, one-step and unrolled.

Every mode computes the forward fixed point `z* = f(z*, x)` with a solver and
differs only in how the gradient reaches `x` and the cell's variables:

- `"implicit"`: the implicit function theorem. With `g = dL/dz*`, solve the
  adjoint fixed point `u = J^T u + g` (`J = df/dz` at `z*`) with a solver, one
  vector-Jacobian product per step, then pull `u` back through one application
  of `f`. Memory does not grow with the number of solver steps.
- `"phantom"`: `k` damped steps `z <- (1 - tau) z + tau f(z, x)` from `z*`,
  differentiated by autodiff.
- `"one_step"`: one step `f(z*, x)` differentiated by autodiff, i.e. the
  Jacobian-free approximation `(I - J)^{-1} ~ I`.
- `"unrolled"`: autodiff through the whole forward solve (the reference; memory
  grows with the number of steps).
"""

import contextlib

import tensorflow as tf

from keras_deq.solvers import result as result_lib
from keras_deq.solvers.packing import Packer

MODES = ("implicit", "phantom", "one_step", "unrolled")


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"`backward` must be one of {MODES}. Received: backward={mode!r}")
    return mode


@contextlib.contextmanager
def _not_recorded():
    """Keeps eager gradient tapes from recording the forward solve."""
    if not tf.executing_eagerly():
        yield
        return
    from tensorflow.python.eager import record  # noqa: PLC0415

    with record.stop_recording():
        yield


def solved_rows(result, x):
    """Per-sample bool `(batch,)`: the solve found a finite iterate for the sample.

    A sample without one (NaN input, or a cell that is NaN everywhere) returns its
    initial state; the gradients leave it out (see `mask_rows`).
    """
    batch = tf.shape(tf.nest.flatten(x)[0])[0]
    finite = tf.math.is_finite(result.abs_residual)
    return tf.reduce_all(tf.reshape(finite, [batch, -1]), axis=1)


def mask_rows(structure, ok):
    """Zeros the rows (first axis) of every float tensor in `structure` where `ok` is
    False, so that differentiating through a failed sample gives exact zeros, not
    `NaN * 0`."""

    def mask(t):
        return tf.where(_rows(ok, t), t, tf.zeros_like(t)) if t.dtype.is_floating else t

    return tf.nest.map_structure(mask, structure)


def _rows(ok, t):
    """`ok` `(batch,)` shaped to broadcast over the rows of `t`."""
    return tf.reshape(ok, tf.concat([[-1], tf.ones([tf.rank(t) - 1], tf.int32)], 0))


def finite_upstream(z):
    """Identity on the nest `z` whose gradient zeros the rows (samples) of the
    upstream gradient that hold NaN or Inf.

    A loss that overflows downstream of the layer (e.g. on a diverged state) then
    moves no weight through the layer, whatever the backward mode.
    """
    flat = tf.nest.flatten(z)

    @tf.custom_gradient
    def identity(*tensors):
        def grad(*upstream):
            out = []
            for g in _zeros_for_none(upstream, tensors):
                rows = tf.reshape(g, [tf.shape(g)[0], -1])
                finite = tf.reduce_all(tf.math.is_finite(rows), axis=1)
                out.append(tf.where(_rows(finite, g), g, tf.zeros_like(g)))
            return out

        return [tf.identity(t) for t in tensors], grad

    return tf.nest.pack_sequence_as(z, list(identity(*flat)))


def _zeros_for_none(grads, like):
    return [tf.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


def equilibrium(
    fn,
    x,
    z0,
    forward,
    mode="implicit",
    backward=None,
    variables=(),
    phantom_steps=5,
    phantom_damping=0.5,
    on_backward=None,
):
    """Solves `z = fn(z, x)` and returns `(z_out, forward_result)` with gradients.

    Args:
        fn: The cell as a function `(z, x) -> next z`, structures in and out.
        x: The injection: a tensor or a nest of tensors, differentiable.
        z0: The initial state, a nest matching `fn`'s output. Not differentiated.
        forward: `solver(f, z0) -> SolverResult` for the forward pass.
        mode: One of `MODES`.
        backward: `solver(h, u0) -> SolverResult` for the adjoint fixed point
            (`"implicit"` only).
        variables: The trainable variables `fn` reads; the implicit mode returns
            a gradient for each of them.
        phantom_steps: Number of damped steps of the `"phantom"` mode.
        phantom_damping: Damping `tau` of the `"phantom"` mode.
        on_backward: Optional callback receiving the adjoint `SolverResult` each
            time the implicit gradient is computed (for statistics).

    Returns:
        A tuple `(z, forward_result)`: the output state (structure of `z0`) and
        the forward `SolverResult`.
    """
    check_mode(mode)
    if mode == "unrolled":
        result = forward(lambda z: fn(z, x), z0)
        return result.state, result
    if mode == "implicit":
        return _implicit(fn, x, z0, forward, backward, list(variables), on_backward)

    x_const = tf.nest.map_structure(tf.stop_gradient, x)
    with _not_recorded():
        result = forward(lambda z: fn(z, x_const), z0)
    z_star = tf.nest.map_structure(tf.stop_gradient, result.state)
    # A sample without a finite iterate keeps z*; its step is computed from zeroed
    # inputs, so that its gradient is exactly zero rather than NaN.
    ok = solved_rows(result, x)
    x, z_in = mask_rows(x, ok), mask_rows(z_star, ok)
    if mode == "one_step":
        z = fn(z_in, x)
    else:
        z = _phantom(fn, x, z_in, phantom_steps, phantom_damping)
    return select_rows(ok, z, z_star), result


def select_rows(ok, a, b):
    """Rows of nest `a` where `ok`, else rows of nest `b`."""

    return tf.nest.map_structure(lambda t, u: tf.where(_rows(ok, t), t, u), a, b)


def _phantom(fn, x, z_star, steps, tau):
    """`steps` damped steps from `z*`; a sample whose step is not finite stops."""

    def damped_step(i, z):
        fz = fn(z, x)
        z_next = tf.nest.map_structure(lambda a, b: (1.0 - tau) * a + tau * b, z, fz)
        finite = tf.reduce_all(
            tf.stack(
                [
                    tf.reduce_all(tf.reshape(tf.math.is_finite(t), [tf.shape(t)[0], -1]), 1)
                    for t in tf.nest.flatten(z_next)
                ]
            ),
            axis=0,
        )
        return i + 1, select_rows(finite, z_next, z)

    _, z = tf.while_loop(
        lambda i, z: i < steps, damped_step, (tf.constant(0), z_star), maximum_iterations=steps
    )
    return z


def _implicit(fn, x, z0, forward, backward, variables, on_backward):
    x_struct = x
    holder = {}

    @tf.custom_gradient
    def solve(*x_flat):
        x_in = tf.nest.pack_sequence_as(x_struct, list(x_flat))
        # Read each variable once where the tape can see it, so that
        # tf.custom_gradient hands them to `grad` even though the solve
        # itself is not recorded.
        for v in variables:
            tf.convert_to_tensor(v)
        with _not_recorded():
            result = forward(lambda z: fn(z, x_in), z0)
        holder["result"] = result
        z_star = tf.nest.map_structure(tf.identity, result.state)
        z_flat = tf.nest.flatten(z_star)

        def grad(*upstream, variables=None):
            variables = list(variables or [])
            # Samples without a finite iterate are left out of the gradient.
            ok = solved_rows(result, x_in)
            upstream = mask_rows(_zeros_for_none(upstream, z_flat), ok)
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(z_flat)
                tape.watch(list(x_flat))
                z_in = tf.nest.pack_sequence_as(z_star, mask_rows(z_flat, ok))
                x_safe = tf.nest.pack_sequence_as(x_struct, mask_rows(list(x_flat), ok))
                fz_flat = tf.nest.flatten(fn(z_in, x_safe))

            def adjoint_map(u):
                vjp = tape.gradient(fz_flat, z_flat, output_gradients=tf.nest.flatten(u))
                vjp = _zeros_for_none(vjp, z_flat)
                return tf.nest.pack_sequence_as(
                    z_star, [a + b for a, b in zip(vjp, upstream, strict=True)]
                )

            g = tf.nest.pack_sequence_as(z_star, upstream)
            adjoint = backward(adjoint_map, g)
            checks = on_backward(adjoint) if on_backward is not None else None
            with tf.control_dependencies(checks or []):
                u = [tf.identity(t) for t in tf.nest.flatten(adjoint.state)]
            grads = tape.gradient(fz_flat, list(x_flat) + variables, output_gradients=u)
            x_grads = _zeros_for_none(grads[: len(x_flat)], x_flat)
            return x_grads, grads[len(x_flat) :]

        return z_flat, grad

    z_flat = solve(*tf.nest.flatten(x))
    z = tf.nest.pack_sequence_as(z0, tf.nest.flatten(z_flat))
    return z, holder["result"]


def explicit(fn, x, z0, depth, tol, stop_mode="rel"):
    """Applies `fn` `depth` times from `z0`, differentiated by autodiff (no solver).

    The layer is then an explicit weight-tied network of `depth` layers: the
    "pretrain" phase of the DEQ recipes, which trains the cell briefly before the
    solver takes over. Memory grows with `depth`.

    Args:
        fn: The cell as a function `(z, x) -> next z`.
        x: The injection, differentiable.
        z0: The initial state. Not differentiated.
        depth: Number of applications of `fn`, >= 1.
        tol: Tolerance used only to report `converged`.
        stop_mode: `"rel"` or `"abs"`: the residual compared with `tol`.

    Returns:
        A tuple `(z, result)`: `fn` applied `depth` times, and a `SolverResult`
        whose residuals are those of the last application (`z_depth - z_{depth-1}`).
    """

    def body(i, z):
        return i + 1, fn(z, x)

    _, z = tf.while_loop(
        lambda i, z: i < depth - 1, body, (tf.constant(0), z0), maximum_iterations=depth - 1
    )
    fz = fn(z, x)
    packer = Packer(z)
    abs_res, rel_res = result_lib.residuals(packer.pack(fz), packer.pack(z))
    residual = rel_res if stop_mode == "rel" else abs_res
    result = result_lib.SolverResult(fz, tf.constant(depth), abs_res, rel_res, residual <= tol)
    return fz, result
