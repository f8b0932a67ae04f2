"""The `DEQ` layer: the fixed point of any Keras cell `f(z, x)` as a layer."""

import functools
import inspect

import keras

from keras_deq import backend
from keras_deq import backward as backward_lib
from keras_deq import solvers as solvers_lib
from keras_deq.configurable import config_value
from keras_deq.jacobian_penalty import JacobianPenalty
from keras_deq.layers import deq_arguments as arguments
from keras_deq.layers import deq_state as state
from keras_deq.layers.cell_state import FrozenCellState
from keras_deq.layers.deq_penalty import PenaltyControls
from keras_deq.layers.deq_start import StartControls, cast_floats
from keras_deq.layers.deq_trace import SolverTraceMixin
from keras_deq.layers.monitor import SolverMonitor, check_on_failure
from keras_deq.solvers import budget as budget_lib
from keras_deq.solvers import common

_SEED_STATE_KEY = "seed_generator_state"


@keras.saving.register_keras_serializable(package="keras_deq")
class DEQ(SolverMonitor, PenaltyControls, StartControls, SolverTraceMixin, keras.layers.Layer):
    """A deep equilibrium layer: returns the fixed point `z* = cell(z*, x)`.

    The cell is any Keras layer called as `cell(z, x)` that returns the next
    state `z`, with the same shape as `z`. The layer input `x` is the injection,
    passed unchanged to every call of the cell. The state has the shape of `x`
    unless `state_shape` (or the cell, see `keras_deq.layers.Cell`) says
    otherwise; it starts at zeros unless the cell says otherwise. Every evaluation
    of the cell in one call sees the cell's non-trainable state (a `Dropout` seed,
    batch statistics) as the call found it: one dropout mask per solve, as in Keras'
    recurrent layers; a training call then advances that state once.

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
            `solver_options` must be empty). A solver for affine maps only
            (`"gmres"`) is refused here: it is an adjoint solver.
        max_iter: Maximum forward iterations: an int, or a
            `keras_deq.solvers.Budget` (or its config dict) for a budget at
            evaluation other than in training, or drawn at random in training.
            It replaces the `max_iter` of a solver object.
        tol: Forward tolerance on the per-sample residual.
        stop_mode: `"rel"` (`||f(z)-z|| / ||f(z)||`) or `"abs"` (`||f(z)-z||`).
        solver_options: Extra options of the forward solver (e.g.
            `{"window": 5}` for Anderson). Unknown keys are refused.
        backward: How the gradient is computed: a `keras_deq.backward.Backward`
            object (`Implicit(solver)`, `Phantom(steps, damping)`, `OneStep()`,
            `Unrolled()`), its config dict, or its name (`"implicit"`,
            `"phantom"`, `"one_step"`, `"unrolled"`) for its default settings.
        backward_solver: Solver for the adjoint fixed point of the implicit mode (a
            name or a solver object); defaults to `solver` with
            `backward_max_iter` and `backward_tol`. The adjoint is linear, so
            `"gmres"` (Krylov, `keras_deq.solvers.GMRES`) is accepted too.
            `Implicit(solver=...)` may set it instead (not both).
        backward_max_iter: Maximum adjoint iterations; defaults to `max_iter`.
        backward_tol: Adjoint tolerance; defaults to `tol`.
        backward_solver_options: Extra options of the adjoint solver; default to
            `solver_options` when the adjoint uses the same solver.
        jacobian_weight: Weight of the Jacobian regularizer
            `||df/dz at z*||_F^2 / d` (Hutchinson estimate) added with `add_loss`
            in training: the shorthand of `regularizer=JacobianPenalty(weight)`.
            0 (default) leaves it out of the training graph. Changeable during
            training (`layer.jacobian_weight`), e.g. by
            `keras_deq.callbacks.JacobianRegularizationScheduler`.
        jacobian_frequency: Probability in (0, 1] that a training step computes
            and adds the regularizer (`JacobianPenalty(frequency=...)`).
        jacobian_probes: Number of Hutchinson probe vectors
            (`JacobianPenalty(probes=...)`).
        jacobian_max_iter_delta: The recipes' random forward budget on the
            regularized steps (`JacobianPenalty(max_iter_delta=...)`).
        regularizer: A `keras_deq.JacobianPenalty` (or its config dict) carrying
            all of the above; then the `jacobian_*` arguments must be left at
            their defaults.
        state_shape: Shape of the state without the batch dimension (a tuple, or
            a list of tuples for a multi-tensor state). Defaults to the cell's
            `state_shape(input_shape)` if it has that method, else the input's.
        solver_batch_dims: Leading axes of the state that the solvers treat as
            independent samples (mixing weights, residual, tolerance, returned
            iterate). 1 (default): each sample is one vector. 2 with a
            `(batch, T, d)` sequence state: each position is solved separately,
            which keeps a causal cell exactly causal with Anderson or Broyden.
            Statistics are then per position. Single-tensor states only. GMRES
            solves each sample's positions jointly, with a tolerance per position.
        on_failure: `"warn"`, `"raise"` or `"ignore"` when a sample does not
            converge.
        seed: Seed for the regularizer's probes and its per-step draw.
        jit_compile: Whether the solves run as one XLA program each inside a
            TensorFlow graph that is not compiled as a whole (Keras' default on
            CPU), which makes each solver iteration cost about what its cell
            evaluations cost instead of paying per-op dispatch (about 2x faster
            training of small cells; each new batch shape compiles once, a few
            seconds). `"auto"` (default): when every layer of the cell has
            `supports_jit`; for a cell with a Keras convolution layer on a
            machine without GPU or TPU (XLA's CPU convolutions, their gradients
            most, run slower than TensorFlow's), only a forward solve whose
            step is more than a few elementwise ops (Anderson, Broyden);
            `True`: always; `False`: never (the
            solvers' own small linear systems, which hold no layer of the
            cell, are compiled apart either way). A solve that is
            differentiated through (`backward="unrolled"`) is never compiled
            apart. No effect on JAX or under `model.compile(jit_compile=True)`,
            where the whole step is compiled anyway.
        start: None, or a `keras_deq.RandomStart` (random starts in training).
        stateful: If True, start from the last call's fixed point (as `keras.layers.RNN`).
        correction: None, or a `keras_deq.FixedPointCorrection`: the layer then
            returns `[state_1, ..., state_n, z*]`, states sampled along the solve.
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
        jacobian_weight=0.0,
        jacobian_frequency=1.0,
        jacobian_probes=1,
        jacobian_max_iter_delta=0,
        regularizer=None,
        state_shape=None,
        on_failure="warn",
        seed=None,
        solver_batch_dims=1,
        jit_compile="auto",
        start=None,
        stateful=False,
        correction=None,
        **kwargs,
    ):
        # Before 0.2 the phantom mode's settings were layer arguments.
        legacy = {key: kwargs.pop(key) for key in arguments.LEGACY_PHANTOM if key in kwargs}
        super().__init__(**kwargs)
        if not isinstance(cell, keras.layers.Layer):
            raise ValueError(
                "`cell` must be a keras.layers.Layer called as `cell(z, x)`. "
                f"Received: cell={cell!r}"
            )
        self.cell = cell
        self.budget, max_iter = budget_lib.get(max_iter)
        settings = arguments.solver_settings(
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
        )
        self.solver, self.solver_options = settings.solver, settings.solver_options
        self.backward, self._mode = settings.backward, settings.mode
        self.backward_solver = settings.backward_solver
        self.backward_solver_options = settings.backward_solver_options
        self._forward, self._adjoint = settings.forward, settings.adjoint
        if self.budget is not None:  # it replaces a solver object's own
            self._forward = solvers_lib.get(self._forward, max_iter=self.budget.max_iter)
        self.max_iter, self.tol = self._forward.max_iter, self._forward.tol
        self.stop_mode = self._forward.stop_mode
        self.backward_max_iter, self.backward_tol = self._adjoint.max_iter, self._adjoint.tol
        self.regularizer, self._penalty = arguments.penalty(
            regularizer,
            JacobianPenalty(
                common.check_nonnegative_float("jacobian_weight", jacobian_weight),
                common.check_fraction("jacobian_frequency", jacobian_frequency),
                common.check_positive_int("jacobian_probes", jacobian_probes),
                common.check_nonnegative_int("jacobian_max_iter_delta", jacobian_max_iter_delta),
            ),
        )
        self._jacobian_weight_init = self._penalty.weight
        self._jacobian_frequency_init = self._penalty.frequency
        # The penalty is part of the training graph only when enabled: it needs
        # second-order gradients of the cell, which some ops do not have.
        self._jacobian_enabled = self._penalty.weight > 0
        self.state_shape = arguments.check_state_shape(state_shape)
        self.solver_batch_dims = common.check_positive_int("solver_batch_dims", solver_batch_dims)
        self.on_failure = check_on_failure(on_failure)
        self.seed = arguments.check_seed(seed)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.jit_compile = arguments.check_jit_compile(jit_compile)
        self._check_start(start, stateful)
        self.correction = arguments.correction(correction, self.max_iter)
        self._warned = False
        self._explicit_depth = None
        arguments.check_backend_support(self.on_failure)
        self._make_metrics()

    # ------------------------------------------------------------------ build
    def build(self, input_shape):
        dtype = self.compute_dtype
        multi = state.is_multi(input_shape)
        # Shapes read back from a config are lists: a list means several tensors here.
        if isinstance(input_shape, dict):
            input_shape = {k: tuple(s) for k, s in input_shape.items()}
        else:
            input_shape = [tuple(s) for s in input_shape] if multi else tuple(input_shape)
        batch = state.first_shape(input_shape)[0] if multi else input_shape[0]
        z_spec = state.spec(
            state.batched(batch, state.state_shapes(self.state_shape, input_shape, self.cell)),
            dtype,
        )
        x_spec = state.spec(input_shape, dtype)
        state.check_solver_batch_dims(self.solver_batch_dims, z_spec)
        if not multi and input_shape[-1] is not None:
            # A later call with another feature size fails here, naming the layer,
            # rather than deep inside the cell.
            self.input_spec = keras.layers.InputSpec(
                ndim=len(input_shape), axes={-1: input_shape[-1]}
            )
        out = self.cell(z_spec, x_spec)
        state.check_cell_output(out, z_spec)
        self._build_penalty_variables()
        self._build_statistics()
        self._build_warm_state(z_spec)

    def compute_output_shape(self, input_shape):
        multi = state.is_multi(input_shape)
        batch = state.first_shape(input_shape)[0] if multi else input_shape[0]
        shape = state.batched(batch, state.state_shapes(self.state_shape, input_shape, self.cell))
        return shape if self.correction is None else [shape] * (self.correction.states + 1)

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
    def _solver(
        self, solver, max_iter=None, differentiated=False, maps=None, adjoint=False, trace=False
    ):
        """`solver` as a function `(f, z0) -> SolverResult` over the solver batch dims,
        with `max_iter` (an int or a run-time tensor) replacing its own when given and
        `maps` (the cell's maps it asks for, `Solver.extra_maps`) passed to it,
        compiled apart as `jit_compile` says (`arguments.compiles_solves`; `adjoint`:
        the implicit backward's solve) unless it is `differentiated`; `trace`: with
        a `SolverTrace`; with `correction`, the forward solve records the iterates it
        samples."""
        overrides = {} if max_iter is None else {"max_iter": max_iter}
        if trace:
            overrides["trace"] = True
        joint = getattr(solver, "joint_entries", False)  # GMRES: one process per sample
        solve = common.per_entry(
            lambda f, z0, **m: solver(f, z0, **m, **overrides), self.solver_batch_dims, joint
        )
        solve = functools.partial(solve, **(maps or {}))
        if not adjoint and self.correction is not None:
            solve = self.correction.recorded(solve, self.max_iter)
        compiles = arguments.compiles_solves(self.jit_compile, self.cell, solver, adjoint)
        if not differentiated and compiles:
            return backend.compiled_solve(solve)
        return solve

    def call(self, inputs, initial_state=None, training=None):
        """Solves for the equilibrium of the cell with injection `inputs`.

        Args:
            inputs: The injection `x`: a tensor or a list of tensors.
            initial_state: Optional starting state (the structure and shape of the
                state). It receives no gradient. Defaults to the last fixed point
                (`stateful`), else the cell's `initial_state(x, state_shape)` if it
                has that method, else zeros (in training with `start`'s random rows).
            training: Passed to the cell.

        Returns:
            The equilibrium state (with `correction`: `[*sampled states, z*]`).
        """
        x = inputs
        z0, evaluate = self._start(x, initial_state, training)
        frozen = FrozenCellState(self.cell)
        fn = functools.partial(frozen.call, evaluate)

        max_iter = self._budget(training)
        regularize = bool(training) and self._jacobian_enabled
        picked, max_iter = self._plan_penalty(max_iter) if regularize else (None, max_iter)
        explicit = self._explicit_depth is not None
        mode = backward_lib.Explicit(self._explicit_depth) if explicit else self._mode
        if not mode.differentiates_forward:  # a cell's own start is a constant here
            z0 = keras.tree.map_structure(keras.ops.stop_gradient, z0)
        stateless_fn, weights, cell_fn = None, (), fn
        if backend.name() != "tensorflow":
            # JAX: custom gradients must receive the weights, not close over them;
            # PyTorch takes the same path (its own autograd.Function, see backend).
            stateless_fn = self._stateless_cell(training)
            # The state as the call begins, for the backward pass too (a copy: on
            # PyTorch `value` is the variable itself, which `advance` assigns).
            weights = (
                tuple(v.value for v in self.cell.trainable_variables),
                tuple(keras.ops.copy(v.value) for v in self.cell.non_trainable_variables),
            )
            cell_fn = lambda z, x_in: stateless_fn(z, x_in, weights)  # noqa: E731
        problem = backward_lib.Equilibrium(
            fn,
            x,
            z0,
            forward=self._solver(
                self._forward,
                None
                if not keras.ops.is_tensor(max_iter) and max_iter == self.max_iter
                else max_iter,
                differentiated=mode.differentiates_forward,
                maps=state.solver_maps(self.cell, self._forward),
            ),
            adjoint=self._solver(self._adjoint, adjoint=True),
            variables=tuple(self.cell.trainable_variables),
            # Statistics of the adjoint solve only while training: the gradient
            # function would otherwise capture the metric variables, which
            # `model.export()` cannot save with an inference function.
            on_backward=self._record_backward if training else None,
            tol=self.tol,
            stop_mode=self.stop_mode,
            stateless_fn=stateless_fn,
            weights=weights,
            max_steps=self._penalty.max_steps(self.max_iter),
        )
        z, result = mode(problem)
        self._keep_state(z)
        if training:
            frozen.advance(evaluate, keras.tree.map_structure(keras.ops.stop_gradient, z), x)
        checks = self._record_forward(result, report=not explicit)
        if regularize:
            self._add_jacobian_loss(lambda z: cell_fn(z, x), result, x, picked)
        if self.correction is not None:
            z = [*self.correction(fn, x, result, z), z]
        return backend.after(checks, backward_lib.finite_upstream(z))

    def _stateless_cell(self, training):
        """The cell as `(z, x, (trainable, non_trainable)) -> next z`, weights passed in."""
        cell, own_dtype = self.cell, self.compute_dtype
        cast = cell.compute_dtype != own_dtype
        # `stateless_call` passes keyword arguments to `call` as they are.
        extra = (
            {"training": training} if "training" in inspect.signature(cell.call).parameters else {}
        )

        def f(z, x, weights):
            if cast:
                z, x = cast_floats(z, cell.compute_dtype), cast_floats(x, cell.compute_dtype)
            trainable, non_trainable = weights
            out, _ = cell.stateless_call(list(trainable), list(non_trainable), z, x, **extra)
            return cast_floats(out, own_dtype) if cast else out

        return f

    # ----------------------------------------------------------------- saving
    def _saved_variables(self):
        """The layer's own variables that a `.keras` file holds: all but the JAX
        statistics (`solver_statistics()`, a record of the last call, not state), so
        that a file saved on one backend loads on the others."""
        stats = {id(v) for v in getattr(self, "_stats", {}).values()}
        own = self._trainable_variables + self._non_trainable_variables
        return [v for v in own if id(v) not in stats]

    def save_own_variables(self, store):
        """Saves the layer's variables and the state of its random generator, so
        that a restored run (e.g. `keras.callbacks.BackupAndRestore`) draws the
        same Jacobian-regularizer steps and probes as an uninterrupted one."""
        for i, variable in enumerate(self._saved_variables()):
            store[str(i)] = variable
        store[_SEED_STATE_KEY] = self.seed_generator.state

    def load_own_variables(self, store):
        # Files saved on JAX by 0.1.0 hold the statistics too, after the others.
        variables = self._saved_variables()
        keys = [str(i) for i in range(len(variables))]
        if not list(store.keys()):
            # None of them: a file of an `OptEqBlock` saved when its unrolled modes had
            # no DEQ. They are the penalty's controls and statistics, not learned.
            return
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
                "cell": backend.serialize_shareable(self.cell),
                "solver": arguments.object_config(self.solver, solvers_lib.serialize),
                "max_iter": config_value(self.max_iter if self.budget is None else self.budget),
                "tol": self.tol,
                "stop_mode": self.stop_mode,
                "solver_options": dict(self.solver_options),
                "backward": arguments.object_config(self.backward, backward_lib.serialize),
                "backward_solver": arguments.object_config(
                    self.backward_solver, solvers_lib.serialize
                ),
                "backward_max_iter": self.backward_max_iter,
                "backward_tol": self.backward_tol,
                "backward_solver_options": dict(self.backward_solver_options),
                **self._penalty_config(),
                "state_shape": self.state_shape,
                "on_failure": self.on_failure,
                "seed": self.seed,
                "solver_batch_dims": self.solver_batch_dims,
                "jit_compile": self.jit_compile,
                **self._start_config(),
                "correction": keras.saving.serialize_keras_object(self.correction),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["cell"] = keras.saving.deserialize_keras_object(config["cell"])
        # Files saved before 0.2 hold the phantom mode's settings as layer arguments.
        legacy = {k: config.pop(k) for k in arguments.LEGACY_PHANTOM if k in config}
        if legacy and config.get("backward") == "phantom":
            config["backward"] = backward_lib.Phantom(
                **{arguments.LEGACY_PHANTOM[k]: v for k, v in legacy.items()}
            )
        return cls(**config)
