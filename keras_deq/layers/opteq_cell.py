"""`OptEqCell`: the deep OptEq map `T(z, x) = f_L o ... o f_1 (T_R(z), x)` (Eq. 5-6).

`L` relaxed OptEq units (`opteq_units`) in turn, after the structural prior's operator
`T_R` (`opteq_priors`). Use it as a `keras_deq.DEQ` cell or through `OptEqBlock`.
"""

import keras
from keras import ops

from keras_deq.layers._opteq_checks import check_alpha, check_choice, check_max_norm, check_units
from keras_deq.layers.cell import Cell
from keras_deq.layers.opteq_priors import PRIORS, FeaturePrior
from keras_deq.layers.opteq_units import OptEqConvUnit, OptEqDenseUnit
from keras_deq.solvers.common import (
    check_bool,
    check_nonnegative_float,
    check_positive_float,
    get_keras_object,
)

KINDS = ("dense", "conv")


@keras.saving.register_keras_serializable(package="keras_deq")
class OptEqCell(Cell):
    """The deep OptEq map `T(z, x) = f_L o ... o f_1 (T_R(z), x)` (Eq. 5-6).

    Each `f_l` is a relaxed OptEq unit with its own `W_l`, `U_l`, `b_l`
    (`OptEqDenseUnit` or `OptEqConvUnit`); `T_R` is the structural prior's
    operator (Theorem 4), the identity when `prior` is None. Use it as a
    `keras_deq.DEQ` cell, `cell(z, x)`, or through `OptEqBlock`. The state and
    the injection share a shape, and a `DEQ` starts the iteration at `z0 = x`, as
    the paper does (`initial_state`).

    With every `||W_l||_2 <= 1` and ReLU, `T` (without prior) is Lipschitz with
    constant at most `prod_l (alpha_l ||W_l||^2 + 1 - alpha_l)`, below 1 when
    one `||W_l|| < 1` (`lipschitz_bound`).

    Args:
        units: List of widths `n_l`, one unit each (e.g. `[16, 32, 64, 128, 128]`).
        kind: `"dense"` or `"conv"`.
        kernel_size: Kernel size of conv units.
        alpha: Relaxation of every unit, in (0, 1].
        learnable_alpha: Learn one `alpha_l` per unit, started at `alpha`.
        activation: Activation of every unit.
        max_norm: Cap on every `||W_l||_2`; None for no cap.
        prior: A structural prior name (`PRIORS`) or None.
        prior_strength: Its `gamma`.
        prior_epsilon: `eps` of the incay prior.
        prior_sigma: RBF bandwidth `sigma` of the HSIC prior.
        kernel_initializer: Initializer of the `W_l` (None: the unit's default).
        injection_initializer: Initializer of the `U_l`.
        **kwargs: Base layer arguments.

    Example:

    ```python
    cell = OptEqCell([64, 64], alpha=0.8, prior="l2", prior_strength=0.1)
    z_star = keras_deq.DEQ(cell)(x)  # started at z0 = x
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
        prior_strength=0.1,
        prior_epsilon=1.0,
        prior_sigma=1.0,
        kernel_initializer=None,
        injection_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = check_units(units)
        self.kind = check_choice("kind", kind, KINDS)
        self.kernel_size = kernel_size
        self.learnable_alpha = check_bool("learnable_alpha", learnable_alpha)
        self.alpha = check_alpha(alpha, self.learnable_alpha)
        self.activation = keras.activations.get(activation)
        self.max_norm = check_max_norm(max_norm)
        if prior is not None:
            check_choice("prior", prior, PRIORS)
        self.prior_name = prior
        self.prior_strength = check_nonnegative_float("prior_strength", prior_strength)
        self.prior_epsilon = check_positive_float("prior_epsilon", prior_epsilon, finite=False)
        self.prior_sigma = check_positive_float("prior_sigma", prior_sigma, finite=False)
        self.prior = (
            None
            if prior is None
            else FeaturePrior(prior, prior_strength, prior_epsilon, self.prior_sigma)
        )
        # None: each unit's own default (see `OptEqDenseUnit` and `OptEqConvUnit`).
        self.kernel_initializer = get_keras_object(
            "initializer", "kernel_initializer", kernel_initializer
        )
        self.injection_initializer = get_keras_object(
            "initializer", "injection_initializer", injection_initializer, default="glorot_uniform"
        )
        self.unit_layers = [self._make_unit(i, n) for i, n in enumerate(self.units)]

    def _make_unit(self, index, width):
        common = {
            "alpha": self.alpha,
            "learnable_alpha": self.learnable_alpha,
            "activation": self.activation,
            "max_norm": self.max_norm,
            "kernel_initializer": self.kernel_initializer,
            "injection_initializer": self.injection_initializer,
            "dtype": self.dtype_policy,
            "name": f"unit_{index}",
        }
        if self.kind == "conv":
            return OptEqConvUnit(width, kernel_size=self.kernel_size, **common)
        return OptEqDenseUnit(width, **common)

    def build(self, z_shape, x_shape):
        for unit in self.unit_layers:
            unit.build(z_shape, x_shape)

    def injections(self, x):
        """The list of `U_l x + b_l`, computed once per input (outside any loop)."""
        return [unit.injection(x) for unit in self.unit_layers]

    def transition(self, z, injections):
        """`T(z)` given precomputed `injections` (see `injections`)."""
        if self.prior is not None:
            z = self.prior.step(z)
        for unit, injection in zip(self.unit_layers, injections, strict=True):
            z = unit.transition(z, injection)
        return z

    def call(self, z, x):
        return self.transition(z, self.injections(x))

    def initial_state(self, x, state_shape):
        """`z0 = x`, the paper's start (Algorithm 1): the state has the input's shape."""
        return x

    def alphas(self):
        """The current `alpha_l` of each unit (floats, or tensors when learnable)."""
        return [unit.alpha_value() for unit in self.unit_layers]

    def lipschitz_bound(self):
        """`prod_l (alpha_l ||W_l||^2 + 1 - alpha_l)` for the current weights.

        A bound on the Lipschitz constant of `T` without its prior, valid for a
        1-Lipschitz monotone activation and every `||W_l|| <= 1` (for conv units
        `||W_l||` is the operator-norm upper bound of `OptEqConvUnit`).
        """
        bound = ops.convert_to_tensor(1.0, "float32")
        for unit in self.unit_layers:
            alpha = ops.cast(unit.alpha_value(), "float32")
            norm = ops.cast(unit.operator_norm(), "float32")
            bound = bound * (alpha * ops.square(norm) + 1.0 - alpha)
        return bound

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": list(self.units),
                "kind": self.kind,
                "kernel_size": self.kernel_size,
                "alpha": self.alpha,
                "learnable_alpha": self.learnable_alpha,
                "activation": keras.activations.serialize(self.activation),
                "max_norm": self.max_norm,
                "prior": self.prior_name,
                "prior_strength": self.prior_strength,
                "prior_epsilon": self.prior_epsilon,
                "prior_sigma": self.prior_sigma,
                "kernel_initializer": None
                if self.kernel_initializer is None
                else keras.initializers.serialize(self.kernel_initializer),
                "injection_initializer": keras.initializers.serialize(self.injection_initializer),
            }
        )
        return config
