"""A causal Transformer block as a DEQ cell: `DEQTransformerCell`."""

import math
import numbers

import keras
from keras import ops

from keras_deq import backend
from keras_deq.layers.cell import Cell
from keras_deq.solvers.common import check_optional_positive_int, check_rate, get_keras_object

NORMS = ("pre", "post")


def sinusoidal_positions(length, d_model, dtype="float32"):
    """The sinusoidal position encoding of "Attention is all you need".

    Args:
        length: Number of positions (a Python int or a scalar tensor).
        d_model: Number of features (a positive int; with an odd `d_model` the last
            feature is 0).
        dtype: Output dtype.

    Returns:
        A `(length, d_model)` tensor: `sin` on even features, `cos` on odd ones.

    Example:

    ```python
    pe = sinusoidal_positions(16, 32)  # (16, 32)
    ```
    """
    positions = ops.cast(ops.arange(length), "float32")[:, None]
    half = d_model // 2
    rates = ops.exp(-math.log(10000.0) * ops.cast(ops.arange(half), "float32") * 2.0 / d_model)
    angles = positions * rates[None, :]
    # The explicit length: with d_model = 1 (half = 0) a -1 could not be inferred.
    shape = (ops.shape(positions)[0], 2 * half)
    pe = ops.reshape(ops.stack([ops.sin(angles), ops.cos(angles)], axis=-1), shape)
    if d_model % 2:
        pe = ops.pad(pe, [[0, 0], [0, 1]])
    return ops.cast(pe, dtype)


@keras.saving.register_keras_serializable(package="keras_deq")
class DEQTransformerCell(Cell):
    """A causal Transformer block `z_next = f(z, x)` for `keras_deq.DEQ`.

    The state `z` and the injection `x` both have shape `(batch, T, d_model)`.
    The injection (token embedding plus position encoding, added by the caller)
    enters every iteration, and it, not `z`, carries the residual stream, so
    that the map is close to a contraction at initialization:

    - `norm="pre"`:
      `h = x + Attn(LN1(z + x))`, `z_next = h + FFN(LN2(h))`.
    - `norm="post"`:
      `h = LN1(x + Attn(z + x))`, `z_next = LN2(h + FFN(h))`.

    `Attn` is `keras.layers.MultiHeadAttention` with `use_causal_mask=True`, and
    `FFN` is `Dense(ff_dim, activation) -> Dense(d_model)`, applied per position,
    so `z_next[:, t]` depends on `z[:, :t+1]` and `x[:, :t+1]` only: the fixed point
    is causal. (With a solver that mixes iterates across positions, such as
    Anderson or Broyden, or with early stopping on a per-sample residual, the
    returned *approximate* fixed point at position `t` can depend on later
    positions at the level of the solver tolerance.)

    Positions are not handled by the cell: add them to the injection (as
    `keras_deq.models.DEQTransformerLM` does, with `sinusoidal_positions`).

    Dropout is variational: one mask of shape `(batch, 1, d_model)` (shared by all
    positions) is applied to the attention output and to the FFN output, and the
    *same* masks are used at every iteration of one solve, in the implicit
    backward pass and in the Jacobian regularizer. The masks are drawn with a
    stateless RNG from the integer variable `dropout_seed`; call
    `resample_dropout()` once before each training forward pass (the language
    model does this in its `call`) to get new masks. Without it, the masks stay
    fixed across steps.

    Args:
        num_heads: Number of attention heads.
        ff_dim: Hidden size of the feed-forward block; None (default) means
            `4 * d_model`.
        norm: `"pre"` or `"post"` layer normalization (see above).
        dropout: Variational dropout rate in [0, 1).
        activation: Activation of the feed-forward block.
        key_dim: Size of each attention head; None (default) means
            `max(1, d_model // num_heads)`.
        kernel_initializer: Initializer of the attention and FFN kernels. A
            small one (the default, `TruncatedNormal(stddev=0.02)`) keeps the
            untrained map contractive; None means it.
        **kwargs: Base layer arguments.

    Example:

    ```python
    cell = keras_deq.layers.DEQTransformerCell(num_heads=4)
    deq = keras_deq.DEQ(cell, solver="anderson", max_iter=20)
    z = deq(x)  # x: (batch, T, d_model) embeddings + positions
    ```
    """

    def __init__(
        self,
        num_heads,
        ff_dim=None,
        norm="pre",
        dropout=0.0,
        activation="gelu",
        key_dim=None,
        kernel_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if (
            isinstance(num_heads, bool)
            or not isinstance(num_heads, numbers.Integral)
            or num_heads < 1
        ):
            raise ValueError(
                f"`num_heads` must be a positive integer. Received: num_heads={num_heads!r}"
            )
        if norm not in NORMS:
            raise ValueError(f"`norm` must be one of {NORMS}. Received: norm={norm!r}")
        self.num_heads = int(num_heads)
        self.ff_dim = check_optional_positive_int("ff_dim", ff_dim)
        self.norm = norm
        self.dropout = check_rate("dropout", dropout)
        self.activation = keras.activations.get(activation)
        self.key_dim = check_optional_positive_int("key_dim", key_dim)
        self.kernel_initializer = get_keras_object(
            "initializer",
            "kernel_initializer",
            kernel_initializer,
            default=keras.initializers.TruncatedNormal(stddev=0.02),
        )
        self._seed_generator = keras.random.SeedGenerator(0)

    def build(self, z_shape, x_shape):
        d_model = z_shape[-1]
        if x_shape[-1] != d_model:
            raise ValueError(
                "The injection must have the state's `d_model` features. "
                f"Received: z_shape={z_shape}, x_shape={x_shape}"
            )
        self.d_model = int(d_model)
        key_dim = self.key_dim or max(1, self.d_model // self.num_heads)
        ff_dim = self.ff_dim or 4 * self.d_model
        policy = self.dtype_policy
        init = self.kernel_initializer
        self.attention = keras.layers.MultiHeadAttention(
            self.num_heads,
            key_dim,
            kernel_initializer=keras.initializers.get(keras.initializers.serialize(init)),
            dtype=policy,
            name="attention",
        )
        self.attention.build(z_shape, z_shape)
        self.ff_in = keras.layers.Dense(
            ff_dim,
            activation=self.activation,
            kernel_initializer=keras.initializers.get(keras.initializers.serialize(init)),
            dtype=policy,
            name="ff_in",
        )
        self.ff_in.build(z_shape)
        self.ff_out = keras.layers.Dense(
            self.d_model,
            kernel_initializer=keras.initializers.get(keras.initializers.serialize(init)),
            dtype=policy,
            name="ff_out",
        )
        self.ff_out.build((*z_shape[:-1], ff_dim))
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-5, dtype=policy, name="norm1")
        self.norm1.build(z_shape)
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-5, dtype=policy, name="norm2")
        self.norm2.build(z_shape)
        self.dropout_seed = self.add_weight(
            name="dropout_seed",
            shape=(2,),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            aggregation="only_first_replica",
        )

    # ---------------------------------------------------------------- dropout
    def resample_dropout(self):
        """Draws a new dropout seed: the next solve uses new masks.

        Call it once per training forward pass, before the DEQ layer runs (it
        works eagerly and inside a traced `train_step`).
        """
        if not self.built or self.dropout == 0.0:
            return
        seed = keras.random.randint((2,), 0, 2**31 - 1, seed=self._seed_generator, dtype="int32")
        self.dropout_seed.assign(seed)

    def _masks(self, z):
        """Two variational masks of shape `(batch, 1, d_model)`, scaled by 1/keep."""
        keep = 1.0 - self.dropout
        shape = (ops.shape(z)[0], 1, self.d_model)
        seed = ops.convert_to_tensor(self.dropout_seed)
        masks = []
        for i in range(2):
            u = backend.stateless_uniform(shape, seed + i, "float32")
            masks.append(ops.cast(u < keep, z.dtype) / ops.cast(keep, z.dtype))
        return masks

    # ------------------------------------------------------------------- call
    def _attend(self, u, training):
        with backend.twice_differentiable():
            return self.attention(u, u, use_causal_mask=True, training=training)

    def call(self, z, x, training=None):
        masks = self._masks(z) if (training and self.dropout > 0.0) else (1.0, 1.0)
        u = z + x
        if self.norm == "pre":
            h = x + masks[0] * self._attend(self.norm1(u), training)
            return h + masks[1] * self.ff_out(self.ff_in(self.norm2(h)))
        h = self.norm1(x + masks[0] * self._attend(u, training))
        return self.norm2(h + masks[1] * self.ff_out(self.ff_in(h)))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "ff_dim": self.ff_dim,
                "norm": self.norm,
                "dropout": self.dropout,
                "activation": keras.activations.serialize(self.activation),
                "key_dim": self.key_dim,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
