"""Multiscale DEQ cells (MDEQ) and the Lipschitz multiscale DEQ, as `DEQ` layers.

The state is a list of feature maps, one per branch: branch `i` has resolution
`(H / 2**i, W / 2**i)` and `channels[i]` channels. One call of the cell runs a
residual block on every branch (the injection `x` enters branch 0 only), fuses
the branches across resolutions, and applies a post-fusion step:

```
h_i = act(norm(conv3x3(z_i)))                       # expansion * channels[i] channels
o_i = norm(conv3x3(h_i) + [x if i == 0])
b_i = act(mix_alpha(z_i, o_i))                      # residual
y_i = mix_beta(b_i, {F_ij(b_j)}_{j != i})           # fusion
z_i+ = norm(conv1x1(act(y_i)))                      # post-fusion
```

`F_ij` goes down `k = i - j` levels with `k` stride-2 3x3 convs, each followed
by a norm, with `act` between them, and up `k = j - i` levels with a 1x1 conv,
a norm and a nearest-neighbour upsampling by `2**k`.

`MultiscaleCell` is MDEQ (Bai, Koltun, Kolter, 2020): `act = relu`, standard
group normalization, plain sums `mix_alpha = z_i + o_i`,
`mix_beta = b_i + sum_j F_ij(b_j)`. `LipschitzMultiscaleCell` is the Lipschitz
multiscale DEQ (Sato & Iiduka, 2026): a scaled ReLU `act = s * relu`, convex
mixes, mean-only group normalization with `|gamma| <= L_g`, and every conv's
operator norm capped at `L_c`, so that the cell is a contraction with a bound
computed by `lipschitz_bound()`.
"""

import math
import numbers

import keras
import numpy as np
import tensorflow as tf

from keras_deq import constraints
from keras_deq.layers.deq import DEQ
from keras_deq.solvers.common import (
    check_bool,
    check_fraction,
    check_positive_float,
    check_positive_int,
    get_keras_object,
)

NORMALIZATIONS = ("standard", "mean")
# Epsilon of the standard group normalization (PyTorch's GroupNorm default, as in MDEQ).
GROUP_NORM_EPSILON = 1e-5


# ------------------------------------------------------------------------ checks
def _check_channels(channels):
    if isinstance(channels, numbers.Integral) and not isinstance(channels, bool):
        channels = (channels,)
    if (
        not isinstance(channels, (tuple, list))
        or not channels
        or any(
            isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1 for c in channels
        )
    ):
        raise ValueError(
            "`channels` must be a non-empty list of positive ints, one per branch. "
            f"Received: channels={channels!r}"
        )
    return tuple(int(c) for c in channels)


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


# -------------------------------------------------------------- building blocks
def _scaled_relu(x, slope):
    out = keras.ops.relu(x)
    return out if slope == 1.0 else slope * out


@keras.saving.register_keras_serializable(package="keras_deq")
class ScaledReLU(keras.layers.Layer):
    """`slope * relu(x)`: a ReLU whose Lipschitz constant is `slope`.

    Args:
        slope: The scale `s > 0`.
        **kwargs: Base layer arguments.

    Examples:
        >>> import numpy as np
        >>> ScaledReLU(0.5)(np.array([-2.0, 2.0])).numpy().tolist()
        [0.0, 1.0]
    """

    def __init__(self, slope=1.0, **kwargs):
        super().__init__(**kwargs)
        self.slope = check_positive_float("slope", slope)

    def call(self, inputs):
        return _scaled_relu(inputs, self.slope)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "slope": self.slope}


@keras.saving.register_keras_serializable(package="keras_deq")
class MeanGroupNormalization(keras.layers.Layer):
    """Group normalization that only subtracts the group mean.

    `y = gamma * (x - mean_group(x)) + beta`, with the mean taken per sample
    over the spatial axes and the channels of each group. Without the division
    by the group's standard deviation, whose Jacobian is unbounded when the
    variance is small, the map is Lipschitz with constant `max|gamma|`:
    subtracting the group mean is an orthogonal projection (norm 1) and the
    per-channel scale has norm `max|gamma|`. Cap `gamma` with
    `keras_deq.constraints.MaxAbs` to cap the constant.

    Args:
        groups: Number of channel groups; must divide the channel count.
        center: If True, add the learned offset `beta`.
        scale: If True, multiply by the learned scale `gamma`.
        gamma_initializer: Initializer of `gamma`.
        beta_initializer: Initializer of `beta`.
        gamma_constraint: Optional constraint on `gamma`.
        **kwargs: Base layer arguments.

    Example:

    ```python
    norm = MeanGroupNormalization(4, gamma_constraint=keras_deq.constraints.MaxAbs(1.0))
    y = norm(x)  # x: (batch, H, W, C) with C divisible by 4
    ```
    """

    def __init__(
        self,
        groups=4,
        center=True,
        scale=True,
        gamma_initializer="ones",
        beta_initializer="zeros",
        gamma_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.groups = check_positive_int("groups", groups)
        self.center = check_bool("center", center)
        self.scale = check_bool("scale", scale)
        self.gamma_initializer = get_keras_object(
            "initializer", "gamma_initializer", gamma_initializer, default="ones"
        )
        self.beta_initializer = get_keras_object(
            "initializer", "beta_initializer", beta_initializer, default="zeros"
        )
        self.gamma_constraint = get_keras_object("constraint", "gamma_constraint", gamma_constraint)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None or channels % self.groups:
            raise ValueError(
                f"The channel count must be divisible by `groups`={self.groups}. "
                f"Received: input_shape={input_shape}"
            )
        self.gamma = None
        self.beta = None
        if self.scale:
            self.gamma = self.add_weight(
                name="gamma",
                shape=(channels,),
                initializer=self.gamma_initializer,
                constraint=self.gamma_constraint,
            )
        if self.center:
            self.beta = self.add_weight(
                name="beta", shape=(channels,), initializer=self.beta_initializer
            )

    def call(self, inputs):
        shape = tf.shape(inputs)
        channels = inputs.shape[-1]
        grouped = tf.reshape(inputs, [shape[0], -1, self.groups, channels // self.groups])
        centered = grouped - tf.reduce_mean(grouped, axis=[1, 3], keepdims=True)
        out = tf.reshape(centered, shape)
        if self.gamma is not None:
            out = out * self.gamma
        if self.beta is not None:
            out = out + self.beta
        return out

    def compute_output_shape(self, input_shape):
        return input_shape

    def lipschitz_constant(self):
        """`max|gamma|` (1 without `gamma`): the layer's Lipschitz constant."""
        if self.gamma is None:
            return tf.constant(1.0, self.variable_dtype)
        return tf.reduce_max(tf.abs(tf.convert_to_tensor(self.gamma)))

    def get_config(self):
        return {
            **super().get_config(),
            "groups": self.groups,
            "center": self.center,
            "scale": self.scale,
            "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
            "beta_initializer": keras.initializers.serialize(self.beta_initializer),
            "gamma_constraint": keras.constraints.serialize(self.gamma_constraint),
        }


class _Chain(keras.layers.Layer):
    """Layers applied in turn (a `Sequential` without a functional graph or input casts)."""

    def __init__(self, steps, **kwargs):
        super().__init__(**kwargs)
        self.steps = list(steps)

    def build(self, input_shape):
        shape = tuple(input_shape)
        for step in self.steps:
            step.build(shape)
            shape = tuple(step.compute_output_shape(shape))

    def call(self, inputs):
        for step in self.steps:
            inputs = step(inputs)
        return inputs

    def compute_output_shape(self, input_shape):
        for step in self.steps:
            input_shape = step.compute_output_shape(input_shape)
        return input_shape


def fusion_weights(num_branches, softmax=False):
    """The weights `w_ij` of the convex fusion, as nested lists of floats.

    With `softmax=False` every other branch gets `1 / (n - 1)`. With
    `softmax=True`, `w_i. = softmax_{j != i}(-penalty_ij)` where the penalty is
    the number of levels `j - i` of an upsampling path (coarser to finer) and 0
    for a downsampling path: upsampling by `2**k` multiplies norms by `2**k`,
    and `exp(-k) * 2**k < 1` offsets it. The diagonal is 0; each row sums to 1.

    Args:
        num_branches: Number of branches `n`.
        softmax: Whether to use the softmax weights.

    Returns:
        An `n x n` nested list.

    Examples:
        >>> [round(w, 3) for w in fusion_weights(3, softmax=True)[0]]
        [0.0, 0.731, 0.269]
    """
    rows = []
    for i in range(num_branches):
        others = [j for j in range(num_branches) if j != i]
        if softmax:
            scores = [math.exp(-(j - i)) if j > i else 1.0 for j in others]
        else:
            scores = [1.0] * len(others)
        total = sum(scores)
        row = [0.0] * num_branches
        for j, score in zip(others, scores, strict=True):
            row[j] = score / total
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- the cell
@keras.saving.register_keras_serializable(package="keras_deq")
class MultiscaleCell(keras.layers.Layer):
    """The multiscale DEQ (MDEQ) cell: residual blocks per resolution, then fusion.

    The state `z` is a list of `len(channels)` maps, `z[i]` of shape
    `(batch, H / 2**i, W / 2**i, channels[i])`; the injection `x` (e.g. the
    output of a convolutional stem) has the shape of `z[0]`. `H` and `W` must be
    divisible by `2**(len(channels) - 1)`. One call (see the module docstring):

    - Residual block per branch: `b_i = relu(z_i + norm(conv(relu(norm(conv(z_i)))) + x_i))`
      with 3x3 convs, `x_0 = x` and no injection on the other branches.
    - Fusion: `y_i = b_i + sum_{j != i} F_ij(b_j)`, down by strided 3x3 convs
      (one per factor 2), up by a 1x1 conv and nearest upsampling.
    - Post-fusion: `z_i+ = norm(conv1x1(relu(y_i)))`.

    Every norm is a `keras.layers.GroupNormalization`; convs have no bias (a
    norm follows each). Nothing bounds the cell's Lipschitz constant, so the
    solver may need many iterations; see `LipschitzMultiscaleCell`.

    Args:
        channels: Channels per branch, finest resolution first; its length is
            the number of branches.
        expansion: The block's inner conv has `expansion * channels[i]`
            channels (MDEQ uses 5).
        groups: Groups of every group normalization; must divide every
            channel count.
        kernel_initializer: Initializer of the conv kernels (None: `"glorot_uniform"`).
        **kwargs: Base layer arguments.

    Example:

    ```python
    cell = MultiscaleCell(channels=(8, 16))
    z_next = cell([z0, z1], x)  # z0, x: (batch, 8, 8, 8); z1: (batch, 4, 4, 16)
    ```
    """

    # The structure of the plain MDEQ cell; `LipschitzMultiscaleCell` changes them.
    slope = 1.0
    alpha = 0.0
    beta = 0.0
    softmax_weights = False
    normalization = "standard"
    conv_norm_cap = None
    gamma_cap = None
    norm_iterations = 20

    def __init__(
        self,
        channels=(8, 16),
        expansion=1,
        groups=4,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.channels = _check_channels(channels)
        self.expansion = check_positive_int("expansion", expansion)
        self.groups = check_positive_int("groups", groups)
        for c in self.channels:
            if c % self.groups:
                raise ValueError(
                    f"Every channel count must be divisible by `groups`={self.groups}. "
                    f"Received: channels={self.channels}"
                )
        self.kernel_initializer = get_keras_object(
            "initializer", "kernel_initializer", kernel_initializer, default="glorot_uniform"
        )

    @property
    def num_branches(self):
        return len(self.channels)

    # ------------------------------------------------------------------ shapes
    def state_shapes(self, input_shape):
        """The branch shapes (without batch) for an injection of `input_shape`.

        Args:
            input_shape: The injection's shape `(batch, H, W, channels[0])`.

        Returns:
            A list of `(H / 2**i, W / 2**i, channels[i])` tuples.
        """
        input_shape = tuple(input_shape)
        factor = 2 ** (self.num_branches - 1)
        if (
            len(input_shape) != 4
            or input_shape[-1] != self.channels[0]
            or any(d is None or d % factor for d in input_shape[1:3])
        ):
            raise ValueError(
                f"The injection must have shape (batch, H, W, channels[0]={self.channels[0]}) "
                f"with H and W known and divisible by 2**(branches - 1) = {factor}. "
                f"Received: input_shape={input_shape}"
            )
        height, width = input_shape[1:3]
        return [(height // 2**i, width // 2**i, c) for i, c in enumerate(self.channels)]

    # ------------------------------------------------------------------- build
    def _conv(self, filters, kernel_size, strides, input_size):
        constraint = None
        if self.conv_norm_cap is not None:
            constraint = constraints.ConvOperatorNorm(self.conv_norm_cap, input_size, strides)
        return keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_initializer=self.kernel_initializer,
            kernel_constraint=constraint,
            dtype=self.dtype_policy,
        )

    def _norm(self):
        constraint = None if self.gamma_cap is None else constraints.MaxAbs(self.gamma_cap)
        if self.normalization == "mean":
            return MeanGroupNormalization(
                self.groups, gamma_constraint=constraint, dtype=self.dtype_policy
            )
        return keras.layers.GroupNormalization(
            self.groups,
            epsilon=GROUP_NORM_EPSILON,
            gamma_constraint=constraint,
            dtype=self.dtype_policy,
        )

    def _act(self):
        return ScaledReLU(self.slope, dtype=self.dtype_policy)

    def _chain(self, layers, input_shape, name):
        chain = _Chain(layers, dtype=self.dtype_policy, name=name)
        chain.build((None, *input_shape))
        return chain

    def build(self, z_shape, x_shape):
        shapes = self.state_shapes(x_shape)
        given = [tuple(s[1:]) for s in z_shape] if isinstance(z_shape, (list, tuple)) else None
        if given != shapes:
            raise ValueError(
                f"The state must be a list of {self.num_branches} maps of shapes {shapes} "
                f"(without batch) for an injection of shape {tuple(x_shape)}. "
                f"Received: z_shape={z_shape}"
            )
        self._sizes = [s[:2] for s in shapes]
        self.block_inner = [self._make_block(i) for i in range(self.num_branches)]
        self.block_norms = []
        for i, c in enumerate(self.channels):
            norm = self._norm()
            norm.build((None, *self._sizes[i], c))
            self.block_norms.append(norm)
        self.fusions = [self._make_fusion(i, j) for i, j in self._pairs()]
        self.post_fusion = [
            self._chain(
                [self._act(), self._conv(c, 1, 1, self._sizes[i]), self._norm()],
                (*self._sizes[i], c),
                name=f"post_fusion_{i}",
            )
            for i, c in enumerate(self.channels)
        ]
        with tf.init_scope():  # once, eagerly, even if built while tracing a function
            self.apply_constraints()

    def _make_block(self, i):
        """conv3x3 -> norm -> act -> conv3x3 on branch `i` (the norm after it is apart)."""
        c, size = self.channels[i], self._sizes[i]
        inner = self.expansion * c
        return self._chain(
            [self._conv(inner, 3, 1, size), self._norm(), self._act(), self._conv(c, 3, 1, size)],
            (*size, c),
            name=f"block_{i}",
        )

    def _make_fusion(self, i, j):
        """The path `F_ij` from branch `j` to branch `i`."""
        in_channels, out_channels = self.channels[j], self.channels[i]
        if j > i:  # coarser to finer: 1x1 conv, norm, upsample
            layers = [
                self._conv(out_channels, 1, 1, self._sizes[j]),
                self._norm(),
                keras.layers.UpSampling2D(2 ** (j - i), dtype=self.dtype_policy),
            ]
            return self._chain(layers, (*self._sizes[j], in_channels), name=f"up_{j}_to_{i}")
        layers = []
        for level in range(j, i):  # finer to coarser: one strided conv per level
            last = level == i - 1
            layers += [
                self._conv(out_channels if last else in_channels, 3, 2, self._sizes[level]),
                self._norm(),
            ]
            if not last:
                layers.append(self._act())
        return self._chain(layers, (*self._sizes[j], in_channels), name=f"down_{j}_to_{i}")

    def _pairs(self):
        """The ordered pairs `(i, j)`, `i != j`, in the order of `self.fusions`."""
        n = self.num_branches
        return [(i, j) for i in range(n) for j in range(n) if i != j]

    def apply_constraints(self):
        """Applies every weight's constraint now (Keras does it after optimizer steps).

        Called at the end of `build` so that a freshly initialized cell already
        satisfies its caps; call it again after editing weights by hand or after
        an optimizer step that bypasses Keras' `optimizer.apply`.
        """
        for variable in self.weights:
            if variable.constraint is not None:
                variable.assign(variable.constraint(variable))

    # -------------------------------------------------------------------- call
    def _mix_residual(self, z, out):
        if self.alpha > 0:
            return (1.0 - self.alpha) * z + self.alpha * out
        return z + out

    def _mix_fusion(self, i, own, others):
        """`own` is `b_i`; `others` maps `j` to `F_ij(b_j)`."""
        if not others:
            return own
        if self.beta > 0:
            weights = fusion_weights(self.num_branches, self.softmax_weights)[i]
            return (1.0 - self.beta) * own + self.beta * tf.add_n(
                [weights[j] * term for j, term in others.items()]
            )
        return tf.add_n([own, *others.values()])

    def call(self, z, x, training=None):
        blocks = []
        for i, z_i in enumerate(z):
            h = self.block_inner[i](z_i)
            out = self.block_norms[i](h + x if i == 0 else h)
            blocks.append(_scaled_relu(self._mix_residual(z_i, out), self.slope))
        fused = []
        for i in range(self.num_branches):
            others = {
                j: self.fusions[k](blocks[j])
                for k, (target, j) in enumerate(self._pairs())
                if target == i
            }
            fused.append(self._mix_fusion(i, blocks[i], others))
        return [post(y) for post, y in zip(self.post_fusion, fused, strict=True)]

    def compute_output_shape(self, z_shape, x_shape):
        return z_shape

    # ---------------------------------------------------------------- lipschitz
    def _chain_lipschitz(self, layers, size):
        """Product of the Lipschitz constants of `layers` applied in turn at `size`."""
        total = tf.constant(1.0, self.variable_dtype)
        for layer in layers:
            if isinstance(layer, keras.layers.Conv2D):
                kernel = tf.convert_to_tensor(layer.kernel)
                factor = constraints.conv_operator_norm_upper(
                    kernel, size, layer.strides, layer.padding
                )
                size = tuple(-(-d // s) for d, s in zip(size, layer.strides, strict=True))
            elif isinstance(layer, MeanGroupNormalization):
                factor = layer.lipschitz_constant()
            elif isinstance(layer, keras.layers.GroupNormalization):
                factor = tf.constant(math.inf, self.variable_dtype)
            elif isinstance(layer, ScaledReLU):
                factor = tf.constant(layer.slope, self.variable_dtype)
            elif isinstance(layer, keras.layers.UpSampling2D):
                # Each pixel is copied sy * sx times: norms grow by sqrt(sy * sx).
                factor = tf.constant(math.sqrt(layer.size[0] * layer.size[1]), self.variable_dtype)
                size = tuple(d * s for d, s in zip(size, layer.size, strict=True))
            else:  # pragma: no cover - every layer built above is listed
                raise TypeError(f"No Lipschitz constant for layer {layer!r}")
            total = total * tf.cast(factor, self.variable_dtype)
        return total

    def _block_constant(self, inner):
        """`L_B` of a residual block whose inner path has constant `inner`."""
        mixed = (1.0 - self.alpha) + self.alpha * inner if self.alpha > 0 else 1.0 + inner
        return self.slope * mixed

    def _bound_rows(self, blocks, paths, posts):
        """The rows of `diag(L_P) C diag(L_B)` (see `lipschitz_bound`)."""
        n, beta = self.num_branches, self.beta
        weights = fusion_weights(n, self.softmax_weights)
        rows = []
        for i in range(n):
            row = []
            for j in range(n):
                if i == j:
                    mix = 1.0 - beta if beta > 0 and n > 1 else 1.0
                    row.append(posts[i] * mix * blocks[j])
                else:
                    mix = beta * weights[i][j] if beta > 0 else 1.0
                    row.append(posts[i] * mix * paths[(i, j)] * blocks[j])
            rows.append(row)
        return rows

    def lipschitz_bound(self, iterations=None):
        """An upper bound of the cell's Lipschitz constant in `z`, from its weights.

        Norms are Euclidean over the whole state (all branches). For each
        layer the bound uses an upper bound of its current constant: a conv's
        certified operator-norm bound on its input size
        (`keras_deq.constraints.conv_operator_norm_upper`), `max|gamma|`
        of a mean-only norm, `s` of the activation, `2**k` of a nearest
        upsampling by `2**k`. A standard group normalization has no finite
        constant, so the bound is `inf` with `normalization="standard"`.

        Derivation (for one call, with `Lip(.)` the constants of the layers):

        1. Block of branch `i`: the inner path `z_i -> o_i` is
           `conv -> norm -> act -> conv -> norm` (the injection adds a constant),
           so `L_in,i <= c2 g2 s g1 c1`. The residual mix is
           `(1 - alpha) z_i + alpha o_i` (or `z_i + o_i` when `alpha = 0`), and
           then `act`: `L_B,i = s ((1 - alpha) + alpha L_in,i)`, or
           `s (1 + L_in,i)` when `alpha = 0`.
        2. Fusion paths: down `k` levels, `L_F <= prod_m (c_m g_m) s^(k-1)`; up
           `k` levels, `L_F <= c g 2^k`.
        3. With `C_ii = 1 - beta` and `C_ij = beta w_ij L_F(i, j)` (or 1 and
           `L_F(i, j)` when `beta = 0`), the triangle inequality gives
           `||dy_i|| <= sum_j C_ij L_B,j ||dz_j||`; `C >= 0`, so
           `||dy|| <= ||C diag(L_B)||_2 ||dz||`.
        4. Post-fusion `act -> conv1x1 -> norm`: `L_P,i = g_p c_p s`.

        Altogether `Lip(f) <= ||diag(L_P) C diag(L_B)||_2`. With the caps
        (`c <= L_c`, `g <= L_g`) this is at most
        `s L_c L_g * s [(1 - alpha) + alpha s L_g^2 L_c^2] * ||C||_2`, e.g.
        0.69 for the `LipschitzMultiscaleCell` defaults with two branches.
        Every factor is an upper bound (the conv norms too, unlike a Krylov
        estimate), so this is a bound, not an estimate.

        Args:
            iterations: Unused (the conv bounds need no iterations); kept for
                existing code.

        Returns:
            A scalar tensor (the cell's variable dtype); `inf` with a standard
            group normalization.
        """
        if not self.built:
            raise ValueError("The cell must be built (called once) before `lipschitz_bound()`.")
        blocks = [
            self._block_constant(self._chain_lipschitz([*inner.steps, norm], size))
            for inner, norm, size in zip(
                self.block_inner, self.block_norms, self._sizes, strict=True
            )
        ]
        paths = {
            pair: self._chain_lipschitz(path.steps, self._sizes[pair[1]])
            for pair, path in zip(self._pairs(), self.fusions, strict=True)
        }
        posts = [
            self._chain_lipschitz(post.steps, size)
            for post, size in zip(self.post_fusion, self._sizes, strict=True)
        ]
        matrix = tf.stack([tf.stack(row) for row in self._bound_rows(blocks, paths, posts)])
        if not bool(tf.reduce_all(tf.math.is_finite(matrix))):
            return tf.constant(math.inf, self.variable_dtype)
        return tf.linalg.svd(matrix, compute_uv=False)[0]

    # ------------------------------------------------------------------ config
    def get_config(self):
        return {
            **super().get_config(),
            "channels": list(self.channels),
            "expansion": self.expansion,
            "groups": self.groups,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }


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
    (`keras_deq.constraints.conv_operator_norm_upper`), so `lipschitz_bound()`
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


# -------------------------------------------------------------------- DEQ layers
class _MultiscaleDEQBase(DEQ):
    """A `DEQ` that builds its multiscale cell and infers the branch shapes."""

    cell_class = MultiscaleCell
    # The cell's constructor arguments that the layer takes and reports in get_config.
    cell_keys = ("channels", "expansion", "groups", "kernel_initializer")

    def __init__(self, cell_config, **kwargs):
        cell = self.cell_class(**cell_config, dtype=kwargs.get("dtype"), name="cell")
        super().__init__(cell, **kwargs)

    def build(self, input_shape):
        if self.state_shape is None:
            self.state_shape = self.cell.state_shapes(input_shape)
        super().build(input_shape)

    def compute_output_shape(self, input_shape):
        return [(input_shape[0], *s) for s in self.cell.state_shapes(input_shape)]

    def get_config(self):
        config = super().get_config()
        cell_config = config.pop("cell")["config"]
        config.update({key: cell_config[key] for key in self.cell_keys})
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_deq")
class MultiscaleDEQ(_MultiscaleDEQBase):
    """A multiscale DEQ (MDEQ) layer: the fixed point of a `MultiscaleCell`.

    The input is the injection, `(batch, H, W, channels[0])` (e.g. a conv
    stem's output). The output is the list of branch states at the fixed point,
    `[(batch, H / 2**i, W / 2**i, channels[i]) for each branch]`, starting from
    zeros. Solving, gradients, statistics and regularization are `DEQ`'s.

    Args:
        channels: Channels per branch, finest resolution first.
        expansion: Inner channels of each block are `expansion * channels[i]`.
        groups: Groups of every group normalization.
        kernel_initializer: Initializer of the conv kernels (None: `"glorot_uniform"`).
        **kwargs: `DEQ` arguments (`solver`, `max_iter`, `tol`, `backward`,
            `jacobian_weight`, ...) and base layer arguments. `state_shape` is
            inferred from the input.

    Example:

    ```python
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    z0, z1 = MultiscaleDEQ(channels=(8, 16), solver="anderson", max_iter=18)(x)
    features = keras.layers.Concatenate()(
    [keras.layers.GlobalAveragePooling2D()(z) for z in (z0, z1)]
    )
    model = keras.Model(inputs, keras.layers.Dense(10)(features))
    ```
    """

    cell_class = MultiscaleCell

    def __init__(
        self, channels=(8, 16), expansion=1, groups=4, kernel_initializer="glorot_uniform", **kwargs
    ):
        cell_config = {
            "channels": channels,
            "expansion": expansion,
            "groups": groups,
            "kernel_initializer": kernel_initializer,
        }
        super().__init__(cell_config, **kwargs)


@keras.saving.register_keras_serializable(package="keras_deq")
class LipschitzMultiscale(_MultiscaleDEQBase):
    """The Lipschitz multiscale DEQ layer: the fixed point of a `LipschitzMultiscaleCell`.

    Input and output as in `MultiscaleDEQ`: the injection of shape
    `(batch, H, W, channels[0])` in, the list of branch states out. The cell
    is a contraction with constant `layer.cell.lipschitz_bound()` (< 1 for
    every configuration the constructor accepts with `conv_norm_cap` set, kept
    so by its weight constraints), so the fixed point is unique and the
    forward and backward solves converge; the paper's recipe is Anderson with
    `max_iter=18`, `backward_max_iter=20`, `tol=1e-3`. See
    `LipschitzMultiscaleCell` for the refused configurations and the
    differences from the paper's code.

    Args:
        channels: Channels per branch, finest resolution first.
        slope: The ReLU scale `s` in (0, 1].
        alpha: Residual mix in [0, 1] (0: plain sum).
        beta: Fusion mix in [0, 1] (0: plain sum).
        softmax_weights: Softmax fusion weights penalizing upsampling.
        normalization: `"mean"` or `"standard"` group normalization.
        conv_norm_cap: The cap `L_c` on every conv's operator norm, or None
            (no caps, no guarantee).
        gamma_cap: The cap `L_g` on every `|gamma|`; None only without `conv_norm_cap`.
        norm_iterations: Unused; kept so that existing code and saved configs load.
        expansion: Inner channels of each block are `expansion * channels[i]`.
        groups: Groups of every group normalization.
        kernel_initializer: Initializer of the conv kernels (None: `"glorot_uniform"`).
        **kwargs: `DEQ` arguments and base layer arguments.

    Example:

    ```python
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    deq = LipschitzMultiscale(channels=(8, 16), max_iter=18, backward_max_iter=20, tol=1e-3)
    z0, z1 = deq(x)
    ```
    """

    cell_class = LipschitzMultiscaleCell
    cell_keys = (
        *_MultiscaleDEQBase.cell_keys,
        "slope",
        "alpha",
        "beta",
        "softmax_weights",
        "normalization",
        "conv_norm_cap",
        "gamma_cap",
        "norm_iterations",
    )

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
        cell_config = {
            "channels": channels,
            "slope": slope,
            "alpha": alpha,
            "beta": beta,
            "softmax_weights": softmax_weights,
            "normalization": normalization,
            "conv_norm_cap": conv_norm_cap,
            "gamma_cap": gamma_cap,
            "norm_iterations": norm_iterations,
            "expansion": expansion,
            "groups": groups,
            "kernel_initializer": kernel_initializer,
        }
        super().__init__(cell_config, **kwargs)
