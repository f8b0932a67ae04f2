"""`LipschitzMultiscaleCell`: the multiscale cell restructured into a contraction.

The Lipschitz multiscale DEQ of Sato & Iiduka (2026): a scaled ReLU, convex mixes,
mean-only group normalization with `|gamma|` capped and every conv's operator norm
capped (weight constraints of `keras_deq.constraints`), so that the cell's Lipschitz
bound is below 1. The constructor refuses caps whose bound could reach 1.
"""

import math
import numbers

import keras
import numpy as np

from keras_deq.layers.multiscale_cell import MultiscaleCell
from keras_deq.solvers.common import check_bool, check_fraction, check_positive_int

NORMALIZATIONS = ("standard", "mean")


def _check_unit_interval(name, value):
    """A number in [0, 1] (`common.check_fraction` is for (0, 1])."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"`{name}` must be a number in [0, 1]. Received: {name}={value!r}")
    return float(value)


def _check_optional_cap(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number or None. Received: {name}={value!r}")
    return float(value)


@keras.saving.register_keras_serializable(package="keras_deq")
class LipschitzMultiscaleCell(MultiscaleCell):
    """The multiscale cell restructured into a contraction (Lipschitz MDEQ).

    The same layers as `MultiscaleCell`, changed in five ways (Sato & Iiduka,
    2026):

    1. Scaled ReLU `act(v) = s * relu(v)` everywhere (slope `s`).
    2. Convex residual `b_i = act((1 - alpha) z_i + alpha o_i)`.
    3. Convex fusion `y_i = (1 - beta) b_i + beta sum_{j != i} w_ij F_ij(b_j)`,
       with `w_ij` from `fusion_weights` (softmax penalizing upsampling paths,
       or uniform).
    4. Mean-only group normalization (`MeanGroupNormalization`) with
       `|gamma| <= L_g` (`gamma_cap`, a `MaxAbs` constraint).
    5. Every conv's operator norm on its input size capped at `L_c`
       (`conv_norm_cap`, a `ConvOperatorNorm` constraint).

    The constraints are applied at build and by Keras after every optimizer
    step, and the conv caps are certified upper bounds
    (`keras_deq.linalg.conv_operator_norm_upper`), so `lipschitz_bound()`
    never exceeds its value with every constant at its cap. The constructor
    refuses (`ValueError`) caps whose bound would be `>= 1`, e.g. four branches
    with uniform fusion weights at the default caps (1.02), and capped convs
    with a standard group norm or uncapped `gamma`. So every capped cell is a
    contraction throughout training: the forward fixed point is unique, and
    fixed-point iteration converges linearly in both passes (the backward map
    `u -> J^T u + g` has `||J^T|| <= lipschitz_bound()`).
    `conv_norm_cap=None` gives an unconstrained cell with no such guarantee.

    `alpha = 0` and `beta = 0` switch the mixes off, giving MDEQ's plain sums
    `z_i + o_i` and `b_i + sum_j F_ij(b_j)` (not the degenerate `b_i = act(z_i)`
    the convex formula would give). So `slope=1, alpha=0, beta=0,
    normalization="standard"` with no caps is exactly `MultiscaleCell`.

    Differences from the paper's code (iiduka-researches/Lipschitz_mdeq): no
    group norm after the residual (MDEQ's `GN_3`; the bound has one factor
    `L_g` fewer per block), no dropout (the paper's variational dropout 0.3
    would multiply the training-time bound by up to `1 / 0.7`), no GroupSort
    option (the scaled ReLU everywhere), no weight normalization, the
    post-fusion norm keeps its affine `gamma` (capped), and the caps are on
    certified bounds of the convs' operator norms, not on the reshaped
    kernels' spectral norms (which under-estimate a 3x3 conv by up to 3x).

    Args:
        channels: Channels per branch, finest resolution first.
        slope: The ReLU scale `s` in (0, 1].
        alpha: Residual mix in [0, 1]; 0 is the plain sum.
        beta: Fusion mix in [0, 1]; 0 is the plain sum.
        softmax_weights: If True, softmax fusion weights penalizing upsampling
            paths; otherwise `1 / (branches - 1)`.
        normalization: `"mean"` (mean-only, Lipschitz) or `"standard"` group
            normalization.
        conv_norm_cap: The cap `L_c` on every conv's operator norm, or None
            (no caps, no guarantee). The bound at the caps must be below 1.
        gamma_cap: The cap `L_g` on every `|gamma|`; None only without
            `conv_norm_cap`.
        norm_iterations: Unused (the conv bounds need no iterations); kept so
            that existing code and saved configs load.
        expansion: Inner channels of the block are `expansion * channels[i]`.
        groups: Groups of every group normalization.
        kernel_initializer: Initializer of the conv kernels (None: `"glorot_uniform"`).
        **kwargs: Base layer arguments.

    Example:

    ```python
    cell = LipschitzMultiscaleCell(channels=(8, 16))
    z_next = cell([z0, z1], x)
    float(cell.lipschitz_bound())  # 0.69 at most (0.4 * 2 * 0.52 * ||C||_2)
    ```
    """

    def __init__(
        self,
        channels=(8, 16),
        slope=0.4,
        alpha=0.5,
        beta=0.3,
        softmax_weights=True,
        normalization="mean",
        conv_norm_cap=2.0,
        gamma_cap=1.0,
        norm_iterations=20,
        expansion=1,
        groups=4,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(
            channels=channels,
            expansion=expansion,
            groups=groups,
            kernel_initializer=kernel_initializer,
            **kwargs,
        )
        self.slope = check_fraction("slope", slope)
        self.alpha = _check_unit_interval("alpha", alpha)
        self.beta = _check_unit_interval("beta", beta)
        self.softmax_weights = check_bool("softmax_weights", softmax_weights)
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"`normalization` must be one of {NORMALIZATIONS}. "
                f"Received: normalization={normalization!r}"
            )
        self.normalization = normalization
        self.conv_norm_cap = _check_optional_cap("conv_norm_cap", conv_norm_cap)
        self.gamma_cap = _check_optional_cap("gamma_cap", gamma_cap)
        self.norm_iterations = check_positive_int("norm_iterations", norm_iterations)
        if self.conv_norm_cap is not None:
            self._check_contraction()

    def _cap_bound(self, conv_cap):
        """`lipschitz_bound()` with every conv norm at `conv_cap` and `|gamma|` at `gamma_cap`."""
        s = self.slope
        with np.errstate(over="ignore", invalid="ignore"):
            cg = np.float64(conv_cap) * self.gamma_cap
            paths = {
                (i, j): cg * 2.0 ** (j - i) if j > i else cg ** (i - j) * s ** (i - j - 1)
                for i, j in self._pairs()
            }
            n = self.num_branches
            rows = self._bound_rows([self._block_constant(s * cg**2)] * n, paths, [s * cg] * n)
            matrix = np.array(rows, dtype=np.float64)
        return float(np.linalg.norm(matrix, 2)) if np.isfinite(matrix).all() else math.inf

    def _check_contraction(self):
        """Refuses capped configurations that are not a contraction at their caps."""
        if self.normalization != "mean" or self.gamma_cap is None:
            received = (
                "gamma_cap=None" if self.normalization == "mean" else "normalization='standard'"
            )
            raise ValueError(
                "With `conv_norm_cap` set the cell must be a contraction, which needs "
                "normalization='mean' and a `gamma_cap` (a standard group norm, or an uncapped "
                "gamma, has no finite Lipschitz constant); pass conv_norm_cap=None for an "
                f"unconstrained cell. Received: {received}, "
                f"conv_norm_cap={self.conv_norm_cap}"
            )
        bound = self._cap_bound(self.conv_norm_cap)
        if bound < 1:
            return
        low, high = 0.0, min(self.conv_norm_cap, 1e6)  # the bound increases with the cap
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if self._cap_bound(mid) < 1 else (low, mid)
        hint = f" (e.g. conv_norm_cap={math.floor(low * 1e3) / 1e3})" if low >= 1e-3 else ""
        raise ValueError(
            f"The cell is not a contraction at its caps: `lipschitz_bound()` can reach {bound:.4g} "
            f">= 1. Lower `conv_norm_cap`{hint}, `gamma_cap` "
            "or `slope`, or change `alpha`, `beta` or `softmax_weights`. Received: "
            f"conv_norm_cap={self.conv_norm_cap}, gamma_cap={self.gamma_cap}, "
            f"slope={self.slope}, alpha={self.alpha}, beta={self.beta}, "
            f"softmax_weights={self.softmax_weights}, channels={self.channels}"
        )

    def get_config(self):
        return {
            **super().get_config(),
            "slope": self.slope,
            "alpha": self.alpha,
            "beta": self.beta,
            "softmax_weights": self.softmax_weights,
            "normalization": self.normalization,
            "conv_norm_cap": self.conv_norm_cap,
            "gamma_cap": self.gamma_cap,
            "norm_iterations": self.norm_iterations,
        }
