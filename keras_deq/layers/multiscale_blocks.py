"""The layers the multiscale cells are made of, and the convex fusion weights.

- `ScaledReLU`: `s * relu(x)`, Lipschitz constant `s`.
- `MeanGroupNormalization`: group normalization without the division by the
  standard deviation, Lipschitz constant `max|gamma|`.
- `fusion_weights`: the weights `w_ij` of the Lipschitz cell's convex fusion.

`MultiscaleCell` and `LipschitzMultiscaleCell` build their branches from these,
Keras' `Conv2D`, `GroupNormalization` and `UpSampling2D`, chained by `_Chain`.
"""

import math

import keras
from keras import ops

from keras_deq.solvers.common import (
    check_bool,
    check_positive_float,
    check_positive_int,
    get_keras_object,
)


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
        >>> keras.ops.convert_to_numpy(ScaledReLU(0.5)(np.array([-2.0, 2.0]))).tolist()
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
        shape = ops.shape(inputs)
        channels = inputs.shape[-1]
        grouped = ops.reshape(inputs, (shape[0], -1, self.groups, channels // self.groups))
        centered = grouped - ops.mean(grouped, axis=(1, 3), keepdims=True)
        out = ops.reshape(centered, shape)
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
            return ops.convert_to_tensor(1.0, self.variable_dtype)
        return ops.max(ops.abs(ops.convert_to_tensor(self.gamma)))

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
