"""The `DEQ` layer: the fixed point of any Keras cell `f(z, x)` as a layer."""

import numbers
import warnings
from collections.abc import Mapping

import keras
import tensorflow as tf

from keras_deq import backward as backward_lib
from keras_deq import jacobian
from keras_deq import solvers as solvers_lib
from keras_deq.solvers import common, registry

ON_FAILURE = ("warn", "raise", "ignore")
_SEED_STATE_KEY = "seed_generator_state"


def _float32_metrics():
    """A scope in which metric variables are read in float32.

    Under a mixed-precision policy Keras reads float32 variables in the compute
    dtype inside `call`; metric totals accumulated in float16/bfloat16 drift.
    Keras has no public switch for this, so the private scope is used when present.
    """
    try:
        from keras.src.backend import AutocastScope  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        import contextlib  # noqa: PLC0415

        return contextlib.nullcontext()
    return AutocastScope(None)


def _finite_values(values):
    """`(values, weights)` for a Mean metric that skips non-finite samples.

    Samples whose solve never produced a finite iterate (residual inf or NaN) are
    counted by the `converged` metric and the failure warning instead.
    """
    values = tf.cast(values, "float32")
    finite = tf.math.is_finite(values)
    return tf.where(finite, values, tf.zeros_like(values)), tf.cast(finite, "float32")


class _FiniteMean(keras.metrics.Mean):
    """A mean over the finite samples that is NaN, not 0, when there were none.

    A step (or epoch) in which every sample's residual was NaN or Inf would
    otherwise report a residual of 0.0, which reads as perfect convergence.
    """

    def result(self):
        count = keras.ops.cast(self.count, "float32")
        mean = self.total / keras.ops.maximum(count, 1.0)
        return keras.ops.where(count > 0, mean, float("nan"))


def _cast_floats(structure, dtype):
    return tf.nest.map_structure(
        lambda t: tf.cast(t, dtype) if t.dtype.is_floating else t, structure
    )


def _is_solver_object(solver):
    """A `keras_deq.solvers.Solver` or a config dict of one (not a name, not None)."""
    return isinstance(solver, (solvers_lib.Solver, Mapping))


def _solver_config(solver):
    """A solver name as is; a solver object as its config dict."""
    return solvers_lib.serialize(solver) if isinstance(solver, solvers_lib.Solver) else solver


def _serialize_shareable(cell):
    """`serialize_keras_object(cell)`, marked so that a cell shared by several DEQ
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


def _in_save_context():
    """True while `tf.saved_model.save` (and so `model.export()`) traces functions."""
    try:
        from tensorflow.python.saved_model import save_context  # noqa: PLC0415

        return save_context.in_save_context()
    except Exception:  # pragma: no cover - private API moved
        return False


def _in_xla_context():
    try:
        from tensorflow.python.ops import control_flow_util  # noqa: PLC0415

        return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    except Exception:  # pragma: no cover - private API moved
        return False


def _gate_later_ops(checks):
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


@keras.saving.register_keras_serializable(package="keras_deq")
class DEQ(keras.layers.Layer):
    """A deep equilibrium layer: returns the fixed point `z* = cell(z*, x)`.

    The cell is any Keras layer called as `cell(z, x)` that returns the next
    state `z`, with the same shape as `z`. The layer input `x` is the injection,
    passed unchanged to every call of the cell. The state has the shape of `x`
    unless `state_shape` says otherwise; it starts at zeros.

    The forward pass runs `solver` without recording gradients. The backward pass
    is chosen by `backward` (see `keras_deq.backward`): by default the implicit
    function theorem, solving the adjoint fixed point `u = J^T u + g` with
    `backward_solver`, so training memory does not grow with the solver steps.

    While training or evaluating, the layer reports metrics named after itself
    (shown in the progress bar and in `History`):

    - `{name}_fwd_steps`: forward iterations run (= cell evaluations) per
      batch, averaged over the batches of the epoch.
    - `{name}_fwd_residual`: residual (per `stop_mode`) of the returned state,
      mean over the samples with a finite residual; NaN when no sample had one.
    - `{name}_converged`: fraction of samples whose residual met `tol`.
    - `{name}_bwd_steps`, `{name}_bwd_residual`: the same for the adjoint solve
      (implicit backward only; 0 in evaluation, which has no backward pass).
    - `{name}_jac_loss`: the unweighted Jacobian estimate when it is applied.

    Under a mixed-precision policy (`mixed_float16`, `mixed_bfloat16`) the cell
    runs in the compute dtype while the solvers iterate, mix and measure
    residuals in float32; the statistics are float32 too. Relative residuals
    far below the compute dtype's precision may be out of reach (`tol=1e-3` is
    a safe choice in bfloat16).

    If some sample does not converge, a warning is issued once per layer
    (`on_failure="warn"`), or an error is raised (`"raise"`): a
    `FloatingPointError` when called eagerly, a `tf.errors.InvalidArgumentError`
    naming the layer inside a compiled function such as `fit`'s step, raised
    before that step updates any weight. Under XLA (`jit_compile=True`) neither
    can be issued: watch `{name}_converged` instead.

    A sample for which the cell produces NaN or Inf is frozen at its best finite
    iterate (the initial state if it never had one) and reported; a sample with
    no finite iterate is left out of the gradient (its contribution is exactly
    zero), so NaN never reaches the weights through this layer.

    Args:
        cell: A `keras.layers.Layer` called as `cell(z, x)` returning the next `z`.
        solver: Forward solver: a name (`"anderson"`, `"broyden"`,
            `"fixed_point"`), with `max_iter`, `tol`, `stop_mode` and
            `solver_options` as its settings; or a `keras_deq.solvers.Solver`
            object (or its config dict), which carries its own settings (then
            `max_iter`, `tol` and `stop_mode` are read from it and
            `solver_options` must be empty).
        max_iter: Maximum forward iterations.
        tol: Forward tolerance on the per-sample residual.
        stop_mode: `"rel"` (`||f(z)-z|| / ||f(z)||`) or `"abs"` (`||f(z)-z||`).
        solver_options: Extra options of the forward solver (e.g.
            `{"window": 5}` for Anderson). Unknown keys are refused.
        backward: `"implicit"`, `"phantom"`, `"one_step"` or `"unrolled"`.
        backward_solver: Solver for the adjoint fixed point (a name or a solver
            object); defaults to `solver` with `backward_max_iter` and
            `backward_tol`.
        backward_max_iter: Maximum adjoint iterations; defaults to `max_iter`.
        backward_tol: Adjoint tolerance; defaults to `tol`.
        backward_solver_options: Extra options of the adjoint solver; default to
            `solver_options` when the adjoint uses the same solver.
        phantom_steps: Damped steps of the `"phantom"` backward.
        phantom_damping: Damping in (0, 1] of the `"phantom"` backward.
        jacobian_weight: Weight of the Jacobian regularizer
            `||df/dz at z*||_F^2 / d` (Hutchinson estimate) added with `add_loss`
            in training. 0 leaves it out of the training graph (it needs
            second-order gradients of the cell). Changeable during training with
            `keras_deq.callbacks.JacobianRegularizationScheduler`.
        jacobian_frequency: Probability in (0, 1] that a training step computes
            and adds the regularizer.
        jacobian_probes: Number of Hutchinson probe vectors.
        jacobian_max_iter_delta: On the training steps that apply the
            regularizer, the forward budget is `max_iter + delta` with `delta`
            drawn uniformly from `[-d, d - 1]` (at least 1 iteration), as in the
            DEQ recipes (`RAND_F_THRES_DELTA`, 2 there). 0 (default) keeps
            `max_iter`. Drawn at run time: no retracing.
        state_shape: Shape of the state without the batch dimension (a tuple, or
            a list of tuples for a multi-tensor state). Defaults to the input's.
        solver_batch_dims: Leading axes of the state that the solvers treat as
            independent samples (mixing weights, residual, tolerance, returned
            iterate). 1 (default): each sample is one vector. 2 with a
            `(batch, T, d)` sequence state: each position is solved separately,
            which keeps a causal cell exactly causal with Anderson or Broyden.
            Statistics are then per position. Single-tensor states only.
        on_failure: `"warn"`, `"raise"` or `"ignore"` when a sample does not
            converge.
        seed: Seed for the regularizer's probes and its per-step draw.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Example:

    ```python
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(128),
        keras_deq.DEQ(keras_deq.layers.DenseCell(128), solver="anderson"),
        keras.layers.Dense(10),
    ])
    ```
    """

    def __init__(
        self,
        cell,
        solver="anderson",
        max_iter=30,
        tol=1e-4,
        stop_mode="rel",
        solver_options=None,
        backward="implicit",
        backward_solver=None,
        backward_max_iter=None,
        backward_tol=None,
        backward_solver_options=None,
        phantom_steps=5,
        phantom_damping=0.5,
        jacobian_weight=0.0,
        jacobian_frequency=1.0,
        jacobian_probes=1,
        jacobian_max_iter_delta=0,
        state_shape=None,
        on_failure="warn",
        seed=None,
        solver_batch_dims=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(cell, keras.layers.Layer):
            raise ValueError(
                "`cell` must be a keras.layers.Layer called as `cell(z, x)`. "
                f"Received: cell={cell!r}"
            )
        self.cell = cell
        if _is_solver_object(solver):
            # A solver object (or its config) carries its own settings.
            self._forward = self._solver_object("solver", solver, solver_options)
            self.solver, self.solver_options = self._forward, {}
        else:
            self.solver = self._check_solver_name("solver", solver)
            self.solver_options = registry.check_options(solver, solver_options, "solver_options")
            self._forward = solvers_lib.get(
                solver, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **self.solver_options
            )
        # Checked by the solver's constructor; read back from it.
        self.max_iter = common.check_positive_int("max_iter", self._forward.max_iter)
        self.tol, self.stop_mode = self._forward.tol, self._forward.stop_mode
        max_iter, tol = self.max_iter, self.tol
        self.backward = backward_lib.check_mode(backward)
        self.backward_max_iter = common.check_positive_int(
            "backward_max_iter",
            max_iter if backward_max_iter is None else backward_max_iter,
        )
        self.backward_tol = common.check_positive_float(
            "backward_tol", tol if backward_tol is None else backward_tol
        )
        adjoint = {"max_iter": self.backward_max_iter, "tol": self.backward_tol}
        if backward_solver is None and _is_solver_object(solver):
            self.backward_solver = None
            self.backward_solver_options = {}
            self._backward = solvers_lib.get(self._forward, **adjoint)
        elif _is_solver_object(backward_solver):
            self._backward = self._solver_object(
                "backward_solver", backward_solver, backward_solver_options
            )
            self.backward_solver = self._backward
            self.backward_solver_options = {}
        else:
            self.backward_solver = self._check_solver_name(
                "backward_solver", solver if backward_solver is None else backward_solver
            )
            if backward_solver_options is None and self.backward_solver == self.solver:
                backward_solver_options = self.solver_options
            self.backward_solver_options = registry.check_options(
                self.backward_solver, backward_solver_options, "backward_solver_options"
            )
            self._backward = solvers_lib.get(
                self.backward_solver,
                stop_mode=self.stop_mode,
                **adjoint,
                **self.backward_solver_options,
            )
        self.phantom_steps = common.check_positive_int("phantom_steps", phantom_steps)
        self.phantom_damping = common.check_fraction("phantom_damping", phantom_damping)
        self._jacobian_weight_init = common.check_nonnegative_float(
            "jacobian_weight", jacobian_weight
        )
        # The regularizer is part of the training graph only when enabled: it needs
        # second-order gradients of the cell, which some ops do not have.
        self._jacobian_enabled = self._jacobian_weight_init > 0
        self._jacobian_frequency_init = common.check_fraction(
            "jacobian_frequency", jacobian_frequency
        )
        self.jacobian_probes = common.check_positive_int("jacobian_probes", jacobian_probes)
        self.jacobian_max_iter_delta = common.check_nonnegative_int(
            "jacobian_max_iter_delta", jacobian_max_iter_delta
        )
        self.state_shape = self._check_state_shape(state_shape)
        self.solver_batch_dims = common.check_positive_int("solver_batch_dims", solver_batch_dims)
        if on_failure not in ON_FAILURE:
            raise ValueError(
                f"`on_failure` must be one of {ON_FAILURE}. Received: on_failure={on_failure!r}"
            )
        self.on_failure = on_failure
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ValueError(f"`seed` must be an integer or None. Received: seed={seed!r}")
        self.seed = None if seed is None else int(seed)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self._warned = False
        self._explicit_depth = None
        self._metrics_by_name = {
            key: (_FiniteMean if key == "fwd_residual" else keras.metrics.Mean)(
                name=f"{self.name}_{key}", dtype="float32"
            )
            for key in (
                "fwd_steps",
                "fwd_residual",
                "converged",
                "bwd_steps",
                "bwd_residual",
                "jac_loss",
            )
        }
        for key, metric in self._metrics_by_name.items():
            setattr(self, f"_{key}_metric", metric)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _solver_object(argument, solver, options):
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

    @staticmethod
    def _check_solver_name(argument, solver):
        if solver not in registry.names():
            raise ValueError(
                f"Unknown solver. Expected one of {registry.names()}. Received: {argument}={solver!r}"
            )
        return solver

    @staticmethod
    def _check_state_shape(state_shape):
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

    # ------------------------------------------------------------------ build
    @staticmethod
    def _is_multi(input_shape):
        """Whether the input is several tensors (a list, tuple or dict of them)."""
        if isinstance(input_shape, dict):
            return True
        return (
            isinstance(input_shape, (list, tuple))
            and bool(input_shape)
            and isinstance(input_shape[0], (list, tuple))
        )

    @staticmethod
    def _first_shape(input_shape):
        if isinstance(input_shape, dict):
            return next(iter(input_shape.values()))
        return input_shape[0]

    def _state_shapes(self, input_shape):
        """Sample shape(s) of the state: a tuple, or a list of tuples."""
        if self.state_shape is not None:
            return self.state_shape
        if self._is_multi(input_shape):
            raise ValueError(
                "The input is a list or dict of tensors, so the state shape cannot be "
                f"inferred: pass `state_shape=`. Received: input_shape={input_shape}"
            )
        return tuple(input_shape[1:])

    def _batched(self, batch, shapes):
        if isinstance(shapes, list):
            return [(batch, *s) for s in shapes]
        return (batch, *shapes)

    def _spec(self, shapes):
        if isinstance(shapes, dict):
            return {
                k: keras.KerasTensor(tuple(s), dtype=self.compute_dtype) for k, s in shapes.items()
            }
        if isinstance(shapes, list):
            return [keras.KerasTensor(tuple(s), dtype=self.compute_dtype) for s in shapes]
        return keras.KerasTensor(tuple(shapes), dtype=self.compute_dtype)

    def build(self, input_shape):
        multi = self._is_multi(input_shape)
        # Shapes read back from a config are lists: a list means several tensors here.
        if isinstance(input_shape, dict):
            input_shape = {k: tuple(s) for k, s in input_shape.items()}
        else:
            input_shape = [tuple(s) for s in input_shape] if multi else tuple(input_shape)
        batch = self._first_shape(input_shape)[0] if multi else input_shape[0]
        z_spec = self._spec(self._batched(batch, self._state_shapes(input_shape)))
        x_spec = self._spec(input_shape)
        self._check_solver_batch_dims(z_spec)
        if not multi and input_shape[-1] is not None:
            # A later call with another feature size fails here, naming the layer,
            # rather than deep inside the cell.
            self.input_spec = keras.layers.InputSpec(
                ndim=len(input_shape), axes={-1: input_shape[-1]}
            )
        out = self.cell(z_spec, x_spec)
        self._check_cell_output(out, z_spec)
        self._jacobian_weight = self.add_weight(
            name="jacobian_weight",
            shape=(),
            initializer=keras.initializers.Constant(self._jacobian_weight_init),
            trainable=False,
            dtype="float32",
            autocast=False,
        )
        self._jacobian_frequency = self.add_weight(
            name="jacobian_frequency",
            shape=(),
            initializer=keras.initializers.Constant(self._jacobian_frequency_init),
            trainable=False,
            dtype="float32",
            autocast=False,
        )

    def _check_solver_batch_dims(self, z_spec):
        if self.solver_batch_dims == 1:
            return
        if isinstance(z_spec, list) or self.solver_batch_dims >= len(z_spec.shape):
            raise ValueError(
                "`solver_batch_dims` > 1 needs a single-tensor state with more axes than "
                f"`solver_batch_dims`. Received: solver_batch_dims={self.solver_batch_dims}, "
                f"state shape={[t.shape for t in tf.nest.flatten(z_spec)]}"
            )

    def _check_cell_output(self, out, z_spec):
        want = [tuple(t.shape[1:]) for t in tf.nest.flatten(z_spec)]
        try:
            got = [tuple(t.shape[1:]) for t in tf.nest.flatten(out)]
        except AttributeError:
            got = None
        if got != want:
            got_desc = got if got is not None else type(out).__name__
            raise ValueError(
                "The cell's output must have the shape of the state. "
                f"Received: cell output shape={got_desc} (without batch), state shape={want}. "
                "Pass `state_shape=` if the state differs from the input's shape."
            )

    def compute_output_shape(self, input_shape):
        multi = self._is_multi(input_shape)
        batch = self._first_shape(input_shape)[0] if multi else input_shape[0]
        return self._batched(batch, self._state_shapes(input_shape))

    # ------------------------------------------------------- jacobian controls
    @property
    def jacobian_weight(self):
        """The regularizer's weight (a float32 variable once built)."""
        return self._jacobian_weight if self.built else self._jacobian_weight_init

    @jacobian_weight.setter
    def jacobian_weight(self, value):
        value = common.check_nonnegative_float("jacobian_weight", value)
        if value > 0 and not self._jacobian_enabled:
            self._jacobian_enabled = True
            if self.built:
                warnings.warn(
                    f"DEQ layer '{self.name}' was created with jacobian_weight=0, so a "
                    "training function traced before now has no Jacobian regularizer. It "
                    "is included once the function is traced again: call "
                    "`model.make_train_function(force=True)` or `model.compile(...)`. "
                    "`keras_deq.callbacks.JacobianRegularizationScheduler` does this for you.",
                    stacklevel=2,
                )
        if self.built:
            self._jacobian_weight.assign(value)
        self._jacobian_weight_init = value

    @property
    def jacobian_frequency(self):
        """Probability that a training step applies the regularizer."""
        return self._jacobian_frequency if self.built else self._jacobian_frequency_init

    @jacobian_frequency.setter
    def jacobian_frequency(self, value):
        value = common.check_fraction("jacobian_frequency", value)
        if self.built:
            self._jacobian_frequency.assign(value)
        self._jacobian_frequency_init = value

    @property
    def explicit_depth(self):
        """None (solve for the equilibrium), or the number of explicit cell steps.

        When set to an int `k`, the layer applies the cell `k` times from the
        initial state and is differentiated by autodiff, without a solver: an
        explicit weight-tied network of depth `k` (the "pretrain" phase of the DEQ
        recipes; memory grows with `k`). It is a training phase, not part of the
        config. A traced training function keeps the mode it was traced with:
        `keras_deq.callbacks.ExplicitPretraining` switches it and retraces.
        """
        return self._explicit_depth

    @explicit_depth.setter
    def explicit_depth(self, value):
        if value is not None:
            value = common.check_positive_int("explicit_depth", value)
        self._explicit_depth = value

    # ------------------------------------------------------------------- call
    def _initial_state(self, x):
        flat = tf.nest.flatten(x)
        if self.state_shape is None:
            return tf.zeros(tf.shape(flat[0]), self.compute_dtype)
        batch = tf.shape(flat[0])[:1]
        shapes = self.state_shape if isinstance(self.state_shape, list) else [self.state_shape]
        zeros = [tf.zeros(tf.concat([batch, s], 0), self.compute_dtype) for s in shapes]
        return zeros if isinstance(self.state_shape, list) else zeros[0]

    def _solver(self, solver, max_iter=None):
        """`solver` as a function `(f, z0) -> SolverResult` over the solver batch dims,
        with `max_iter` (an int or a run-time tensor) replacing its own when given."""
        overrides = {} if max_iter is None else {"max_iter": max_iter}
        return common.per_entry(lambda f, z0: solver(f, z0, **overrides), self.solver_batch_dims)

    def call(self, inputs, initial_state=None, training=None):
        """Solves for the equilibrium of the cell with injection `inputs`.

        Args:
            inputs: The injection `x`: a tensor or a list of tensors.
            initial_state: Optional starting state (the structure and shape of the
                state). Defaults to zeros. It receives no gradient.
            training: Passed to the cell.

        Returns:
            The equilibrium state.
        """
        x = inputs
        z0 = self._initial_state(x)
        if initial_state is not None:
            z0 = self._check_initial_state(initial_state, z0)
        cell_dtype = self.cell.compute_dtype
        own_dtype = self.compute_dtype

        def fn(z, x_in):
            # The cell runs in its own dtype, the layer's state in the layer's.
            if cell_dtype != own_dtype:
                z, x_in = _cast_floats(z, cell_dtype), _cast_floats(x_in, cell_dtype)
            out = self.cell(z, x_in, training=training)
            return _cast_floats(out, own_dtype) if cell_dtype != own_dtype else out

        regularize = bool(training) and self._jacobian_enabled
        # The regularizer's per-step draw comes first: on the steps it picks, the
        # forward budget may be jittered (`jacobian_max_iter_delta`).
        draw = (
            keras.random.uniform((), dtype="float32", seed=self.seed_generator)
            if regularize
            else None
        )
        if self._explicit_depth is None:
            max_iter = self._jittered_max_iter(draw) if regularize else self.max_iter
            z, result = self._solve(fn, x, z0, training, max_iter)
        else:
            z, result = backward_lib.explicit(
                fn, x, z0, self._explicit_depth, self.tol, self.stop_mode
            )
        checks = self._record_forward(
            result, report=self._explicit_depth is None, host=not _in_save_context()
        )
        if regularize:
            self._add_jacobian_loss(fn, result, x, draw)
        with tf.control_dependencies(checks):
            return backward_lib.finite_upstream(z)

    def _check_initial_state(self, initial_state, zeros):
        """`initial_state` cast to the layer's dtype, after checking it against the state."""
        try:
            tf.nest.assert_same_structure(initial_state, zeros)
        except (TypeError, ValueError) as error:
            raise ValueError(
                "`initial_state` must have the structure of the state "
                f"({tf.nest.map_structure(lambda t: t.shape, zeros)}). "
                f"Received: initial_state={initial_state!r}"
            ) from error
        out = []
        for given, want in zip(tf.nest.flatten(initial_state), tf.nest.flatten(zeros), strict=True):
            given = tf.convert_to_tensor(given)
            if not given.shape.is_compatible_with(want.shape):
                raise ValueError(
                    f"`initial_state` must have the state's shape {want.shape}. "
                    f"Received: initial_state with shape {given.shape}"
                )
            out.append(tf.stop_gradient(tf.cast(given, self.compute_dtype)))
        return tf.nest.pack_sequence_as(zeros, out)

    def _solve(self, fn, x, z0, training, max_iter):
        return backward_lib.equilibrium(
            fn,
            x,
            z0,
            forward=self._solver(self._forward, max_iter if tf.is_tensor(max_iter) else None),
            mode=self.backward,
            backward=self._solver(self._backward),
            variables=self.cell.trainable_variables,
            phantom_steps=self.phantom_steps,
            phantom_damping=self.phantom_damping,
            # Statistics of the adjoint solve only while training: the gradient
            # function would otherwise capture the metric variables, which
            # `model.export()` cannot save with an inference function.
            on_backward=self._record_backward if training else None,
        )

    # -------------------------------------------------------------- statistics
    def _residual(self, result):
        return result.rel_residual if self.stop_mode == "rel" else result.abs_residual

    def _record_forward(self, result, report=True, host=True):
        """Updates the forward metrics; returns the checks the output must wait for.

        `host=False` (while a SavedModel is being written) leaves out the Python
        warning, which needs a `tf.py_function` that an exported model cannot run.
        """
        m = self._metrics_by_name
        with _float32_metrics():
            m["fwd_steps"].update_state(tf.cast(result.steps, "float32"))
            m["fwd_residual"].update_state(*_finite_values(self._residual(result)))
            m["converged"].update_state(tf.cast(result.converged, "float32"))
        return self._report_failure(result, "forward", host) if report else []

    def _record_backward(self, result):
        m = self._metrics_by_name
        with _float32_metrics():
            m["bwd_steps"].update_state(tf.cast(result.steps, "float32"))
            m["bwd_residual"].update_state(*_finite_values(self._residual(result)))
        checks = self._report_failure(result, "backward")
        if checks:
            _gate_later_ops(checks)
        return checks

    def _failure_message(self, which, n_failed, n_nonfinite, worst):
        tol = self.tol if which == "forward" else self.backward_tol
        kind = "relative" if self.stop_mode == "rel" else "absolute"
        if n_nonfinite:
            cause = (
                f"the cell produced NaN or Inf for {n_nonfinite} of them (their best finite "
                "iterate, or the initial state if none, is returned; check the input and the "
                "cell)"
            )
        else:
            cause = f"worst {kind} residual {worst:.3g}"
        return (
            f"DEQ layer '{self.name}': the {which} solver did not reach tol={tol} for "
            f"{n_failed} sample(s); {cause}. If the residual was still falling, increase "
            "max_iter or change the solver; if it grows (an expansive cell: the iterate with "
            "the lowest residual is returned), more iterations do not help: regularize the "
            "cell (jacobian_weight) or bound its weights. This warning is shown once per "
            f"layer; the metric '{self.name}_converged' tracks convergence."
        )

    def _on_host_failure(self, which, n_failed, n_nonfinite, worst):
        # Called eagerly or from tf.py_function: both pass eager tensors.
        message = self._failure_message(
            which, int(n_failed.numpy()), int(n_nonfinite.numpy()), float(worst.numpy())
        )
        if self.on_failure == "raise":
            raise FloatingPointError(message)
        if not self._warned:
            self._warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return 0

    def _failure_counts(self, result):
        failed = ~result.converged
        nonfinite = failed if result.nonfinite is None else failed & result.nonfinite
        residual = self._residual(result)
        finite = tf.math.is_finite(residual)
        worst = tf.reduce_max(tf.where(failed & finite, residual, tf.zeros_like(residual)))
        return (
            tf.reduce_sum(tf.cast(failed, tf.int32)),
            tf.reduce_sum(tf.cast(nonfinite | (failed & ~finite), tf.int32)),
            worst,
        )

    def _report_failure(self, result, which, host=True):
        """Warns or raises when samples did not converge.

        Returns:
            A list of ops that the layer's output (or the gradient) must depend on:
            with `on_failure="raise"` in a graph, the assertion that stops the step
            before any update.
        """
        if self.on_failure == "ignore" or _in_xla_context():
            return []
        n_failed, n_nonfinite, worst = self._failure_counts(result)
        if tf.executing_eagerly():
            if int(n_failed) > 0:
                self._on_host_failure(which, n_failed, n_nonfinite, worst)
            return []
        if self.on_failure == "raise":
            tol = self.tol if which == "forward" else self.backward_tol
            return [
                tf.debugging.Assert(
                    n_failed == 0,
                    [
                        f"DEQ layer {self.name} (on_failure=raise): the {which} solver did "
                        f"not reach tol={tol} for",
                        n_failed,
                        "sample(s); with NaN or Inf:",
                        n_nonfinite,
                        "; worst finite residual:",
                        worst,
                    ],
                    name="deq_on_failure_raise",
                )
            ]
        if self._warned or not host:
            return []

        def report():
            return tf.py_function(
                lambda a, b, c: self._on_host_failure(which, a, b, c),
                [n_failed, n_nonfinite, worst],
                tf.int32,
            )

        tf.cond(n_failed > 0, report, lambda: tf.constant(0))
        return []

    # ---------------------------------------------------------------- jacobian
    def _picked(self, draw):
        """Whether this training step is one the regularizer picks."""
        return (draw < self._jacobian_frequency) & (self._jacobian_weight > 0)

    def _jittered_max_iter(self, draw):
        """`max_iter + delta` on picked steps, `delta` uniform in `[-d, d - 1]` with
        `d = jacobian_max_iter_delta` (the DEQ recipes' random forward budget), at
        least 1; `max_iter` on the other steps. A tensor: no retracing."""
        d = self.jacobian_max_iter_delta
        if d == 0:
            return self.max_iter
        delta = keras.random.randint((), -d, d, seed=self.seed_generator, dtype="int32")
        jittered = tf.maximum(self.max_iter + delta, 1)
        return tf.where(self._picked(draw), jittered, tf.constant(self.max_iter, tf.int32))

    def _add_jacobian_loss(self, fn, result, x, draw):
        weight = self._jacobian_weight
        z_star = tf.nest.map_structure(tf.stop_gradient, result.state)
        # Skipped on a step where some sample has no finite iterate (its Jacobian is NaN).
        solved = tf.reduce_all(backward_lib.solved_rows(result, x))
        apply = self._picked(draw) & solved

        def estimate():
            est = jacobian.hutchinson_frobenius(
                lambda z: fn(z, x),
                z_star,
                num_probes=self.jacobian_probes,
                seed=self.seed_generator,
            )
            return tf.cast(est, "float32")

        est = tf.cond(apply, estimate, lambda: tf.constant(0.0, "float32"))
        with _float32_metrics():
            self._metrics_by_name["jac_loss"].update_state(
                est, sample_weight=tf.cast(apply, "float32")
            )
        self.add_loss(weight * est)

    # ----------------------------------------------------------------- saving
    def save_own_variables(self, store):
        """Saves the layer's variables and the state of its random generator, so
        that a restored run (e.g. `keras.callbacks.BackupAndRestore`) draws the
        same Jacobian-regularizer steps and probes as an uninterrupted one."""
        super().save_own_variables(store)
        store[_SEED_STATE_KEY] = self.seed_generator.state

    def load_own_variables(self, store):
        variables = self._trainable_variables + self._non_trainable_variables
        keys = [str(i) for i in range(len(variables))]
        missing = [k for k in keys if k not in store.keys()]
        if missing:
            raise ValueError(
                f"Layer '{self.name}' expected {len(variables)} variables in the saved "
                f"state, but found keys {list(store.keys())}."
            )
        for key, variable in zip(keys, variables, strict=True):
            variable.assign(store[key])
        if _SEED_STATE_KEY in store.keys():  # absent in files saved before 0.2
            self.seed_generator.state.assign(store[_SEED_STATE_KEY])

    # ------------------------------------------------------------------ config
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "cell": _serialize_shareable(self.cell),
                "solver": _solver_config(self.solver),
                "max_iter": self.max_iter,
                "tol": self.tol,
                "stop_mode": self.stop_mode,
                "solver_options": dict(self.solver_options),
                "backward": self.backward,
                "backward_solver": _solver_config(self.backward_solver),
                "backward_max_iter": self.backward_max_iter,
                "backward_tol": self.backward_tol,
                "backward_solver_options": dict(self.backward_solver_options),
                "phantom_steps": self.phantom_steps,
                "phantom_damping": self.phantom_damping,
                "jacobian_weight": float(self._jacobian_weight_init),
                "jacobian_frequency": float(self._jacobian_frequency_init),
                "jacobian_probes": self.jacobian_probes,
                "jacobian_max_iter_delta": self.jacobian_max_iter_delta,
                "state_shape": self.state_shape,
                "on_failure": self.on_failure,
                "seed": self.seed,
                "solver_batch_dims": self.solver_batch_dims,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["cell"] = keras.saving.deserialize_keras_object(config["cell"])
        return cls(**config)
