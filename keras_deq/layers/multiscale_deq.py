"""The multiscale DEQ layers: `MultiscaleDEQ` and `LipschitzMultiscale`.

Each is a `keras_deq.DEQ` that builds its cell (`MultiscaleCell` or
`LipschitzMultiscaleCell`) from the layer's arguments and infers the branch shapes
from the injection; solving, gradients and statistics are `DEQ`'s.
"""

import keras

from keras_deq.layers.deq import DEQ
from keras_deq.layers.lipschitz_multiscale_cell import LipschitzMultiscaleCell
from keras_deq.layers.multiscale_cell import MultiscaleCell


class _MultiscaleDEQBase(DEQ):
    """A `DEQ` that builds its multiscale cell and infers the branch shapes."""

    cell_class = MultiscaleCell
    # The cell's constructor arguments that the layer takes and reports in get_config.
    cell_keys = ("channels", "expansion", "groups", "kernel_initializer")

    def __init__(self, cell_config, **kwargs):
        cell = self.cell_class(**cell_config, dtype=kwargs.get("dtype"), name="cell")
        super().__init__(cell, **kwargs)

    def build(self, input_shape):
        if self.state_shape is None:  # the cell's (`MultiscaleCell.state_shape`), recorded
            self.state_shape = self.cell.state_shape(input_shape)
        super().build(input_shape)

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
