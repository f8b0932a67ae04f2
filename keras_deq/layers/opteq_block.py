"""`OptEqBlock`: the deep OptEq layer, the equilibrium `z* = T(z*, x)` started at `z0 = x`.

Training follows Xie et al., TPAMI 2023, Algorithm 1, every mode through one
`keras_deq.DEQ`: `K` unrolled iterations (plain, or SAM's: `keras_deq.solvers.SAM`)
differentiated by autodiff, or an implicit solve. The map `T` is an `OptEqCell`;
priors come from `opteq_priors`.
"""

import keras
from keras import ops

from keras_deq.configurable import config_value
from keras_deq.layers._opteq_checks import check_choice
from keras_deq.layers.cell import Cell
from keras_deq.layers.deq import DEQ
from keras_deq.layers.opteq_cell import OptEqCell
from keras_deq.layers.opteq_priors import PRIORS, FeaturePrior
from keras_deq.layers.opteq_sam import check_sam_schedule
from keras_deq.solvers import SAM, FixedPoint
from keras_deq.solvers.common import check_mapping, check_positive_int

PRIOR_MODES = ("structural", "sam")
TRAINING_MODES = ("unrolled", "implicit")


class _InjectedCell(Cell):
    """`(z, [x, U_1 x + b_1, ...]) -> T(z)`: an `OptEqCell` with its injections hoisted.

    `OptEqBlock` passes its input and the injections, computed once, as the DEQ's
    input, so that the solver's iterations do not recompute `U_l x`; the gradient
    reaches `U_l` and `b_l` through that input. The state has the input's shape
    and starts at `z0 = x` (Algorithm 1); the SAM solver gets `grad R` from
    `prior_gradient`.
    """

    def __init__(self, cell, prior=None, **kwargs):
        super().__init__(**kwargs)
        self.cell, self.prior = cell, prior

    def build(self, z_shape, x_shape):
        pass

    def state_shape(self, input_shape):
        return tuple(input_shape[0][1:])

    def initial_state(self, x, state_shape):
        return x[0]

    def call(self, z, x):
        return self.cell.transition(z, list(x[1:]))

    def prior_gradient(self, z):
        """`grad R(z)` of the SAM prior (zeros without one)."""
        return ops.zeros_like(z) if self.prior is None else self.prior.gradient(z)


@keras.saving.register_keras_serializable(package="keras_deq")
class OptEqBlock(keras.layers.Layer):
    """A deep OptEq layer: the equilibrium of `OptEqCell`, started at `z0 = x`.

    Returns `z*` with `z* = T(z*, x)` (the input and the state share a shape,
    as in the paper, where `x` is the feature extractor's output). Every mode
    runs one `keras_deq.DEQ` (`layer.deq`) of the cell from `z0 = x`; training
    follows Algorithm 1, chosen by `training_mode`:

    - `"unrolled"` (the paper's default): exactly `unroll_steps` (`K`)
      iterations, returning `z_K`, differentiated by autodiff
      (`keras_deq.solvers.FixedPoint(max_iter=K, fixed_steps=True)` with
      `keras_deq.backward.Unrolled()`); inference runs the same `K` steps.
      With `prior_mode="sam"` the iterations are SAM's (Eq. 11,
      `keras_deq.solvers.SAM`).
    - `"implicit"`: solves `z = T(z, x)` with `solver` up to `tol` and
      differentiates by the implicit function theorem.

    In every mode the DEQ reports its metrics under the block's name plus
    `_deq` (`{name}_deq_fwd_steps`, `{name}_deq_fwd_residual`,
    `{name}_deq_converged`; `layer.deq.solver_statistics()` on JAX) and applies
    its `on_failure` (`deq_options`). In the unrolled modes a sample has
    converged when the residual of its step `K` (`z_{K-1}` against `T`) is
    within `tol`, so `on_failure="warn"` (the default) warns once when `K`
    steps do not reach `tol`; pass `deq_options={"on_failure": "ignore"}` to
    silence it.

    Priors (`prior` one of `PRIORS`):

    - `prior_mode="structural"` (`R*`): the map becomes `T(T_R(z), x)`, in
      both training modes. For one unit with `alpha = 1` its equilibrium
      minimizes `phi + gamma R` for a gradient-step prior and
      `phi + M_{gamma R}` (the Moreau envelope of `gamma R`) for the prox priors
      `"l2"` and `"l1"`; see `FeaturePrior` for the general statement.
    - `prior_mode="sam"` (`R-dagger`): SAM iterations with `beta_k = sam_rho /
      k^sam_c` and step `gamma = prior_strength`; unrolled training only.

    Args:
        units: Widths `n_l` of the units (one unit each).
        kind: `"dense"` (input `(batch, m)`) or `"conv"` (`(batch, H, W, m)`).
        kernel_size: Kernel size of conv units.
        alpha: Relaxation in (0, 1] (0.8 in most of the paper's runs).
        learnable_alpha: Learn one `alpha_l` per unit in (0, 1), started at `alpha`.
        activation: Monotone 1-Lipschitz activation.
        max_norm: Cap on each `||W_l||_2` (1 in the paper); None for no cap.
        prior: None or one of `PRIORS`.
        prior_mode: `"structural"` or `"sam"`.
        prior_strength: `gamma` of the prior.
        prior_epsilon: `eps` of the incay prior.
        prior_sigma: RBF bandwidth `sigma` of the HSIC prior (`hsic`).
        sam_rho: `rho` of SAM's schedule (`rho, c > 0`, `rho + 2c < 1`).
        sam_c: `c` of SAM's schedule.
        training_mode: `"unrolled"` or `"implicit"`.
        unroll_steps: `K >= 1` (20 in the paper on CIFAR-10).
        solver: Forward solver of the implicit mode (Broyden in the paper).
        max_iter: Its maximum iterations.
        tol: Its relative-residual threshold (1e-3 or 1e-2 in Table 8); in the
            unrolled modes, the threshold of the `converged` statistic.
        deq_options: Other `keras_deq.DEQ` arguments, in every mode (e.g.
            `{"on_failure": "ignore"}`, `{"jacobian_weight": 0.1}`, or
            `{"backward_tol": 1e-4}` for the implicit mode).
        kernel_initializer: Initializer of the `W_l` (None: small defaults).
        injection_initializer: Initializer of the `U_l`.
        **kwargs: Base layer arguments (`name`, `dtype`, `activity_regularizer`, ...).

    Example:

    ```python
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(32),                      # the extractor x = g(x0)
        OptEqBlock([32, 64, 64], alpha=0.8, prior="l2", prior_strength=0.05),
        keras.layers.Dense(10),                      # y = W_{L+1} z*
    ])
    ```
    """

    def __init__(
        self,
        units,
        kind="dense",
        kernel_size=3,
        alpha=0.8,
        learnable_alpha=False,
        activation="relu",
        max_norm=1.0,
        prior=None,
        prior_mode="structural",
        prior_strength=0.1,
        prior_epsilon=1.0,
        prior_sigma=1.0,
        sam_rho=0.5,
        sam_c=0.2,
        training_mode="unrolled",
        unroll_steps=20,
        solver="broyden",
        max_iter=50,
        tol=1e-3,
        deq_options=None,
        kernel_initializer=None,
        injection_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.prior_mode = check_choice("prior_mode", prior_mode, PRIOR_MODES)
        self.training_mode = check_choice("training_mode", training_mode, TRAINING_MODES)
        self.unroll_steps = check_positive_int("unroll_steps", unroll_steps)
        if prior is not None:
            check_choice("prior", prior, PRIORS)
        self.sam_rho, self.sam_c = sam_rho, sam_c
        if prior is not None and prior_mode == "sam":
            self.sam_rho, self.sam_c = check_sam_schedule(sam_rho, sam_c)
            if training_mode != "unrolled":
                raise ValueError(
                    "The SAM prior is an unrolled iteration: it needs "
                    "training_mode='unrolled'. Received: prior_mode='sam', "
                    f"training_mode={training_mode!r}"
                )
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.deq_options = check_mapping("deq_options", deq_options)
        self.cell = OptEqCell(
            units,
            kind=kind,
            kernel_size=kernel_size,
            alpha=alpha,
            learnable_alpha=learnable_alpha,
            activation=activation,
            max_norm=max_norm,
            prior=prior if prior_mode == "structural" else None,
            prior_strength=prior_strength,
            prior_epsilon=prior_epsilon,
            prior_sigma=prior_sigma,
            kernel_initializer=kernel_initializer,
            injection_initializer=injection_initializer,
            dtype=self.dtype_policy,
            name="cell",
        )
        self.prior_name = prior
        self.sam_prior = (
            FeaturePrior(prior, prior_strength, prior_epsilon, self.cell.prior_sigma)
            if prior is not None and prior_mode == "sam"
            else None
        )
        # Built here (not in `build`) so that bad solver arguments fail at construction.
        self.deq = DEQ(
            _InjectedCell(self.cell, self.sam_prior, dtype=self.dtype_policy, name="injected_cell"),
            **self._solve_settings(solver, max_iter, tol),
            dtype=self.dtype_policy,
            name=f"{self.name}_deq",
        )

    def _solve_settings(self, solver, max_iter, tol):
        """The DEQ's solver and backward arguments for the training mode (Algorithm 1),
        with `deq_options`."""
        options = dict(self.deq_options)
        if self.training_mode == "implicit":
            ours = {"solver": solver, "max_iter": max_iter, "tol": tol, "backward": "implicit"}
        else:
            # K steps exactly, z_K returned, autodiff through them. A solver object
            # carries its stop mode (the statistics' residual): it comes from the options.
            settings = {"max_iter": self.unroll_steps, "tol": tol}
            settings["stop_mode"] = options.pop("stop_mode", "rel")
            if self.sam_prior is None:
                forward = FixedPoint(**settings, fixed_steps=True)
            else:
                gamma = self.sam_prior.strength
                forward = SAM(**settings, rho=self.sam_rho, c=self.sam_c, gamma=gamma)
            ours = {"solver": forward, "backward": "unrolled"}
        clash = sorted(set(options) & {*ours, "max_iter", "tol"})
        if clash:
            raise ValueError(
                f"`deq_options` may not set {clash}: the block sets them from its own "
                f"arguments (`solver`, `max_iter`, `tol`, `unroll_steps`, `training_mode`). "
                f"Received: deq_options={self.deq_options!r}"
            )
        return {**ours, **options}

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self.cell.build(input_shape, input_shape)
        injection_shapes = [input_shape[:-1] + (n,) for n in self.cell.units]
        self.deq.build([input_shape, *injection_shapes])

    def map(self, x):
        """The map `z -> T(z, x)` for a fixed input `x` (injections computed once)."""
        injections = self.cell.injections(x)
        return lambda z: self.cell.transition(z, injections)

    def call(self, inputs, training=None):
        return self.deq([inputs, *self.cell.injections(inputs)], training=training)

    def relative_residual(self, x, z=None):
        """Per-sample `||z - T(z, x)|| / ||z||` at the layer's output (Table 8).

        Args:
            x: The input.
            z: The state to measure; defaults to `self(x)`.

        Returns:
            A `(batch,)` tensor.
        """
        x = ops.convert_to_tensor(x, self.compute_dtype)
        z = self(x) if z is None else z
        diff = z - self.map(x)(z)
        axes = tuple(range(1, len(z.shape)))
        return ops.norm(ops.reshape(diff, (ops.shape(z)[0], -1)), axis=1) / (
            ops.sqrt(ops.sum(ops.square(z), axis=axes)) + 1e-12
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        cell = self.cell
        config = super().get_config()
        config.update(
            {
                "units": list(cell.units),
                "kind": cell.kind,
                "kernel_size": cell.kernel_size,
                "alpha": cell.alpha,
                "learnable_alpha": cell.learnable_alpha,
                "activation": keras.activations.serialize(cell.activation),
                "max_norm": cell.max_norm,
                "prior": self.prior_name,
                "prior_mode": self.prior_mode,
                "prior_strength": cell.prior_strength,
                "prior_epsilon": cell.prior_epsilon,
                "prior_sigma": cell.prior_sigma,
                "sam_rho": self.sam_rho,
                "sam_c": self.sam_c,
                "training_mode": self.training_mode,
                "unroll_steps": self.unroll_steps,
                "solver": config_value(self.solver),
                "max_iter": config_value(self.max_iter),
                "tol": self.tol,
                "deq_options": dict(self.deq_options),
                "kernel_initializer": None
                if cell.kernel_initializer is None
                else keras.initializers.serialize(cell.kernel_initializer),
                "injection_initializer": keras.initializers.serialize(cell.injection_initializer),
            }
        )
        return config
