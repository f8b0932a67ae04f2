"""Random states and built, saturated cells, shared by the multiscale layer tests (not tests)."""

import keras
import numpy as np
from keras import ops

from keras_deq import constraints
from keras_deq.layers.lipschitz_multiscale_cell import LipschitzMultiscaleCell

SMALL = {"channels": (4, 8), "groups": 2}


SIZE = 8


def random_state(batch, seed, channels=SMALL["channels"], dtype="float32", scale=1.0):
    rng = np.random.default_rng(seed)
    return [
        ops.convert_to_tensor(
            scale * rng.normal(size=(batch, SIZE // 2**i, SIZE // 2**i, c)), dtype
        )
        for i, c in enumerate(channels)
    ]


def random_injection(batch, seed, channels=SMALL["channels"], dtype="float32"):
    rng = np.random.default_rng(seed)
    return ops.convert_to_tensor(rng.normal(size=(batch, SIZE, SIZE, channels[0])), dtype)


def built_cell(cls=LipschitzMultiscaleCell, dtype="float32", size=SIZE, **kwargs):
    keras.utils.set_random_seed(0)
    cell = cls(**{**SMALL, **kwargs}, dtype=dtype)
    channels = cell.channels
    rng = np.random.default_rng(0)
    z = [
        ops.convert_to_tensor(rng.normal(size=(1, size // 2**i, size // 2**i, c)), dtype)
        for i, c in enumerate(channels)
    ]
    cell(z, ops.convert_to_tensor(rng.normal(size=(1, size, size, channels[0])), dtype))
    return cell


def saturate(cell, seed=0):
    """Every capped conv at its cap, every capped `|gamma|` at its cap, random offsets.

    Large random kernels go through the cell's own constraints, which scale each one down
    to its cap (whatever norm the constraint measures).
    """
    rng = np.random.default_rng(seed)
    for variable in cell.weights:
        cap = variable.constraint
        if isinstance(cap, constraints.ConvOperatorNorm):
            variable.assign(100.0 * rng.normal(size=variable.shape))
        elif cap is not None:
            variable.assign(rng.choice([-5.0, 5.0], size=variable.shape))
        elif "beta" in variable.path:
            variable.assign(rng.normal(size=variable.shape))
    cell.apply_constraints()
    return cell
