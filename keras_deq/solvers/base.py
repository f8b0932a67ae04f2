"""`Solver`: settings checked once in the constructor, and the one loop every solver runs.

A solver is an object whose settings are its constructor arguments. It implements two
hooks, `init` (its own loop state) and `step` (the next iterate); the loop here owns
everything else: evaluating `f` once per iteration, the residuals, the per-sample best
iterate, the non-finite guard, the stopping rule and the `SolverResult`.
"""

import contextlib
import threading
from typing import Any, NamedTuple

import keras
from keras import ops

from keras_deq import backend, configurable
from keras_deq.solvers import common
from keras_deq.solvers import result as res
from keras_deq.solvers import trace as trace_lib

# Short name -> Solver subclass, for the subclasses that set `name` (see `Solver.name`).
_BY_NAME = {}


# The open `differentiable_loops` scopes (innermost last): `(max_steps, checkpoint)`.
_DIFFERENTIABLE = threading.local()


class Checkpointing(NamedTuple):
    """How a differentiable solver loop is split into rematerialized segments.

    See `differentiable_loops`. The loop body may read tensors from outside the loop
    (the cell's injection and weights); where the backend's rematerialization drops
    the gradient of what its function captures (TensorFlow's `tf.recompute_grad`),
    they are handed to each segment as inputs: `inputs`, a tuple of tensors, and
    `bind`, a function of a tuple like `inputs` returning a context manager under
    which the loop body reads those tensors in place of `inputs`.

    Attributes:
        every: The solver iterations per segment, a positive Python int.
        inputs: The tensors the loop body reads from outside the loop, or `()`.
        bind: `tensors -> context manager`, or None (when `inputs` is empty).
    """

    every: int
    inputs: tuple = ()
    bind: Any = None


@contextlib.contextmanager
def differentiable_loops(max_steps=None, checkpoint=None):
    """A scope in which every solver loop can be reverse-differentiated on any backend.

    Inside it the shared loop runs as `keras_deq.backend.masked_while_loop`: on JAX
    (which cannot reverse-differentiate a while loop) a `fori_loop` of a static
    number of iterations whose iterations after the stop are skipped, so autodiff
    goes through exactly the iterations the solver ran. Used by
    `keras_deq.backward.Unrolled`. The static bound is the solver's `max_iter`; a
    solver whose `max_iter` is a tensor (a budget drawn at run time) needs
    `max_steps`, a Python int at least as large as that budget.

    With `checkpoint` (a `Checkpointing`), the loop runs as segments of
    `checkpoint.every` iterations (the solver's own update and state included),
    each rematerialized (`keras.remat`): the backward pass keeps the loop's state
    at the segment boundaries only, and recomputes one segment's iterations at a
    time from it. The iterations after the stop are skipped in the same way. Only
    the solver loops this scope runs directly are segmented, not loops run inside
    the map they solve.

    Args:
        max_steps: None, or the static bound for a run-time `max_iter`.
        checkpoint: None, or a `Checkpointing`.
    """
    stack = _DIFFERENTIABLE.__dict__.setdefault("bounds", [])
    stack.append((max_steps, checkpoint))
    try:
        yield
    finally:
        stack.pop()


def _differentiable_bound(max_iter):
    """None outside `differentiable_loops`, else the loop's static bound."""
    stack = getattr(_DIFFERENTIABLE, "bounds", None)
    if not stack:
        return None
    if not ops.is_tensor(max_iter):
        return max_iter
    if stack[-1][0] is None:
        raise ValueError(
            "An unrolled (differentiable) solver loop needs a static bound, but `max_iter` "
            "is a tensor: pass `differentiable_loops(max_steps=...)` (in `Equilibrium`, "
            f"`max_steps=`). Received: max_iter={max_iter!r}"
        )
    return stack[-1][0]


def _checkpointing():
    """The innermost `differentiable_loops` scope's `(max_steps, Checkpointing or None)`."""
    stack = getattr(_DIFFERENTIABLE, "bounds", None)
    return stack[-1] if stack else (None, None)


def checkpointed_while_loop(cond, body, loop_vars, max_steps, checkpoint, max_steps_inside=None):
    """`backend.masked_while_loop(cond, body, loop_vars, max_steps)` as rematerialized
    segments of `checkpoint.every` iterations (see `differentiable_loops`).

    An outer masked loop of `ceil(max_steps / every)` iterations runs, while `cond`
    holds, one segment: `keras.remat` of a masked loop of `every` iterations of
    `body` (an iteration after `cond` turns False is skipped, so a stop inside a
    segment, or a `max_steps` that is not a multiple of `every`, runs exactly the
    iterations the while loop would). Autodiff through the outer loop keeps each
    segment's input (the loop variables and `checkpoint.inputs`), and recomputes the
    segment's iterations when its gradient is needed. Inside a segment the solver
    loops of the map see a `differentiable_loops(max_steps_inside)` scope, without
    checkpointing, also when the segment is recomputed.

    Args:
        cond, body, loop_vars, max_steps: As for `backend.masked_while_loop`.
        checkpoint: A `Checkpointing`.
        max_steps_inside: The `max_steps` of the scope the segment's inner loops see.

    Returns:
        The final `loop_vars`, a tuple.
    """
    loop_vars = tuple(loop_vars)
    inputs = tuple(checkpoint.inputs)
    n = len(inputs)
    bind = checkpoint.bind or (lambda tensors: contextlib.nullcontext())

    def run_segment(*flat):
        with bind(tuple(flat[:n])), differentiable_loops(max_steps_inside):
            v = keras.tree.pack_sequence_as(loop_vars, flat[n:])
            out = backend.masked_while_loop(cond, body, v, checkpoint.every)
            return tuple(keras.tree.flatten(out))

    segment = backend.remat(run_segment)

    def segment_body(*v):
        out = segment(*inputs, *keras.tree.flatten(v))
        return tuple(keras.tree.pack_sequence_as(loop_vars, out))

    segments = -(-max_steps // checkpoint.every)
    return backend.masked_while_loop(cond, segment_body, loop_vars, segments)


# The iterations whose iterates the innermost open `recording` scope keeps.
_RECORDING = threading.local()


@contextlib.contextmanager
def recording(indices):
    """A scope in which a solver loop keeps its iterates `z_i` for `i` in `indices`.

    `z_i` is the iterate after `i` iterations (`z_0` the start); an index past the
    iteration the loop stopped at, or a sample's non-finite iterate, gets the returned
    state. The loop writes them into a
    fixed-size buffer, returned as `SolverResult.recorded` (a tuple, one state per index).
    Used by `keras_deq.FixedPointCorrection`.

    Args:
        indices: A tuple of positive Python ints.
    """
    previous = getattr(_RECORDING, "indices", ())
    _RECORDING.indices = tuple(indices)
    try:
        yield
    finally:
        _RECORDING.indices = previous


def named_solvers():
    """The solver classes reachable by name, `{name: class}`, in registration order."""
    return dict(Solver._registry)


class Solver(configurable.Configurable):
    """Base class of the fixed-point solvers: finds `z` with `f(z) = z`, per sample.

    A subclass declares its settings as constructor arguments, checks them there
    (once) and stores each under the attribute of the same name, which is what
    `get_config` reads back. It implements `step`, and `init` if it keeps state of
    its own between iterations. Set the class attribute `name` to make it reachable
    by `keras_deq.solvers.get(name)`; register it with
    `keras.saving.register_keras_serializable` for `.keras` files.

    Every iteration of the shared loop evaluates `f` once at the current iterate,
    records the per-sample residuals and best iterate (the first iterate that met
    `tol`, else the lowest absolute residual), calls `step` for the next iterate,
    freezes samples that met a non-finite value at their best finite iterate, and
    stops when every sample has converged or failed, or after `max_iter`
    iterations. See `SolverResult` for what is returned.

    A solver whose attribute `fixed_steps` is True (a setting of `FixedPoint` and
    `SAM`) runs exactly `max_iter` iterations instead, whatever the residuals, and
    returns its last iterate, not the best one: `k` steps of plain iteration
    return `z_k = f(...f(z0))`, `f` applied `k` times (the unrolled iterations of
    OptEq, Algorithm 1). Its residuals are those of the last iterate measured,
    `z_{k-1}` (for plain iteration, `||z_k - z_{k-1}||`), and `tol` only decides
    `converged`; a sample that met a non-finite value is frozen at its last
    iterate whose residual was finite.

    A solver that needs maps of the state besides `f` names them in `extra_maps`
    (SAM's `prior_gradient`); they are keyword arguments of its call, packed like
    `f`, and `keras_deq.DEQ` hands each from its cell's method of that name.

    Args:
        max_iter: Maximum number of iterations, each evaluating `f` once: a positive
            integer, or a scalar integer tensor (a budget drawn at run time; values
            below 1 act as 1).
        tol: Tolerance on the per-sample residual named by `stop_mode`, > 0.
        stop_mode: `"rel"` for `||f(z) - z|| / ||f(z)||`, `"abs"` for `||f(z) - z||`.

    Examples:
        >>> from keras import ops
        >>> class Picard(Solver):
        ...     def step(self, f, z, fz, state, k):
        ...         return fz, state
        >>> result = Picard(tol=1e-6)(lambda z: 0.5 * z + 1.0, ops.zeros((2, 3)))
        >>> bool(ops.all(result.converged))
        True
    """

    family = "solver"
    _registry = _BY_NAME
    # Run exactly `max_iter` iterations and return the last iterate (see above).
    fixed_steps = False
    # Names of the maps of the state, besides `f`, that `__call__` takes (see above).
    extra_maps = ()
    # Whether `step` takes the residual the loop computed, `residual=(g, square)`.
    uses_residual = False
    # Whether `step` is a few elementwise ops, which a TensorFlow graph runs about as
    # fast as XLA: `DEQ(jit_compile="auto")` then leaves a solve of a convolutional
    # cell to the graph on CPU (`layers.deq_arguments.compiles_solves`).
    cheap_step = False
    # Whether the solver is correct for affine maps only (`GMRES`): `DEQ` then refuses
    # it as the forward solver of its (non-linear) cell; it solves the adjoint.
    affine_only = False
    # Whether, under `solver_batch_dims` > 1 (`common.per_entry`), the solver takes whole
    # samples and tests its tolerance per entry (`solve_flat(..., entry_size=...)`)
    # rather than solving each entry as a sample of its own: a Krylov process (`GMRES`)
    # must span every entry that the map couples.
    joint_entries = False

    def __init__(self, max_iter=50, tol=1e-4, stop_mode="rel"):
        self.max_iter = common.check_max_iter(max_iter)
        self.tol = common.check_positive_float("tol", tol)
        self.stop_mode = common.check_stop_mode(stop_mode)

    # ------------------------------------------------------------------ hooks
    def init(self, f, z0):
        """The solver's own loop state before the first iteration.

        Args:
            f: The map on `(batch, n)` matrices. Do not evaluate it here: each
                iteration of the loop evaluates it once, so that the statistics
                count evaluations.
            z0: The starting iterate, a `(batch, n)` float32 or float64 matrix.

        Returns:
            A nest of tensors (`()` for none) whose shapes and dtypes `step` keeps.
        """
        del f, z0
        return ()

    def step(self, f, z, fz, state, k):
        """The next iterate.

        Args:
            f: The map on `(batch, n)` matrices; do not evaluate it (see `init`).
            z: The current iterate, `(batch, n)`.
            fz: `f(z)`, evaluated by the loop. For a sample whose residual is not
                finite, `z` and `fz` are both its best iterate (that sample's step is
                discarded, see below).
            state: The solver's loop state (from `init` or the previous `step`).
            k: Scalar int32 tensor, the iteration's index (0 for `z0`).

        A solver whose class attribute `uses_residual` is True takes one more
        argument, `residual`: `(g, square)`, the residual `g = fz - z` `(batch, n)`
        the loop computed (0 for the samples above) and its squared norm `(batch,)`
        without gradient, so that it does not compute them again (`Anderson`).

        Returns:
            `(z_next, state)`. The loop replaces `z_next` by the best finite
            iterate for the samples that met a non-finite value, and stops, so
            `step` needs no bookkeeping of its own.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `step`.")

    # ----------------------------------------------------------------- config
    @classmethod
    def from_config(cls, config):
        # A tensor setting (a `max_iter` tensor) serializes as a nested config.
        config = {
            key: keras.saving.deserialize_keras_object(value) if isinstance(value, dict) else value
            for key, value in config.items()
        }
        return cls(**config)

    # ------------------------------------------------------------------- call
    def __call__(self, f, z0, **overrides):
        """Solves `f(z) = z` from `z0`.

        Args:
            f: The map, taking and returning a structure like `z0`.
            z0: The initial state: a `(batch, ...)` tensor or a nest of such tensors.
            **overrides: Settings that replace this solver's for this call (checked
                like the constructor's), e.g. `solver(f, z0, max_iter=10)`; the
                maps named in `extra_maps` (structure to structure, like `f`); and
                `trace=True` to record the residuals of every iteration in
                `SolverResult.trace` (a `SolverTrace`; needs an int `max_iter`);
                for a solver with `joint_entries`, `entry_size` (see
                `common.per_entry`).

        Returns:
            A `SolverResult`.
        """
        common.check_callable("f", f)
        trace = common.check_bool("trace", overrides.pop("trace", False))
        entry_size = overrides.pop("entry_size", None)
        if entry_size is not None and not self.joint_entries:
            raise ValueError(
                f"`entry_size` is for solvers with `joint_entries` (GMRES); "
                f"{type(self).__name__} solves each entry as a sample of its own "
                f"(`common.per_entry`). Received: entry_size={entry_size!r}"
            )
        maps = {name: overrides.pop(name) for name in self.extra_maps if name in overrides}
        maps = {name: common.check_callable(name, g) for name, g in maps.items() if g is not None}
        solver = self
        if overrides:
            solver = type(self).from_config({**self.get_config(), **overrides})
        kwargs = {"trace": trace_lib.check_traceable(solver)} if trace else {}
        if entry_size is not None:
            kwargs["entry_size"] = entry_size
        return common.solve_structure(solver.solve_flat, f, z0, maps=maps, **kwargs)

    def solve_flat(self, f, z0, unpack=None, trace=False):
        """The shared loop, on `(batch, n)` matrices.

        A solver with `extra_maps` overrides it to take them (packed maps, as `f`)
        and hands them to its `step`.

        Args:
            f: The map on `(batch, n)` matrices.
            z0: The starting iterate, `(batch, n)`, float32 or float64.
            unpack: Applied to the returned state (identity if None).
            trace: Whether to record a `SolverTrace` (a static switch: when False
                the loop carries nothing for it).

        Returns:
            A `SolverResult`.
        """
        tol, stop_mode, fixed = self.tol, self.stop_mode, self.fixed_steps
        max_iter = common.loop_bound(self.max_iter)

        bound = _differentiable_bound(max_iter)
        max_steps_inside, checkpoint = _checkpointing()
        # Where the loop runs op by op and nothing differentiates it, a new iterate is
        # checked for NaN or Inf at its next evaluation (`res.nonfinite_rows`), one
        # pass less per iteration; elsewhere before it (`res.guard`), so that no
        # non-finite value reaches `f`.
        guard_each_step = bound is not None or not backend.runs_op_by_op()

        # Iterates kept for `recording`: a (m, batch, n) buffer, written in the loop.
        record = getattr(_RECORDING, "indices", ())
        _RECORDING.indices = ()  # this loop's only, not the loops `f` may run
        indices = ops.convert_to_tensor(record or (0,), "int32")

        def advance(k, z, fz, state, best, go, history, kept):
            residual = res.residuals(fz, z)
            abs_res, rel_res = residual.abs_residual, residual.rel_residual
            if trace:
                history = trace_lib.record(history, k, abs_res, rel_res)
            if fixed:
                best = res.update_last(best, z, abs_res, rel_res, stop_mode)
            else:
                best = res.update_best(best, z, abs_res, rel_res, stop_mode, tol)
            z, fz, g, square = res.nonfinite_rows(residual, best, z, fz)
            if self.uses_residual:
                z_next, state = self.step(f, z, fz, state, k, residual=(g, square))
            else:
                z_next, state = self.step(f, z, fz, state, k)
            if guard_each_step:
                z_next, best = res.guard(best, z_next)
            go = ops.any(~best.failed) if fixed else res.keep_going(best, tol, stop_mode)
            if record:
                kept = ops.where((indices == k + 1)[:, None, None], z_next[None], kept)
            return k + 1, z_next, state, best, go, history, kept

        def body(k, z, state, best, _, history, kept):
            return advance(k, z, f(z), state, best, _, history, kept)

        def cond(k, z, state, best, go, history, kept):
            return ops.logical_and(go, k < max_iter)

        k0, go = ops.convert_to_tensor(0, "int32"), ops.convert_to_tensor(True)
        best0 = res.initial_best(z0)
        # `()` unless traced or recording: the default loop carries nothing more.
        history = ()
        if trace:
            history = trace_lib.empty(max_iter, ops.shape(z0)[0], best0.abs_residual.dtype)
        kept0 = ops.zeros((len(record), *ops.shape(z0)), z0.dtype) if record else ()
        loop_vars = (k0, z0, self.init(f, z0), best0, go, history, kept0)
        if bound is None:
            steps, z, _, best, _, history, kept = ops.while_loop(
                cond, body, loop_vars, maximum_iterations=max_iter
            )
        elif checkpoint is None:
            steps, z, _, best, _, history, kept = backend.masked_while_loop(
                cond, body, loop_vars, bound
            )
        else:
            steps, z, _, best, _, history, kept = checkpointed_while_loop(
                cond, body, loop_vars, bound, checkpoint, max_steps_inside
            )
        if not guard_each_step:  # the last iterate, never evaluated
            z, best = res.guard(best, z)
        if fixed:  # the last iterate (a frozen sample's is its last finite one)
            best = best._replace(z=z)
        unpack = unpack or (lambda z: z)
        result = res.to_result(best, steps, tol, stop_mode, unpack)
        if trace:
            result = result._replace(trace=trace_lib.SolverTrace(*history, result.steps))
        if not record:
            return result
        # Indices past the stop get the returned state, and so do non-finite iterates.
        late = (indices > steps)[:, None, None]
        bad = ops.logical_not(ops.all(ops.isfinite(kept), axis=-1, keepdims=True))
        kept = ops.where(ops.logical_or(late, bad), best.z[None], kept)
        return result._replace(recorded=tuple(unpack(kept[i]) for i in range(len(record))))
