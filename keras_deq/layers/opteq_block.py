"""`OptEqBlock`: the deep OptEq layer, the equilibrium `z* = T(z*, x)` started at `z0 = x`.

Training follows Xie et al., TPAMI 2023, Algorithm 1: `K` unrolled iterations (plain
or SAM's, `opteq_sam`) differentiated by autodiff, or an implicit `keras_deq.DEQ`
solve. The map `T` is an `OptEqCell`; priors come from `opteq_priors`.
"""

import keras
from keras import ops

from keras_deq.layers._opteq_checks import check_choice
from keras_deq.layers.deq import DEQ
from keras_deq.layers.opteq_cell import OptEqCell
from keras_deq.layers.opteq_priors import PRIORS, FeaturePrior
from keras_deq.layers.opteq_sam import check_sam_schedule, sam_iteration
from keras_deq.solvers.common import check_mapping, check_positive_int

PRIOR_MODES = ("structural", "sam")
TRAINING_MODES = ("unrolled", "implicit")


class _InjectedCell(keras.layers.Layer):
    """`(z, [U_l x + b_l]) -> T(z)`: an `OptEqCell` with its injections hoisted.

    `OptEqBlock` passes the injections, computed once, as the DEQ's input, so
    the solver's iterations do not recompute `U_l x`. The gradient reaches
    `U_l` and `b_l` through that input.
    """

    def __init__(self, cell, **kwargs):
        super().__init__(**kwargs)
        self.cell = cell

    def build(self, z_shape, x_shape):
        pass

    def call(self, z, x):
        return self.cell.transition(z, list(x))

    def compute_output_shape(self, z_shape, x_shape):
        return z_shape


@keras.saving.register_keras_serializable(package="keras_deq")
class OptEqBlock(keras.layers.Layer):
    """A deep OptEq layer: the equilibrium of `OptEqCell`, started at `z0 = x`.

    Returns `z*` with `z* = T(z*, x)` (the input and the state share a shape,
    as in the paper, where `x` is the feature extractor's output). Training
    follows Algorithm 1, chosen by `training_mode`:

    - `"unrolled"` (the paper's default): `unroll_steps` (`K`) iterations from
      `z0 = x`, differentiated by autodiff; inference runs the same `K` steps.
      With `prior_mode="sam"` the iterations are SAM's (Eq. 11).
    - `"implicit"`: a `keras_deq.DEQ` solves `z = T(z, x)` from `z0 = x` with
      `solver` up to `tol` and differentiates by the implicit function theorem
      (the DEQ's metrics, `{name}_deq_fwd_steps` etc., are reported).

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
        tol: Its relative-residual threshold (1e-3 or 1e-2 in Table 8).
        deq_options: Other `keras_deq.DEQ` arguments for the implicit mode
            (e.g. `{"backward_tol": 1e-4, "on_failure": "ignore"}`).
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
        self.deq = None
        if self.training_mode == "implicit":
            # Built here (not in `build`) so bad solver arguments fail at construction.
            self.deq = DEQ(
                _InjectedCell(self.cell, dtype=self.dtype_policy, name="injected_cell"),
                solver=solver,
                max_iter=max_iter,
                tol=tol,
                backward="implicit",
                dtype=self.dtype_policy,
                name=f"{self.name}_deq",
                **self.deq_options,
            )

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self.cell.build(input_shape, input_shape)
        if self.deq is not None:
            self.deq.state_shape = input_shape[1:]
            injection_shapes = [input_shape[:-1] + (n,) for n in self.cell.units]
            self.deq.build(injection_shapes)

    def map(self, x):
        """The map `z -> T(z, x)` for a fixed input `x` (injections computed once)."""
        injections = self.cell.injections(x)
        return lambda z: self.cell.transition(z, injections)

    def call(self, inputs, training=None):
        x = inputs
        injections = self.cell.injections(x)
        if self.deq is not None:
            return self.deq(injections, initial_state=x, training=training)
        grad_r = None if self.sam_prior is None else self.sam_prior.gradient
        return sam_iteration(
            lambda z: self.cell.transition(z, injections),
            x,
            self.unroll_steps,
            grad_r=grad_r,
            rho=self.sam_rho,
            c=self.sam_c,
            gamma=self.sam_prior.strength if self.sam_prior is not None else 0.0,
        )

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
                "solver": self.solver,
                "max_iter": self.max_iter,
                "tol": self.tol,
                "deq_options": dict(self.deq_options),
                "kernel_initializer": None
                if cell.kernel_initializer is None
                else keras.initializers.serialize(cell.kernel_initializer),
                "injection_initializer": keras.initializers.serialize(cell.injection_initializer),
            }
        )
        return config
