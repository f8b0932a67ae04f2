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

This module holds the feature functions (decorrelation, HSIC, incay), the
priors (`FeaturePrior`), the feature regularizers usable on any Keras layer,
the SAM iteration, the units (`OptEqDenseUnit`, `OptEqConvUnit`), the deep
cell (`OptEqCell`) and the layer (`OptEqBlock`).
"""

import math
import numbers

import keras
import tensorflow as tf

from keras_deq.constraints_opteq import ConvSpectralNorm, SpectralNorm, same_conv_norm_bound
from keras_deq.layers.deq import DEQ
from keras_deq.solvers.common import (
    check_bool,
    check_mapping,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
    get_keras_object,
)

PRIORS = ("l2", "l1", "incay", "decorrelation", "hsic")
PRIOR_MODES = ("structural", "sam")
TRAINING_MODES = ("unrolled", "implicit")
KINDS = ("dense", "conv")
FEATURE_REGULARIZERS = ("l1", "l2", "decorrelation", "hsic")
# Grid used for the conv operator-norm cap when the input's spatial size is unknown.
DEFAULT_SPATIAL_SHAPE = (64, 64)


# ------------------------------------------------------------------ argument checks
def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")
    return value


def _check_alpha(alpha, learnable):
    """`alpha` in (0, 1], or in (0, 1) when it is learnable (a sigmoid's value)."""
    in_range = _is_number(alpha) and 0 < alpha and (alpha < 1 if learnable else alpha <= 1)
    if not in_range:
        interval = "(0, 1) when learnable_alpha=True" if learnable else "(0, 1]"
        raise ValueError(f"`alpha` must be a number in {interval}. Received: alpha={alpha!r}")
    return float(alpha)


def _check_units(units):
    if isinstance(units, numbers.Integral) and not isinstance(units, bool):
        units = [units]
    if not isinstance(units, (list, tuple)) or not units:
        raise ValueError(
            "`units` must be a positive int or a non-empty list of positive ints "
            f"(the width n_l of each unit's W_l). Received: units={units!r}"
        )
    return [check_positive_int("units", n) for n in units]


def _check_max_norm(max_norm):
    if max_norm is None:
        return None
    return check_positive_float("max_norm", max_norm, finite=False)


def _scalar(value, dtype):
    """`value` as a `dtype` scalar tensor, exactly for a Python number.

    `tf.cast(0.7, tf.float64)` first makes a float32 tensor and so rounds 0.7 to
    float32 (off by 1e-8); `tf.constant(0.7, tf.float64)` does not.
    """
    if tf.is_tensor(value) or isinstance(value, tf.Variable):
        return tf.cast(value, dtype)
    return tf.constant(value, dtype)


# ------------------------------------------------------------------ feature functions
def _as_matrix(z):
    """`z` as a `(samples, features)` matrix: features on the last axis."""
    return tf.reshape(z, [-1, tf.shape(z)[-1]])


def _sample_sq_norms(z):
    """Per-sample squared norms, shaped to broadcast against `z`."""
    axes = list(range(1, z.shape.rank))
    return tf.reduce_sum(tf.square(z), axis=axes, keepdims=True)


def soft_threshold(z, threshold):
    """`prox` of `threshold * ||z||_1`: `sign(z) * max(|z| - threshold, 0)`.

    Args:
        z: A tensor.
        threshold: A non-negative number.

    Returns:
        A tensor like `z`.

    Example:

    >>> import tensorflow as tf
    >>> soft_threshold(tf.constant([-2.0, 0.5, 3.0]), 1.0).numpy().tolist()
    [-1.0, 0.0, 2.0]
    """
    return tf.sign(z) * tf.nn.relu(tf.abs(z) - threshold)


def incay(z, epsilon=1.0):
    """The feature-incay prior `R(z) = sum_b 2 / (||z_b||^2 + 2 epsilon)`.

    Small when features are large: minimizing it expands the features.

    Args:
        z: A `(batch, ...)` tensor; each sample's norm is over all its features.
        epsilon: A positive number.

    Returns:
        A scalar tensor.
    """
    return tf.reduce_sum(2.0 / (_sample_sq_norms(z) + 2.0 * epsilon))


def incay_gradient(z, epsilon=1.0):
    """`grad R(z) = -4 z / (||z||^2 + 2 epsilon)^2`, per sample (see `incay`)."""
    return -4.0 * z / tf.square(_sample_sq_norms(z) + 2.0 * epsilon)


def _cosines(z, epsilon):
    """Unit feature columns `u` (samples, features), their norms, and `u^T u`."""
    matrix = _as_matrix(z)
    norms = tf.sqrt(tf.reduce_sum(tf.square(matrix), axis=0) + epsilon)
    unit = matrix / norms
    return unit, norms, tf.matmul(unit, unit, transpose_a=True)


def _off_diagonal(square):
    return square - tf.linalg.diag(tf.linalg.diag_part(square))


def decorrelation(z, epsilon=1e-12):
    """The feature decorrelation `F_Dz(Z) = 1/2 ||D Z Z^T D - I||_F^2` (Eq. 13).

    `Z` holds one row per feature and one column per sample, and `D` scales
    each row to unit norm, so `D Z Z^T D` is the matrix of cosines between
    features across the batch and `F_Dz = 1/2 sum_{i != j} cos(z_i, z_j)^2`.
    It is 0 exactly when the features are orthogonal across samples. Features
    are on the last axis of `z`; every other axis (batch, and the spatial axes
    of a conv feature map) indexes samples.

    Args:
        z: A `(batch, ..., features)` tensor.
        epsilon: Added to each squared feature norm (guards a zero feature).

    Returns:
        A scalar tensor.

    Example:

    >>> import tensorflow as tf
    >>> float(decorrelation(tf.constant([[1.0, 0.0], [0.0, 2.0]])))
    0.0
    """
    _, _, cos = _cosines(z, epsilon)
    return 0.5 * tf.reduce_sum(tf.square(_off_diagonal(cos)))


def decorrelation_gradient(z, epsilon=1e-12):
    """The gradient of `decorrelation(z)` with respect to `z`, in closed form.

    With `u_i = z_i / ||z_i||` and `C = [u_i^T u_j]`:
    `grad_{z_i} F = (2 / ||z_i||) (I - u_i u_i^T) sum_{j != i} C_ij u_j`.

    Args:
        z: A `(batch, ..., features)` tensor.
        epsilon: As in `decorrelation`.

    Returns:
        A tensor like `z`.
    """
    unit, norms, cos = _cosines(z, epsilon)
    pulled = 2.0 * tf.matmul(unit, _off_diagonal(cos))  # column i: 2 sum_j C_ij u_j
    radial = tf.reduce_sum(pulled * unit, axis=0, keepdims=True) * unit
    return tf.reshape((pulled - radial) / norms, tf.shape(z))


# `exp(-u)` is 0 in float64 (and in every float dtype) for u >= 746: capping the exponent
# there keeps it finite, so that neither the kernel nor its gradient is NaN.
_RBF_EXPONENT_CAP = 1000.0


def _smallest_normal(dtype):
    if dtype == tf.float16:
        return 2.0**-14
    return 2.0**-1022 if dtype == tf.float64 else 2.0**-126  # bfloat16 is float32's


def _rbf_compute(diff, sigma):
    """`(d, 2 sigma^2)` in the dtype the kernels are computed in, or None (see `hsic`).

    `2 sigma^2` is a Python float: 0 or subnormal when it underflows. Where it is not a
    normal number of `diff`'s dtype the kernels are computed in float64, and where it
    is not one of float64 either, None.
    """
    denominator = 2.0 * sigma * sigma
    for compute_dtype in (diff.dtype, tf.float64):
        if denominator >= _smallest_normal(compute_dtype):  # inf included
            return tf.cast(diff, compute_dtype), tf.constant(denominator, compute_dtype)
    return None


def _rbf_kernels(diff, sigma):
    """`exp(-diff^2 / (2 sigma^2))` without NaN for any `sigma > 0` (see `hsic`)."""
    compute = _rbf_compute(diff, sigma)
    if compute is None:
        # sigma < 1e-154: every kernel entry but those of equal samples is 0 in float64
        # unless two samples differ by less than about 40 sigma.
        return tf.cast(tf.equal(diff, 0), diff.dtype) + 0.0 * diff  # a zero gradient, not None
    d, denominator = compute
    exponent = tf.minimum(tf.square(d) / denominator, _RBF_EXPONENT_CAP)
    return tf.cast(tf.exp(-exponent), diff.dtype)


def _rbf_slopes_sum(diff, sigma, weights):
    """`sum_b weights[..., b] * k'(diff[..., b])`, `k' = -diff / sigma^2 * kernel`.

    Computed in the kernels' dtype (see `_rbf_compute`) and cast back, so that a
    float64 fallback does not overflow the input's dtype before the weighting.
    `d * kernel` is formed first: it is 0 where the exponent is capped (the kernel is
    0 there in every dtype), and `d / sigma^2` alone could overflow.
    """
    compute = _rbf_compute(diff, sigma)
    if compute is None:  # the kernels are `d == 0`: constant, so no slope
        return 0.0 * tf.reduce_sum(diff, axis=-1)
    d, denominator = compute
    exponent = tf.minimum(tf.square(d) / denominator, _RBF_EXPONENT_CAP)
    slopes = -2.0 * (d * tf.exp(-exponent)) / denominator
    total = tf.reduce_sum(tf.cast(weights, d.dtype) * slopes, axis=-1)
    return tf.cast(total, diff.dtype)


def _feature_differences(z):
    """`(features, samples)` matrix of `z` and its pairwise differences `d[i, a, b]`."""
    matrix = tf.transpose(_as_matrix(z))  # (features, samples)
    return matrix, matrix[:, :, None] - matrix[:, None, :]


def _centered_kernels(diff, sigma):
    """`Kc_i = H K_i H` for every feature `i`: `(features, samples, samples)`."""
    kernels = _rbf_kernels(diff, sigma)
    centered = kernels - tf.reduce_mean(kernels, axis=1, keepdims=True)
    return centered - tf.reduce_mean(centered, axis=2, keepdims=True)


def _hsic_scale(matrix):
    """`(B - 1)^2`, with `B - 1` floored at 1: one sample has zero centered kernels."""
    samples = tf.cast(tf.shape(matrix)[1], matrix.dtype)
    return tf.square(tf.maximum(samples - 1.0, 1.0))


def hsic(z, sigma=1.0):
    """Sum over feature pairs of the biased HSIC with Gaussian RBF kernels.

    `R(Z) = sum_{i < j} HSIC(Z_i, Z_j)`, `HSIC(X, Y) = tr(K_X H K_Y H) / (B - 1)^2`,
    where `K_X[a, b] = exp(-(x_a - x_b)^2 / (2 sigma^2))` over the `B` samples
    and `H = I - 11^T / B` centers (Section 7.2.1). With `Kc_i = H K_i H` the sum
    is `(||sum_i Kc_i||_F^2 - sum_i ||Kc_i||_F^2) / (2 (B - 1)^2)`. One sample
    (`B = 1`) gives 0.

    Features are on the last axis; every other axis indexes samples. Memory and
    time grow as `features * samples^2`: apply it to pooled or dense features.

    Any `sigma > 0` (inf included) gives a finite value and gradient. `2 sigma^2` is
    computed in Python floats; where it underflows the input's dtype (sigma below about
    1e-19 in float32, 5e-3 in float16), which would give `exp(-0 / 0)` = NaN, the
    kernels are computed in float64, and where it underflows float64 too (sigma below
    about 1e-154) they are `d == 0`: their float64 value unless two samples differ by
    less than about 40 sigma.

    Args:
        z: A `(batch, ..., features)` tensor.
        sigma: The RBF bandwidth, > 0.

    Returns:
        A scalar tensor.
    """
    matrix, diff = _feature_differences(z)
    centered = _centered_kernels(diff, sigma)
    total = tf.reduce_sum(tf.square(tf.reduce_sum(centered, axis=0)))
    own = tf.reduce_sum(tf.square(centered))
    return 0.5 * (total - own) / _hsic_scale(matrix)


def hsic_gradient(z, sigma=1.0):
    """The gradient of `hsic(z, sigma)` with respect to `z`, in closed form.

    With `G_i = (sum_j Kc_j - Kc_i) / (B - 1)^2` (the derivative of `hsic` in the
    kernel `K_i`) and `k'(d) = -d / sigma^2 * exp(-d^2 / (2 sigma^2))`,
    `grad_{z[a, i]} = 2 sum_b G_i[a, b] k'(z[a, i] - z[b, i])`. It is
    differentiable again (training through an HSIC prior step differentiates it),
    and it follows `hsic`'s numerics for any `sigma > 0`.

    Args:
        z: A `(batch, ..., features)` tensor.
        sigma: The RBF bandwidth, > 0.

    Returns:
        A tensor like `z`.
    """
    matrix, diff = _feature_differences(z)
    centered = _centered_kernels(diff, sigma)
    weights = (tf.reduce_sum(centered, axis=0, keepdims=True) - centered) / _hsic_scale(matrix)
    # The diagonal (d = 0, k'(0) = 0) adds nothing; zeroing its weight keeps the second
    # derivative, whose diagonal terms are ~1 / sigma^2 and cancel exactly, finite.
    weights = weights * (1.0 - tf.eye(tf.shape(matrix)[1], dtype=weights.dtype))
    gradient = 2.0 * _rbf_slopes_sum(diff, sigma, weights)  # (features, samples)
    return tf.reshape(tf.transpose(gradient), tf.shape(z))


# ------------------------------------------------------------------ priors
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

    Example:

    >>> import tensorflow as tf
    >>> prior = FeaturePrior("l2", strength=1.0)
    >>> prior.step(tf.constant([[2.0, 4.0]])).numpy().tolist()
    [[1.0, 2.0]]
    """

    def __init__(self, name, strength=0.1, epsilon=1.0, sigma=1.0):
        # The arguments are the `prior`, `prior_strength`, `prior_epsilon` and `prior_sigma`
        # of the OptEq layers; the messages name both.
        if name not in PRIORS:
            raise ValueError(f"`name` must be one of the priors {PRIORS}. Received: name={name!r}")
        if not _is_number(strength) or not 0 <= strength < math.inf:
            raise ValueError(
                "`strength` (`prior_strength` of the OptEq layers) must be a finite "
                f"non-negative number. Received: strength={strength!r}"
            )
        if not _is_number(epsilon) or not 0 < epsilon < math.inf:
            raise ValueError(
                "`epsilon` (`prior_epsilon` of the OptEq layers) must be a finite positive "
                f"number. Received: epsilon={epsilon!r}"
            )
        if not _is_number(sigma) or not sigma > 0:
            raise ValueError(
                "`sigma` (`prior_sigma` of the OptEq layers) must be a positive number. "
                f"Received: sigma={sigma!r}"
            )
        self.name, self.strength, self.epsilon = name, float(strength), float(epsilon)
        self.sigma = float(sigma)

    def value(self, z):
        """`R(z)`, a scalar (per-sample priors are summed over the batch)."""
        if self.name == "l2":
            return 0.5 * tf.reduce_sum(tf.square(z))
        if self.name == "l1":
            return tf.reduce_sum(tf.abs(z))
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
            return tf.sign(z)
        if self.name == "incay":
            return incay_gradient(z, self.epsilon)
        if self.name == "hsic":
            return hsic_gradient(z, self.sigma)
        return decorrelation_gradient(z)

    def step(self, z):
        """`T_R(z)`: the prox of `gamma R` or a gradient step on it (table above)."""
        gamma = _scalar(self.strength, z.dtype)
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


# ------------------------------------------------------------------ regularizers
@keras.saving.register_keras_serializable(package="keras_deq")
class DecorrelationRegularizer(keras.regularizers.Regularizer):
    """`strength * F_Dz(features)` (Eq. 13) as a Keras regularizer.

    Use it as any layer's `activity_regularizer`, or call it on a tensor and
    `add_loss` the result. Keras divides activity-regularizer losses by the
    batch size; `F_Dz` is already a batch-level statistic, so scale `strength`
    accordingly (or use `add_loss(regularizer(z))` to avoid the division).

    Args:
        strength: The weight, >= 0.

    Example:

    ```python
    layer = keras.layers.Dense(64, activity_regularizer=DecorrelationRegularizer(0.1))
    ```
    """

    def __init__(self, strength=0.01):
        self.strength = check_nonnegative_float("strength", strength)

    def __call__(self, x):
        return self.strength * decorrelation(x)

    def get_config(self):
        return {"strength": self.strength}


@keras.saving.register_keras_serializable(package="keras_deq")
class HSICRegularizer(keras.regularizers.Regularizer):
    """`strength * sum_{i<j} HSIC(features_i, features_j)` (Section 7.2.1).

    See `hsic` for the estimator and its cost, and `DecorrelationRegularizer`
    for the batch-size note.

    Args:
        strength: The weight, >= 0.
        sigma: The RBF bandwidth, > 0.

    Example:

    ```python
    head = keras.layers.Dense(32, activity_regularizer=HSICRegularizer(0.1, sigma=1.0))
    ```
    """

    def __init__(self, strength=0.01, sigma=1.0):
        self.strength = check_nonnegative_float("strength", strength)
        self.sigma = check_positive_float("sigma", sigma, finite=False)

    def __call__(self, x):
        return self.strength * hsic(x, self.sigma)

    def get_config(self):
        return {"strength": self.strength, "sigma": self.sigma}


def feature_regularizer(name, strength=0.01, **kwargs):
    """A feature regularizer by name: Keras' `L1`/`L2`, or decorrelation / HSIC.

    Args:
        name: One of `FEATURE_REGULARIZERS`.
        strength: Its weight.
        **kwargs: Extra arguments (`sigma` for `"hsic"`).

    Returns:
        A `keras.regularizers.Regularizer`.

    Example:

    >>> feature_regularizer("l1", 0.5).get_config()
    {'l1': 0.5}
    """
    _check_choice("name", name, FEATURE_REGULARIZERS)
    if name == "l1":
        return keras.regularizers.L1(strength, **kwargs)
    if name == "l2":
        return keras.regularizers.L2(strength, **kwargs)
    if name == "decorrelation":
        return DecorrelationRegularizer(strength, **kwargs)
    return HSICRegularizer(strength, **kwargs)


# ------------------------------------------------------------------ SAM iteration
def check_sam_schedule(rho, c):
    """Refuses `(rho, c)` outside Theorem 5's `rho, c > 0`, `rho + 2c < 1`."""
    rho = check_positive_float("sam_rho", rho, finite=False)
    c = check_positive_float("sam_c", c, finite=False)
    if not rho + 2.0 * c < 1.0:
        raise ValueError(
            "The SAM schedule beta_k = rho / k^c needs rho + 2c < 1 (Theorem 5). "
            f"Received: sam_rho={rho}, sam_c={c}"
        )
    return rho, c


def sam_iteration(fn, z0, steps, grad_r=None, rho=0.5, c=0.2, gamma=0.1):
    """`steps` iterations of the sequential averaging method (SAM, Eq. 11).

    `z^k = beta_k S_k(z^{k-1}) + (1 - beta_k) fn(z^{k-1})` for `k = 1..steps`,
    with `beta_k = rho / k^c` and `S_k(z) = (1 - gamma beta_k) z - gamma grad_r(z)`.
    For a nonexpansive `fn` with many fixed points it tends to the fixed point
    with the least `R` (Theorem 5, for `rho + 2c < 1` and `gamma = 1 / (2 L)`
    where `L` is the Lipschitz constant of `grad_r`). With `grad_r=None` it is
    plain iteration `z^k = fn(z^{k-1})` (Remark 2). A `tf.while_loop`:
    differentiable by autodiff (the unrolled gradient of Eq. 12), usable in
    graph mode and under XLA.

    Args:
        fn: The map `T`, a function of a tensor returning a tensor of its shape.
        z0: The start (the paper uses the injection `x`).
        steps: Number of iterations `K >= 1`.
        grad_r: The gradient of the prior, `z -> grad R(z)`, or None.
        rho: `rho` of the schedule (ignored when `grad_r` is None).
        c: `c` of the schedule.
        gamma: The step `gamma` of `S`.

    Returns:
        `z^K`, a tensor like `z0`.

    Example:

    >>> import tensorflow as tf
    >>> z = sam_iteration(lambda z: 0.5 * z + 1.0, tf.zeros([1, 2]), steps=60)
    >>> [round(v, 4) for v in z.numpy()[0].tolist()]
    [2.0, 2.0]
    """
    steps = check_positive_int("steps", steps)
    z0 = tf.convert_to_tensor(z0)
    dtype = z0.dtype

    def plain(k, z):
        return k + 1, fn(z)

    def averaged(k, z):
        beta = _scalar(rho, dtype) / tf.pow(tf.cast(k, dtype), _scalar(c, dtype))
        step = _scalar(gamma, dtype)
        s = (1.0 - step * beta) * z - step * grad_r(z)
        return k + 1, beta * s + (1.0 - beta) * fn(z)

    _, z = tf.while_loop(
        lambda k, z: k <= steps,
        plain if grad_r is None else averaged,
        (tf.constant(1), z0),
        maximum_iterations=steps,
    )
    return z


# ------------------------------------------------------------------ units
class _OptEqUnit(keras.layers.Layer):
    """Shared logic of the dense and conv units: alpha, injection and transition."""

    def __init__(
        self,
        units,
        alpha=1.0,
        learnable_alpha=False,
        activation="relu",
        max_norm=1.0,
        kernel_initializer=None,
        injection_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = check_positive_int("units", units)
        self.learnable_alpha = check_bool("learnable_alpha", learnable_alpha)
        self.alpha = _check_alpha(alpha, self.learnable_alpha)
        self.activation = keras.activations.get(activation)
        self.max_norm = _check_max_norm(max_norm)
        self.kernel_initializer = get_keras_object(
            "initializer",
            "kernel_initializer",
            kernel_initializer,
            default=self._default_kernel_initializer(),
        )
        self.injection_initializer = get_keras_object(
            "initializer", "injection_initializer", injection_initializer, default="glorot_uniform"
        )

    def _default_kernel_initializer(self):
        raise NotImplementedError

    def _add_alpha(self):
        if self.learnable_alpha:
            logit = math.log(self.alpha / (1.0 - self.alpha))
            self.alpha_logit = self.add_weight(
                name="alpha_logit", shape=(), initializer=keras.initializers.Constant(logit)
            )

    def _cap_initial_kernel(self):
        """Applies the operator-norm cap to the initial kernel too."""
        if self.kernel.constraint is not None:
            self.kernel.assign(self.kernel.constraint(self.kernel))

    def alpha_value(self, dtype=None):
        """The relaxation `alpha` (a tensor in (0, 1) when learnable, else a float)."""
        if not self.learnable_alpha:
            return self.alpha
        alpha = tf.sigmoid(tf.convert_to_tensor(self.alpha_logit))
        return tf.cast(alpha, dtype) if dtype is not None else alpha

    def injection(self, x):
        """`U x + b`: the part of the pre-activation that does not depend on `z`."""
        return self._inject(x) + self.bias

    def transition(self, z, injection):
        """`alpha W^T sigma(W z + injection) + (1 - alpha) z`."""
        full = self._adjoint(self.activation(self._apply(z) + injection), z)
        if not self.learnable_alpha and self.alpha == 1.0:
            return full
        alpha = self.alpha_value(z.dtype)
        return alpha * full + (1.0 - alpha) * z

    def call(self, z, x):
        return self.transition(z, self.injection(x))

    def compute_output_shape(self, z_shape, x_shape):
        return z_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "alpha": self.alpha,
                "learnable_alpha": self.learnable_alpha,
                "activation": keras.activations.serialize(self.activation),
                "max_norm": self.max_norm,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "injection_initializer": keras.initializers.serialize(self.injection_initializer),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_deq")
class OptEqDenseUnit(_OptEqUnit):
    """The dense OptEq unit `alpha W^T sigma(W z + U x + b) + (1 - alpha) z`.

    `W` maps the state (`m` features) to `units` (`n`) hidden features and `W^T`
    maps back, so the output has the state's shape. `||W||_2 <= max_norm` is
    kept by the `SpectralNorm` constraint (also applied to the initial
    kernel); with ReLU and `max_norm <= 1` the unit is firmly nonexpansive.

    Args:
        units: `n`, the width of `W z`.
        alpha: The relaxation in (0, 1]; 1 gives the plain unit.
        learnable_alpha: Learn `alpha = sigmoid(a)`, started at `alpha`
            (then in (0, 1)).
        activation: Monotone 1-Lipschitz activation (ReLU by default).
        max_norm: Cap on `||W||_2`; None for no cap.
        kernel_initializer: Initializer of `W`; small by default
            (orthogonal, gain 0.5): the paper stresses near-zero starts.
        injection_initializer: Initializer of `U`.
        **kwargs: Base layer arguments.

    Example:

    ```python
    unit = OptEqDenseUnit(128, alpha=0.8)
    z_next = unit(z, x)  # z: (batch, m), x: (batch, d)
    ```
    """

    def _default_kernel_initializer(self):
        return keras.initializers.Orthogonal(gain=0.5)

    def build(self, z_shape, x_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(z_shape[-1], self.units),
            initializer=self.kernel_initializer,
            constraint=SpectralNorm(self.max_norm) if self.max_norm else None,
        )
        self.injection_kernel = self.add_weight(
            name="injection_kernel",
            shape=(x_shape[-1], self.units),
            initializer=self.injection_initializer,
        )
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
        self._add_alpha()
        self._cap_initial_kernel()

    def _apply(self, z):
        return keras.ops.matmul(z, self.kernel)

    def _adjoint(self, h, z):
        return keras.ops.matmul(h, keras.ops.transpose(self.kernel))

    def _inject(self, x):
        return keras.ops.matmul(x, self.injection_kernel)

    def operator_norm(self):
        """`||W||_2` of the current kernel (exact)."""
        return tf.linalg.svd(tf.convert_to_tensor(self.kernel), compute_uv=False)[0]


@keras.saving.register_keras_serializable(package="keras_deq")
class OptEqConvUnit(_OptEqUnit):
    """The convolutional OptEq unit: `W` a stride-1 "same" convolution.

    `W z` is a `kernel_size` x `kernel_size` convolution from the state's `m`
    channels to `units` (`n`) channels, and `W^T` its exact adjoint, the
    transposed convolution with the same kernel, back to `m` channels. `U x` is
    a convolution of the same size from the injection's channels. The operator
    norm of `W` on the state's spatial size is capped at `max_norm` by
    `ConvSpectralNorm` (an upper bound, so the cap holds exactly).

    Args:
        units: `n`, the channels of `W z`.
        kernel_size: Odd kernel size (3 in the paper).
        alpha, learnable_alpha, activation, max_norm, injection_initializer:
            As for `OptEqDenseUnit`.
        kernel_initializer: Initializer of `W`; small by default (variance
            scaling 0.1, fan-in).
        **kwargs: Base layer arguments.

    Example:

    ```python
    unit = OptEqConvUnit(32, alpha=0.8)
    z_next = unit(z, x)  # z: (batch, H, W, m), x: (batch, H, W, d)
    ```
    """

    def __init__(self, units, kernel_size=3, **kwargs):
        super().__init__(units, **kwargs)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(
                f"`kernel_size` must be odd (same padding). Received: kernel_size={kernel_size!r}"
            )

    def _default_kernel_initializer(self):
        return keras.initializers.VarianceScaling(0.1, "fan_in", "truncated_normal")

    def build(self, z_shape, x_shape):
        if len(z_shape) != 4 or len(x_shape) != 4:
            raise ValueError(
                "OptEqConvUnit needs (batch, height, width, channels) inputs. "
                f"Received: z_shape={z_shape}, x_shape={x_shape}"
            )
        k = self.kernel_size
        spatial = tuple(z_shape[1:3])
        if any(d is None for d in spatial):
            spatial = DEFAULT_SPATIAL_SHAPE
        self.spatial_shape = spatial
        self.kernel = self.add_weight(
            name="kernel",
            shape=(k, k, z_shape[-1], self.units),
            initializer=self.kernel_initializer,
            constraint=ConvSpectralNorm(self.max_norm, spatial) if self.max_norm else None,
        )
        self.injection_kernel = self.add_weight(
            name="injection_kernel",
            shape=(k, k, x_shape[-1], self.units),
            initializer=self.injection_initializer,
        )
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
        self._add_alpha()
        self._cap_initial_kernel()

    def _apply(self, z):
        return tf.nn.conv2d(z, self.kernel, 1, "SAME")

    def _adjoint(self, h, z):
        return tf.nn.conv2d_transpose(h, self.kernel, tf.shape(z), 1, "SAME")

    def _inject(self, x):
        return tf.nn.conv2d(x, self.injection_kernel, 1, "SAME")

    def operator_norm(self):
        """An upper bound on the conv's operator norm on `spatial_shape` inputs."""
        return same_conv_norm_bound(tf.convert_to_tensor(self.kernel), self.spatial_shape)

    def get_config(self):
        config = super().get_config()
        config["kernel_size"] = self.kernel_size
        return config


# ------------------------------------------------------------------ deep OptEq cell
@keras.saving.register_keras_serializable(package="keras_deq")
class OptEqCell(keras.layers.Layer):
    """The deep OptEq map `T(z, x) = f_L o ... o f_1 (T_R(z), x)` (Eq. 5-6).

    Each `f_l` is a relaxed OptEq unit with its own `W_l`, `U_l`, `b_l`
    (`OptEqDenseUnit` or `OptEqConvUnit`); `T_R` is the structural prior's
    operator (Theorem 4), the identity when `prior` is None. Use it as a
    `keras_deq.DEQ` cell, `cell(z, x)`, or through `OptEqBlock`. The state and
    the injection share a shape (the paper starts the iteration at `z0 = x`).

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
    z_star = keras_deq.DEQ(cell)(x)  # zeros start; OptEqBlock starts at x
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
        self.units = _check_units(units)
        self.kind = _check_choice("kind", kind, KINDS)
        self.kernel_size = kernel_size
        self.learnable_alpha = check_bool("learnable_alpha", learnable_alpha)
        self.alpha = _check_alpha(alpha, self.learnable_alpha)
        self.activation = keras.activations.get(activation)
        self.max_norm = _check_max_norm(max_norm)
        if prior is not None:
            _check_choice("prior", prior, PRIORS)
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

    def compute_output_shape(self, z_shape, x_shape):
        return z_shape

    def alphas(self):
        """The current `alpha_l` of each unit (floats, or tensors when learnable)."""
        return [unit.alpha_value() for unit in self.unit_layers]

    def lipschitz_bound(self):
        """`prod_l (alpha_l ||W_l||^2 + 1 - alpha_l)` for the current weights.

        A bound on the Lipschitz constant of `T` without its prior, valid for a
        1-Lipschitz monotone activation and every `||W_l|| <= 1` (for conv units
        `||W_l||` is the operator-norm upper bound of `OptEqConvUnit`).
        """
        bound = tf.constant(1.0)
        for unit in self.unit_layers:
            alpha = tf.cast(unit.alpha_value(), tf.float32)
            norm = tf.cast(unit.operator_norm(), tf.float32)
            bound = bound * (alpha * tf.square(norm) + 1.0 - alpha)
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


# ------------------------------------------------------------------ the layer
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
        self.prior_mode = _check_choice("prior_mode", prior_mode, PRIOR_MODES)
        self.training_mode = _check_choice("training_mode", training_mode, TRAINING_MODES)
        self.unroll_steps = check_positive_int("unroll_steps", unroll_steps)
        if prior is not None:
            _check_choice("prior", prior, PRIORS)
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
        x = tf.convert_to_tensor(x, self.compute_dtype)
        z = self(x) if z is None else z
        diff = z - self.map(x)(z)
        axes = list(range(1, z.shape.rank))
        return tf.norm(tf.reshape(diff, [tf.shape(z)[0], -1]), axis=1) / (
            tf.sqrt(tf.reduce_sum(tf.square(z), axis=axes)) + 1e-12
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
