"""Functions of a batch of features: the priors and regularizers of OptEq, with gradients.

Each takes a `(batch, ..., features)` tensor. Every axis but the last indexes samples
(the spatial axes of a conv feature map too) for the batch-level statistics.

- `soft_threshold`: the prox of `threshold * ||z||_1`.
- `incay`, `incay_gradient`: the feature-incay prior, small when features are large.
- `decorrelation`, `decorrelation_gradient`: the feature decorrelation `F_Dz`
  (Xie et al., TPAMI 2023, Eq. 13), the squared cosines between features.
- `hsic`, `hsic_gradient`: the pairwise HSIC sum with Gaussian RBF kernels (Section 7.2.1).

The gradients are closed forms (the priors take gradient steps with them inside
solver loops). `keras_deq.layers.opteq_priors.FeaturePrior` turns these into the
priors of the OptEq layers, and `keras_deq.regularizers` into Keras regularizers.
"""

import keras
from keras import ops


def _as_matrix(z):
    """`z` as a `(samples, features)` matrix: features on the last axis."""
    return ops.reshape(z, (-1, ops.shape(z)[-1]))


def _sample_sq_norms(z):
    """Per-sample squared norms, shaped to broadcast against `z`."""
    axes = tuple(range(1, len(z.shape)))
    return ops.sum(ops.square(z), axis=axes, keepdims=True)


def soft_threshold(z, threshold):
    """`prox` of `threshold * ||z||_1`: `sign(z) * max(|z| - threshold, 0)`.

    Args:
        z: A tensor.
        threshold: A non-negative number.

    Returns:
        A tensor like `z`.

    Examples:
        >>> from keras import ops
        >>> ops.convert_to_numpy(soft_threshold(ops.convert_to_tensor([-2.0, 0.5, 3.0]), 1.0)).tolist()
        [-1.0, 0.0, 2.0]
    """
    return ops.sign(z) * ops.relu(ops.abs(z) - threshold)


def incay(z, epsilon=1.0):
    """The feature-incay prior `R(z) = sum_b 2 / (||z_b||^2 + 2 epsilon)`.

    Small when features are large: minimizing it expands the features.

    Args:
        z: A `(batch, ...)` tensor; each sample's norm is over all its features.
        epsilon: A positive number.

    Returns:
        A scalar tensor.
    """
    return ops.sum(2.0 / (_sample_sq_norms(z) + 2.0 * epsilon))


def incay_gradient(z, epsilon=1.0):
    """`grad R(z) = -4 z / (||z||^2 + 2 epsilon)^2`, per sample (see `incay`)."""
    return -4.0 * z / ops.square(_sample_sq_norms(z) + 2.0 * epsilon)


def _cosines(z, epsilon):
    """Unit feature columns `u` (samples, features), their norms, and `u^T u`."""
    matrix = _as_matrix(z)
    norms = ops.sqrt(ops.sum(ops.square(matrix), axis=0) + epsilon)
    unit = matrix / norms
    return unit, norms, ops.matmul(ops.transpose(unit), unit)


def _off_diagonal(square):
    return square - ops.diag(ops.diagonal(square))


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

    Examples:
        >>> from keras import ops
        >>> float(decorrelation(ops.convert_to_tensor([[1.0, 0.0], [0.0, 2.0]])))
        0.0
    """
    _, _, cos = _cosines(z, epsilon)
    return 0.5 * ops.sum(ops.square(_off_diagonal(cos)))


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
    pulled = 2.0 * ops.matmul(unit, _off_diagonal(cos))  # column i: 2 sum_j C_ij u_j
    radial = ops.sum(pulled * unit, axis=0, keepdims=True) * unit
    return ops.reshape((pulled - radial) / norms, ops.shape(z))


# `exp(-u)` is 0 in float64 (and in every float dtype) for u >= 746: capping the exponent
# there keeps it finite, so that neither the kernel nor its gradient is NaN.
_RBF_EXPONENT_CAP = 1000.0


def _dtype(t):
    return keras.backend.standardize_dtype(t.dtype)


def _smallest_normal(dtype):
    if dtype == "float16":
        return 2.0**-14
    return 2.0**-1022 if dtype == "float64" else 2.0**-126  # bfloat16 is float32's


def _rbf_compute(diff, sigma):
    """`(d, 2 sigma^2)` in the dtype the kernels are computed in, or None (see `hsic`).

    `2 sigma^2` is a Python float: 0 or subnormal when it underflows. Where it is not a
    normal number of `diff`'s dtype the kernels are computed in float64, and where it
    is not one of float64 either, None. (Where the backend computes float64 in float32,
    as Keras on JAX does, the float64 fallback is float32 too, and so None.)
    """
    denominator = 2.0 * sigma * sigma
    for compute_dtype in (_dtype(diff), "float64"):
        d = ops.cast(diff, compute_dtype)
        if denominator >= _smallest_normal(_dtype(d)):  # inf included
            return d, ops.convert_to_tensor(denominator, _dtype(d))
    return None


def _rbf_kernels(diff, sigma):
    """`exp(-diff^2 / (2 sigma^2))` without NaN for any `sigma > 0` (see `hsic`)."""
    compute = _rbf_compute(diff, sigma)
    if compute is None:
        # sigma < 1e-154: every kernel entry but those of equal samples is 0 in float64
        # unless two samples differ by less than about 40 sigma.
        return ops.cast(ops.equal(diff, 0), diff.dtype) + 0.0 * diff  # a zero gradient, not None
    d, denominator = compute
    exponent = ops.minimum(ops.square(d) / denominator, _RBF_EXPONENT_CAP)
    return ops.cast(ops.exp(-exponent), diff.dtype)


def _rbf_slopes_sum(diff, sigma, weights):
    """`sum_b weights[..., b] * k'(diff[..., b])`, `k' = -diff / sigma^2 * kernel`.

    Computed in the kernels' dtype (see `_rbf_compute`) and cast back, so that a
    float64 fallback does not overflow the input's dtype before the weighting.
    `d * kernel` is formed first: it is 0 where the exponent is capped (the kernel is
    0 there in every dtype), and `d / sigma^2` alone could overflow.
    """
    compute = _rbf_compute(diff, sigma)
    if compute is None:  # the kernels are `d == 0`: constant, so no slope
        return 0.0 * ops.sum(diff, axis=-1)
    d, denominator = compute
    exponent = ops.minimum(ops.square(d) / denominator, _RBF_EXPONENT_CAP)
    slopes = -2.0 * (d * ops.exp(-exponent)) / denominator
    total = ops.sum(ops.cast(weights, d.dtype) * slopes, axis=-1)
    return ops.cast(total, diff.dtype)


def _feature_differences(z):
    """`(features, samples)` matrix of `z` and its pairwise differences `d[i, a, b]`."""
    matrix = ops.transpose(_as_matrix(z))  # (features, samples)
    return matrix, matrix[:, :, None] - matrix[:, None, :]


def _centered_kernels(diff, sigma):
    """`Kc_i = H K_i H` for every feature `i`: `(features, samples, samples)`."""
    kernels = _rbf_kernels(diff, sigma)
    centered = kernels - ops.mean(kernels, axis=1, keepdims=True)
    return centered - ops.mean(centered, axis=2, keepdims=True)


def _hsic_scale(matrix):
    """`(B - 1)^2`, with `B - 1` floored at 1: one sample has zero centered kernels."""
    samples = ops.cast(ops.shape(matrix)[1], matrix.dtype)
    return ops.square(ops.maximum(samples - 1.0, 1.0))


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
    total = ops.sum(ops.square(ops.sum(centered, axis=0)))
    own = ops.sum(ops.square(centered))
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
    weights = (ops.sum(centered, axis=0, keepdims=True) - centered) / _hsic_scale(matrix)
    # The diagonal (d = 0, k'(0) = 0) adds nothing; zeroing its weight keeps the second
    # derivative, whose diagonal terms are ~1 / sigma^2 and cancel exactly, finite.
    weights = weights * (1.0 - ops.eye(ops.shape(matrix)[1], dtype=weights.dtype))
    gradient = 2.0 * _rbf_slopes_sum(diff, sigma, weights)  # (features, samples)
    return ops.reshape(ops.transpose(gradient), ops.shape(z))
