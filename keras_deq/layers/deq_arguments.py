"""The arguments of `DEQ`: checked once here, turned into the objects the layer runs.

`solver_settings` builds the forward solver, the backward mode and the adjoint solver
from either form the layer accepts (names with flat settings, or objects carrying
their own); `penalty` does the same for the Jacobian penalty.
"""

import numbers
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import keras
import numpy as np

from keras_deq import backend, jacobian_penalty
from keras_deq import backward as backward_lib
from keras_deq import solvers as solvers_lib
from keras_deq.correction import FixedPointCorrection
from keras_deq.solvers import common, registry


def is_solver_object(solver):
    """A `keras_deq.solvers.Solver` or a config dict of one (not a name, not None)."""
    return isinstance(solver, (solvers_lib.Solver, Mapping))


def is_fixed_point(solver):
    """`"fixed_point"`, or a `keras_deq.solvers.FixedPoint` (or its config): the solver
    that the paper layers whose guarantee covers plain (or damped) iteration accept."""
    if isinstance(solver, str):
        return solver == "fixed_point"
    try:
        return isinstance(solvers_lib.get(solver), solvers_lib.FixedPoint)
    except (ValueError, TypeError):
        return False


def object_config(value, serialize):
    """A name (or None) as is; an object as its config dict."""
    return value if value is None or isinstance(value, str) else serialize(value)


def optional_object(argument, value, cls):
    """None, or an instance of `cls` from an instance or its config dict."""
    if isinstance(value, dict):
        value = keras.saving.deserialize_keras_object(value)
    if value is not None and not isinstance(value, cls):
        raise ValueError(
            f"`{argument}` must be None or a `keras_deq.{cls.__name__}`. "
            f"Received: {argument}={value!r}"
        )
    return value


def correction(value, max_iter):
    """None, or the `FixedPointCorrection` `value` (or its config), whose sampled
    iterations fit in the forward budget `max_iter`."""
    value = optional_object("correction", value, FixedPointCorrection)
    if value is not None:
        try:
            value.indices(max_iter)
        except ValueError as error:
            raise ValueError(f"`correction` does not fit in `max_iter`: {error}") from error
    return value


FLAT_PENALTY_DEFAULTS = {"weight": 0.0, "frequency": 1.0, "probes": 1, "max_iter_delta": 0}
LEGACY_PHANTOM = {"phantom_steps": "steps", "phantom_damping": "damping"}


def backward_mode(backward, legacy):
    """The `Backward` object for `backward` (a name, a config dict or an object).

    `legacy` holds `phantom_steps` / `phantom_damping` given as layer arguments (the
    API before 0.2): they set the `"phantom"` mode's settings, with a deprecation
    warning when passed by a user.
    """
    if legacy:
        warnings.warn(
            "`phantom_steps` and `phantom_damping` are deprecated: pass "
            "`backward=keras_deq.backward.Phantom(steps=..., damping=...)`.",
            DeprecationWarning,
            stacklevel=3,
        )
    common.check_positive_int("phantom_steps", legacy.get("phantom_steps", 5))
    common.check_fraction("phantom_damping", legacy.get("phantom_damping", 0.5))
    if legacy and backward == "phantom":
        return backward_lib.Phantom(**{LEGACY_PHANTOM[k]: v for k, v in legacy.items()})
    try:
        return backward_lib.get(backward)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`backward` must be one of {backward_lib.names()}, a config dict or a "
            f"`keras_deq.backward.Backward`. Received: backward={backward!r}"
        ) from error


def penalty(regularizer, flat):
    """`(regularizer, penalty)`: the `JacobianPenalty` given as `regularizer`, or the one
    the flat `jacobian_*` arguments describe (`flat`), which must then be left at
    their defaults."""
    penalty = jacobian_penalty.get(regularizer)
    if penalty is None:
        return None, flat
    if flat.get_config() != FLAT_PENALTY_DEFAULTS:
        raise ValueError(
            "The Jacobian penalty is set twice: by `regularizer` and by the `jacobian_*` "
            f"arguments. Set it in one place. Received: regularizer={regularizer!r}, "
            f"jacobian_* arguments={flat!r}"
        )
    return penalty, penalty


class SolverSettings(NamedTuple):
    """What `solver_settings` returns: the objects, and the arguments as the layer
    reports them (names stay names, so that a config reads as it was written)."""

    solver: Any
    solver_options: dict
    forward: solvers_lib.Solver
    backward: Any
    mode: backward_lib.Backward
    backward_solver: Any
    backward_solver_options: dict
    adjoint: solvers_lib.Solver


def solver_settings(
    solver,
    max_iter,
    tol,
    stop_mode,
    solver_options,
    backward,
    backward_solver,
    backward_max_iter,
    backward_tol,
    backward_solver_options,
    legacy,
):
    """Checks the solver and backward arguments of `DEQ` and builds their objects."""
    if is_solver_object(solver):
        # A solver object (or its config) carries its own settings.
        forward = solver_object("solver", solver, solver_options)
        solver, solver_options = forward, {}
    else:
        solver = check_solver_name("solver", solver)
        solver_options = registry.check_options(solver, solver_options, "solver_options")
        forward = solvers_lib.get(
            solver, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **solver_options
        )
    # A run-time tensor budget is for direct calls of a solver, not for a layer's config.
    common.check_positive_int("max_iter", forward.max_iter)
    if forward.affine_only:
        kind = type(forward).__name__
        label = repr(type(forward).name) if type(forward).name else f"{kind}(...)"
        raise ValueError(
            f"`solver`: {kind} solves affine fixed points only, and a DEQ's cell is not "
            f"affine. Use it for the adjoint of the implicit backward instead: "
            f"`backward_solver={label}` or "
            f"`backward=keras_deq.backward.Implicit(solver={label})`. "
            f"Received: solver={solver!r}"
        )
    mode = backward_mode(backward, legacy)
    if not isinstance(backward, str) or legacy:
        backward = mode
    own = getattr(mode, "solver", None)  # Implicit(solver=...) names its own
    if own is not None and (backward_solver is not None or backward_solver_options):
        raise ValueError(
            "The adjoint solver is set twice: by `backward` and by `backward_solver` "
            f"(or `backward_solver_options`). Set it in one place. Received: "
            f"backward={backward!r}, backward_solver={backward_solver!r}, "
            f"backward_solver_options={backward_solver_options!r}"
        )
    overrides = {"max_iter": forward.max_iter, "tol": forward.tol}
    if backward_max_iter is not None:
        overrides["max_iter"] = common.check_positive_int("backward_max_iter", backward_max_iter)
    if backward_tol is not None:
        overrides["tol"] = common.check_positive_float("backward_tol", backward_tol)
    named = {"backward_solver": None, "backward_solver_options": {}}
    if own is not None:
        adjoint = solvers_lib.get(own, **_given(overrides, backward_max_iter, backward_tol))
    elif backward_solver is None and is_solver_object(solver):
        adjoint = solvers_lib.get(forward, **overrides)
    elif is_solver_object(backward_solver):
        adjoint = solver_object("backward_solver", backward_solver, backward_solver_options)
        adjoint = solvers_lib.get(adjoint, **_given(overrides, backward_max_iter, backward_tol))
        named["backward_solver"] = adjoint
    else:
        name = check_solver_name(
            "backward_solver", solver if backward_solver is None else backward_solver
        )
        if backward_solver_options is None and name == solver:
            backward_solver_options = solver_options
        options = registry.check_options(name, backward_solver_options, "backward_solver_options")
        adjoint = solvers_lib.get(name, stop_mode=forward.stop_mode, **overrides, **options)
        named = {"backward_solver": name, "backward_solver_options": options}
    return SolverSettings(solver, solver_options, forward, backward, mode, adjoint=adjoint, **named)


def _given(overrides, max_iter, tol):
    """The adjoint settings the user gave (an object's own settings stand otherwise)."""
    keys = [k for k, v in (("max_iter", max_iter), ("tol", tol)) if v is not None]
    return {k: overrides[k] for k in keys}


def solver_object(argument, solver, options):
    if options:
        raise ValueError(
            f"`{argument}_options` apply to a solver given by name; a solver object "
            f"carries its own settings. Received: {argument}={solver!r}, "
            f"{argument}_options={options!r}"
        )
    try:
        return solvers_lib.get(solver)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{error} Received: {argument}={solver!r}") from error


def check_solver_name(argument, solver):
    if solver not in registry.names():
        raise ValueError(
            f"Unknown solver. Expected one of {registry.names()}. Received: {argument}={solver!r}"
        )
    return solver


def check_state_shape(state_shape):
    """None, a tuple of positive ints, or a list of such tuples (a multi-tensor state)."""
    if state_shape is None:
        return None

    def is_shape(s):
        return isinstance(s, (tuple, list)) and all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in s
        )

    if is_shape(state_shape) and len(state_shape) > 0:
        return tuple(int(d) for d in state_shape)
    if (
        isinstance(state_shape, (tuple, list))
        and state_shape
        and all(is_shape(s) and s for s in state_shape)
    ):
        return [tuple(int(d) for d in s) for s in state_shape]
    raise ValueError(
        "`state_shape` must be a tuple of positive ints (the state shape without "
        "the batch dimension) or a list of such tuples. "
        f"Received: state_shape={state_shape!r}"
    )


def check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"`seed` must be an integer or None. Received: seed={seed!r}")
    return None if seed is None else int(seed)


def check_jit_compile(jit_compile):
    """'auto' or a bool (numpy bools too, as Python bools)."""
    if isinstance(jit_compile, np.bool_):
        jit_compile = bool(jit_compile)
    if not (
        jit_compile == "auto" if isinstance(jit_compile, str) else isinstance(jit_compile, bool)
    ):
        raise ValueError(
            f"`jit_compile` must be 'auto', True or False. Received: jit_compile={jit_compile!r}"
        )
    return jit_compile


def supports_jit(layer):
    """Whether `layer` and every layer inside it say they compile with XLA."""
    return all(getattr(sub, "supports_jit", True) for sub in layer._flatten_layers())


# Keras' convolution layers. On CPU, XLA compiles them to its own kernels, which ran
# slower than the oneDNN kernels TensorFlow's graph calls: a conv cell's training
# epoch took 1.9x as long with its solves compiled whole (benchmarks/vs_torchdeq.py,
# conv cell; the adjoint's transposed convolutions most), while a dense cell's took
# half as long. Compiling each iteration's bookkeeping apart and leaving the cell to
# the graph was tried (until 2026-12-03) and lost to the plain graph once Anderson's
# graph-mode step was made lean (benchmarks/conv_step.py). A forward solve whose
# bookkeeping is more than a few elementwise ops (Anderson, Broyden) is compiled all the
# same: once Anderson's compiled history was a ring buffer, XLA ran its 30 iterations
# on the conv cell in 9.8 ms against 14.1 ms in the graph, while the fixed-point
# forward (7.0 vs 5.8 ms) and the adjoint (its vector-Jacobian products of the
# convolution: 0.8 ms each compiled, 0.12 ms in the graph) stay in the graph.
_CONVOLUTIONS = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
)


def compiles_solves(jit_compile, cell, solver, adjoint=False):
    """Whether `DEQ(jit_compile=...)` compiles a solve apart, as one XLA program,
    inside a TensorFlow graph that runs op by op (`keras_deq.backend.compiled_solve`).

    `"auto"` compiles when every layer of the cell supports XLA, except, with a
    convolution layer in the cell on a machine without GPU or TPU (see
    `_CONVOLUTIONS`), the adjoint solve and a forward solve whose step is a few
    elementwise ops (`solver.cheap_step`, e.g. `FixedPoint`); and never for a cell that
    draws random numbers (a `Dropout`: its layers have a `seed_generator`), since XLA's
    stateless random numbers are not TensorFlow's: the compiled solve would use another
    dropout mask than the backward pass.

    Args:
        jit_compile: The layer's setting, `"auto"`, True or False.
        cell: The layer's cell.
        solver: The solver of that solve.
        adjoint: Whether it is the adjoint solve of the implicit backward.
    """
    if jit_compile is True:
        return True
    if jit_compile is False or not supports_jit(cell):
        return False
    if any(getattr(sub, "seed_generator", None) is not None for sub in cell._flatten_layers()):
        return False
    if backend.has_accelerator():
        return True
    if not any(isinstance(sub, _CONVOLUTIONS) for sub in cell._flatten_layers()):
        return True
    return not adjoint and not solver.cheap_step


def check_backend_support(on_failure):
    """Refuses what the current Keras backend cannot do (clearly, at construction).

    Every backward mode and the Jacobian penalty run on TensorFlow and JAX; JAX refuses
    `on_failure="raise"`.
    """
    name = backend.name()
    if name == "tensorflow":
        return
    if name not in ("jax", "torch"):
        raise ValueError(
            f"keras_deq's DEQ layer runs on the TensorFlow, JAX and PyTorch backends. "
            f"Received: KERAS_BACKEND={name!r}"
        )
    if name == "jax" and on_failure == "raise":
        # Measured (jax 0.10.2, keras 3.15): an exception raised in a host callback
        # (`jax.debug.callback`) inside `fit`'s jitted step does surface, as a
        # `JaxRuntimeError`, but Keras donates the training state to that step, so
        # the model's weights are deleted ("Array has been deleted") and the model is
        # lost; `checkify.check` cannot be staged in a step Keras jits itself.
        raise ValueError(
            "on_failure='raise' must stop a training step before any weight moves. On JAX "
            "no sound way exists: an error raised from the compiled step (a host callback) "
            "aborts `fit` only after Keras donated the model's state to that step, which "
            "deletes the model's weights, and `jax.experimental.checkify` cannot be applied "
            "to the step Keras compiles. On JAX use 'warn' (a warning from the host) or "
            "'ignore', and watch `layer.solver_statistics()['converged']`. "
            f"Received: on_failure={on_failure!r}"
        )
