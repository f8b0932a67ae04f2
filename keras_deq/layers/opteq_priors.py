"""`FeaturePrior`: a prior `R` on OptEq's equilibrium features and its operators.

A structural prior (`R*`, Xie et al., TPAMI 2023, Theorem 4) changes the OptEq map
to `z = T(T_R(z), x)`, with `T_R = prox_{gamma R}` when it has a closed form and
`I - gamma grad R` otherwise (Table 2); the SAM iteration (`opteq_sam`) uses
`grad R` instead. `R` is one of `PRIORS`; its functions are in `keras_deq.features`.
"""

import math

import keras
from keras import ops

from keras_deq.features import (
    decorrelation,
    decorrelation_gradient,
    hsic,
    hsic_gradient,
    incay,
    incay_gradient,
    soft_threshold,
)
from keras_deq.layers._opteq_checks import is_number, scalar

PRIORS = ("l2", "l1", "incay", "decorrelation", "hsic")


@keras.saving.register_keras_serializable(package="keras_deq")
class FeaturePrior:
    """A prior `R` on the equilibrium features and its operators (Table 2).

    | `name` | `R(z)` | `step(z)` (`T_R`) |
    |---|---|---|
    | `"l2"` | `1/2 ||z||^2` | `prox_{gamma R}(z) = z / (1 + gamma)` (feature decay) |
    | `"l1"` | `||z||_1` | `prox_{gamma R}(z)`: soft-threshold at `gamma` |
    | `"incay"` | `2 / (||z||^2 + 2 eps)` per sample | `z - gamma grad R(z) = (1 + 4 gamma / (||z||^2 + 2 eps)^2) z` |
    | `"decorrelation"` | `F_Dz` (Eq. 13), across the batch | `z - gamma grad F_Dz(z)` |
    | `"hsic"` | `sum_{i<j} HSIC(z_i, z_j)` (`hsic`), across the batch | `z - gamma grad R(z)` |

    The paper's Table 2 prints the incay step as `(1 - 4 gamma / ...) z`; the
    gradient step of the `R` it states (and the "feature expansion" it
    describes) is `(1 + 4 gamma / ...) z`, which is what is used here. HSIC is
    not in Table 2; the paper uses it as a prior of both kinds in its Tables
    4-5, and it has no closed-form prox, so its operator is the gradient step
    (`hsic_gradient`), as for the decorrelation.

    What a structural prior minimizes. Let `f = prox_phi` be one OptEq unit
    with `alpha = 1` (Theorem 1). The fixed point of `z = f(T_R(z))` is

    - a minimizer of `phi + gamma R` when `T_R = I - gamma grad R` (Theorem 4:
      `-gamma grad R(z) in d phi(z)`; a stationary point, as `R` is not convex
      for `"incay"`, `"decorrelation"` and `"hsic"`);
    - a minimizer of `phi + M_{gamma R}` when `T_R = prox_{gamma R}` (`"l2"`,
      `"l1"`), where `M_{gamma R}(z) = min_u gamma R(u) + 1/2 ||u - z||^2` is the
      Moreau envelope of `gamma R`, not `gamma R` itself: `z = f(u)` and
      `u = prox_{gamma R}(z)` give `0 in d phi(z) + z - prox_{gamma R}(z)`, and
      `z - prox_{gamma R}(z) = grad M_{gamma R}(z)`. For `"l2"`,
      `M_{gamma R}(z) = gamma / (2 (1 + gamma)) ||z||^2` (so `phi + lam/2 ||z||^2`
      with `lam < 1` is `strength = lam / (1 - lam)`); for `"l1"` it is the
      Huber function, `z_i^2 / 2` where `|z_i| <= gamma` and
      `gamma |z_i| - gamma^2 / 2` elsewhere, summed.

    A relaxed unit (`alpha < 1`) is the prox of `alpha M_phi^{1 - alpha}`, which
    has the minimizers of `phi` but not its values: the fixed point then
    minimizes `alpha M_phi^{1 - alpha} + gamma R` (gradient step) or
    `alpha M_phi^{1 - alpha} + M_{gamma R}` (prox). A deep `OptEqCell` applies
    `T_R` before its first unit; its equilibrium is not the minimizer of one
    function (Theorem 2).

    Args:
        name: One of `PRIORS`.
        strength: `gamma >= 0`, the prox parameter or gradient step.
        epsilon: `eps > 0` of the incay prior (ignored by the others).
        sigma: The RBF bandwidth `> 0` of the HSIC prior (ignored by the others).

    Examples:
        >>> import keras
        >>> prior = FeaturePrior("l2", strength=1.0)
        >>> keras.ops.convert_to_numpy(prior.step(keras.ops.array([[2.0, 4.0]]))).tolist()
        [[1.0, 2.0]]
    """

    def __init__(self, name, strength=0.1, epsilon=1.0, sigma=1.0):
        # The arguments are the `prior`, `prior_strength`, `prior_epsilon` and `prior_sigma`
        # of the OptEq layers; the messages name both.
        if name not in PRIORS:
            raise ValueError(f"`name` must be one of the priors {PRIORS}. Received: name={name!r}")
        if not is_number(strength) or not 0 <= strength < math.inf:
            raise ValueError(
                "`strength` (`prior_strength` of the OptEq layers) must be a finite "
                f"non-negative number. Received: strength={strength!r}"
            )
        if not is_number(epsilon) or not 0 < epsilon < math.inf:
            raise ValueError(
                "`epsilon` (`prior_epsilon` of the OptEq layers) must be a finite positive "
                f"number. Received: epsilon={epsilon!r}"
            )
        if not is_number(sigma) or not sigma > 0:
            raise ValueError(
                "`sigma` (`prior_sigma` of the OptEq layers) must be a positive number. "
                f"Received: sigma={sigma!r}"
            )
        self.name, self.strength, self.epsilon = name, float(strength), float(epsilon)
        self.sigma = float(sigma)

    def value(self, z):
        """`R(z)`, a scalar (per-sample priors are summed over the batch)."""
        if self.name == "l2":
            return 0.5 * ops.sum(ops.square(z))
        if self.name == "l1":
            return ops.sum(ops.abs(z))
        if self.name == "incay":
            return incay(z, self.epsilon)
        if self.name == "hsic":
            return hsic(z, self.sigma)
        return decorrelation(z)

    def gradient(self, z):
        """`grad R(z)` (for `"l1"`, the subgradient `sign(z)`)."""
        if self.name == "l2":
            return z
        if self.name == "l1":
            return ops.sign(z)
        if self.name == "incay":
            return incay_gradient(z, self.epsilon)
        if self.name == "hsic":
            return hsic_gradient(z, self.sigma)
        return decorrelation_gradient(z)

    def step(self, z):
        """`T_R(z)`: the prox of `gamma R` or a gradient step on it (table above)."""
        gamma = scalar(self.strength, z.dtype)
        if self.name == "l2":
            return z / (1.0 + gamma)
        if self.name == "l1":
            return soft_threshold(z, gamma)
        return z - gamma * self.gradient(z)

    def get_config(self):
        return {
            "name": self.name,
            "strength": self.strength,
            "epsilon": self.epsilon,
            "sigma": self.sigma,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
