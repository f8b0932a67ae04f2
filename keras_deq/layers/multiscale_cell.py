"""`MultiscaleCell`: the multiscale DEQ (MDEQ) cell of Bai, Koltun and Kolter (2020).

Residual blocks per resolution, fusion across resolutions, a post-fusion step (see
`keras_deq.layers.multiscale` for the equations), and an upper bound of the cell's
Lipschitz constant from its weights (`lipschitz_bound`). `LipschitzMultiscaleCell`
reuses it with its hyper-parameters changed.
"""

import functools
import math
import numbers
import operator

import keras
from keras import ops

from keras_deq import backend, constraints, linalg
from keras_deq.layers.cell import Cell
from keras_deq.layers.multiscale_blocks import (
    MeanGroupNormalization,
    ScaledReLU,
    _Chain,
    _scaled_relu,
    fusion_weights,
)
from keras_deq.solvers.common import check_positive_int, get_keras_object

# Epsilon of the standard group normalization (PyTorch's GroupNorm default, as in MDEQ).
GROUP_NORM_EPSILON = 1e-5


def _add_n(terms):
    """The sum of `terms`, left to right (as `tf.add_n` sums them)."""
    return functools.reduce(operator.add, terms)


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


@keras.saving.register_keras_serializable(package="keras_deq")
class MultiscaleCell(Cell):
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
    def state_shape(self, input_shape):
        """The branch shapes (without batch) for an injection of `input_shape`.

        A `keras_deq.DEQ` of this cell infers its state's shape from it.

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

    def state_shapes(self, input_shape):
        """The former name of `state_shape`."""
        return self.state_shape(input_shape)

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
        shapes = self.state_shape(x_shape)
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
        with backend.init_scope():  # once, eagerly, even if built while tracing a function
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
            return (1.0 - self.beta) * own + self.beta * _add_n(
                [weights[j] * term for j, term in others.items()]
            )
        return _add_n([own, *others.values()])

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

    # ---------------------------------------------------------------- lipschitz
    def _chain_lipschitz(self, layers, size):
        """Product of the Lipschitz constants of `layers` applied in turn at `size`."""
        dtype = self.variable_dtype
        total = ops.convert_to_tensor(1.0, dtype)
        for layer in layers:
            if isinstance(layer, keras.layers.Conv2D):
                kernel = ops.convert_to_tensor(layer.kernel)
                factor = linalg.conv_operator_norm_upper(kernel, size, layer.strides, layer.padding)
                size = tuple(-(-d // s) for d, s in zip(size, layer.strides, strict=True))
            elif isinstance(layer, MeanGroupNormalization):
                factor = layer.lipschitz_constant()
            elif isinstance(layer, keras.layers.GroupNormalization):
                factor = ops.convert_to_tensor(math.inf, dtype)
            elif isinstance(layer, ScaledReLU):
                factor = ops.convert_to_tensor(layer.slope, dtype)
            elif isinstance(layer, keras.layers.UpSampling2D):
                # Each pixel is copied sy * sx times: norms grow by sqrt(sy * sx).
                factor = ops.convert_to_tensor(math.sqrt(layer.size[0] * layer.size[1]), dtype)
                size = tuple(d * s for d, s in zip(size, layer.size, strict=True))
            else:  # pragma: no cover - every layer built above is listed
                raise TypeError(f"No Lipschitz constant for layer {layer!r}")
            total = total * ops.cast(factor, dtype)
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
        (`keras_deq.linalg.conv_operator_norm_upper`), `max|gamma|`
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
        matrix = ops.stack([ops.stack(row) for row in self._bound_rows(blocks, paths, posts)])
        finite = ops.all(ops.isfinite(matrix))
        # A graph-safe `inf if not finite else norm`: the norm of a finite stand-in.
        norm = linalg.dense_spectral_norm_exact(ops.where(finite, matrix, ops.zeros_like(matrix)))
        return ops.where(finite, norm, ops.convert_to_tensor(math.inf, matrix.dtype))

    # ------------------------------------------------------------------ config
    def get_config(self):
        return {
            **super().get_config(),
            "channels": list(self.channels),
            "expansion": self.expansion,
            "groups": self.groups,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }
