"""OptEq: optimization-induced equilibrium networks (Xie et al., TPAMI 2023).

The OptEq unit is `f(z) = W^T sigma(W z + U x + b)`. With `sigma` monotone and
1-Lipschitz (ReLU) and `||W||_2 <= 1` it is the proximal operator of a convex
function `phi`, so it is firmly nonexpansive and its fixed points are the
minimizers of `phi` (Theorem 1). Its alpha-relaxed form
`alpha f(z) + (1 - alpha) z` (the prox of a Moreau envelope of `phi`) has the
same fixed points. A deep OptEq composes `L` relaxed units into one map
`T(z, x) = f_L o ... o f_1 (z, x)` and returns an equilibrium `z* = T(z*, x)`
started from `z0 = x` (Eq. 5-6, Algorithm 1).

Priors on the equilibrium (Section 5):

- structural (`R*`, Theorem 4): `z = T(T_R(z), x)`, with `T_R = prox_{gamma R}`
  when it has a closed form and `I - gamma grad R` otherwise (Table 2). For one
  unit with `alpha = 1` the equilibrium minimizes `phi + gamma R` with the
  gradient step, and `phi + M_{gamma R}` with the prox, where
  `M_{gamma R}(z) = min_u gamma R(u) + 1/2 ||u - z||^2` is the Moreau envelope
  (`gamma / (2 (1 + gamma)) ||z||^2` for `R = 1/2 ||z||^2`): see `FeaturePrior`;
- SAM (`R-dagger`, Eq. 11): the sequential averaging iteration
  `z^k = beta_k S(z^{k-1}) + (1 - beta_k) T(z^{k-1}, x)` with
  `S(z) = (1 - gamma beta_k) z - gamma grad R(z)` and `beta_k = rho / k^c`,
  which selects the fixed point of `T` with the least `R` (Theorem 5).

The paper uses HSIC (Section 7.2.1) as a prior of both kinds (Tables 4-5): it is
the prior `"hsic"`, a gradient step (HSIC has no closed-form prox).

OptEq is split by concept; this module gathers the pieces under their former import
path (`from keras_deq.layers import opteq` keeps working):

| module | holds |
|---|---|
| `keras_deq.features` | `soft_threshold`, `incay`, `decorrelation`, `hsic` and their gradients |
| `keras_deq.regularizers` | `DecorrelationRegularizer`, `HSICRegularizer`, `feature_regularizer` |
| `keras_deq.layers.opteq_priors` | `FeaturePrior`, `PRIORS` |
| `keras_deq.layers.opteq_sam` | `sam_iteration`, `check_sam_schedule` |
| `keras_deq.layers.opteq_units` | `OptEqDenseUnit`, `OptEqConvUnit` |
| `keras_deq.layers.opteq_cell` | `OptEqCell` |
| `keras_deq.layers.opteq_block` | `OptEqBlock` |
"""

from keras_deq.features import (
    decorrelation,
    decorrelation_gradient,
    hsic,
    hsic_gradient,
    incay,
    incay_gradient,
    soft_threshold,
)
from keras_deq.layers.opteq_block import PRIOR_MODES, TRAINING_MODES, OptEqBlock
from keras_deq.layers.opteq_cell import KINDS, OptEqCell
from keras_deq.layers.opteq_priors import PRIORS, FeaturePrior
from keras_deq.layers.opteq_sam import check_sam_schedule, sam_iteration
from keras_deq.layers.opteq_units import DEFAULT_SPATIAL_SHAPE, OptEqConvUnit, OptEqDenseUnit
from keras_deq.regularizers import (
    FEATURE_REGULARIZERS,
    DecorrelationRegularizer,
    HSICRegularizer,
    feature_regularizer,
)

__all__ = [
    "DEFAULT_SPATIAL_SHAPE",
    "FEATURE_REGULARIZERS",
    "KINDS",
    "PRIORS",
    "PRIOR_MODES",
    "TRAINING_MODES",
    "DecorrelationRegularizer",
    "FeaturePrior",
    "HSICRegularizer",
    "OptEqBlock",
    "OptEqCell",
    "OptEqConvUnit",
    "OptEqDenseUnit",
    "check_sam_schedule",
    "decorrelation",
    "decorrelation_gradient",
    "feature_regularizer",
    "hsic",
    "hsic_gradient",
    "incay",
    "incay_gradient",
    "sam_iteration",
    "soft_threshold",
]
