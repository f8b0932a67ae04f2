"""The MDEQ cell (`MultiscaleCell`): its equations, its bound, its config and shape checks."""

import math

import keras
import numpy as np
import pytest
from keras import ops
from multiscale_references import built_cell, random_injection, random_state

from keras_deq.layers.lipschitz_multiscale_cell import LipschitzMultiscaleCell
from keras_deq.layers.multiscale_blocks import ScaledReLU
from keras_deq.layers.multiscale_cell import MultiscaleCell


def reference_mdeq(cell, z, x):
    """MDEQ's equations written out with `keras.ops` and the cell's weights."""

    def apply(step, v):
        if isinstance(step, keras.layers.Conv2D):
            return ops.conv(v, step.kernel, step.strides, "same", data_format="channels_last")
        if isinstance(step, keras.layers.GroupNormalization):
            batch, height, width, channels = v.shape
            g = ops.reshape(v, (batch, height, width, step.groups, channels // step.groups))
            mean, var = ops.moments(g, axes=[1, 2, 4], keepdims=True)
            g = (g - mean) / ops.sqrt(var + 1e-5)
            return ops.reshape(g, v.shape) * step.gamma + step.beta
        if isinstance(step, ScaledReLU):
            return ops.relu(v)
        factor = step.size[0]
        return ops.repeat(ops.repeat(v, factor, axis=1), factor, axis=2)

    def chain(steps, v):
        for step in steps:
            v = apply(step, v)
        return v

    n = len(z)
    blocks = []
    for i in range(n):
        inner = chain(cell.block_inner[i].steps, z[i]) + (x if i == 0 else 0.0)
        blocks.append(ops.relu(z[i] + apply(cell.block_norms[i], inner)))
    paths = dict(zip(cell._pairs(), cell.fusions, strict=True))
    fused = [
        blocks[i] + sum(chain(paths[(i, j)].steps, blocks[j]) for j in range(n) if j != i)
        for i in range(n)
    ]
    return [chain(cell.post_fusion[i].steps, fused[i]) for i in range(n)]


def test_multiscale_cell_follows_the_mdeq_equations():
    cell = built_cell(MultiscaleCell, channels=(4, 8, 8))
    for variable in cell.weights:
        if "beta" in variable.path or "gamma" in variable.path:
            variable.assign(np.random.default_rng(0).normal(size=variable.shape))
    z = random_state(3, 1, cell.channels)
    x = random_injection(3, 2, cell.channels)
    for got, want in zip(cell(z, x), reference_mdeq(cell, z, x), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_plain_multiscale_cell_has_no_finite_bound():
    assert math.isinf(float(built_cell(MultiscaleCell).lipschitz_bound()))
    standard = built_cell(normalization="standard", conv_norm_cap=None, gamma_cap=None)
    assert math.isinf(float(standard.lipschitz_bound()))


@pytest.mark.parametrize("cls", [MultiscaleCell, LipschitzMultiscaleCell])
def test_cell_config_round_trip(cls):
    cell = cls(channels=[4, 8, 8], groups=2, expansion=2)
    config = keras.saving.serialize_keras_object(cell)
    assert config["registered_name"] == f"keras_deq>{cls.__name__}"
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is cls
    assert restored.get_config() == cell.get_config()


def test_bad_shapes_are_refused():
    cell = MultiscaleCell(channels=(4, 8, 8), groups=2)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*\\(branches - 1\\) = 4"):
        cell.state_shapes((None, 6, 6, 4))
    with pytest.raises(ValueError, match="channels\\[0\\]=4"):
        cell.state_shapes((None, 8, 8, 3))
    with pytest.raises(ValueError, match="The state must be a list of 3 maps"):
        cell(random_state(1, 0, (4, 8)), random_injection(1, 0, (4, 8)))
