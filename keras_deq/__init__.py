"""keras_deq: deep equilibrium models as Keras 3 layers (TensorFlow, JAX and PyTorch backends)."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

if keras.backend.backend() not in ("tensorflow", "jax", "torch"):
    raise ImportError(
        "keras_deq runs on Keras' TensorFlow, JAX and PyTorch backends. Set KERAS_BACKEND "
        "to 'tensorflow', 'jax' or 'torch' before importing keras. "
        f"Received: backend={keras.backend.backend()!r}"
    )

from keras_deq import (  # noqa: E402
    backward,
    callbacks,
    constraints,
    features,
    jacobian,
    layers,
    linalg,
    models,
    regularizers,
    solvers,
)

# `constraints_opteq`: the former module of `SpectralNorm` and `ConvSpectralNorm`.
from keras_deq import constraints_opteq as constraints_opteq  # noqa: E402
from keras_deq._version import __version__ as __version__  # noqa: E402
from keras_deq.correction import FixedPointCorrection  # noqa: E402
from keras_deq.jacobian_penalty import JacobianPenalty  # noqa: E402
from keras_deq.layers import (  # noqa: E402
    DEQ,
    Cell,
    DenseCell,
    LipschitzMultiscale,
    MonDEQ,
    MultiscaleDEQ,
    OptEqBlock,
    PcDEQ,
    SpectralReparametrization,
    WeightNormalization,
)
from keras_deq.random_start import RandomStart  # noqa: E402

__all__ = [
    "DEQ",
    "Cell",
    "DenseCell",
    "FixedPointCorrection",
    "JacobianPenalty",
    "LipschitzMultiscale",
    "MonDEQ",
    "MultiscaleDEQ",
    "OptEqBlock",
    "PcDEQ",
    "RandomStart",
    "SpectralReparametrization",
    "WeightNormalization",
    "backward",
    "constraints",
    "callbacks",
    "features",
    "jacobian",
    "layers",
    "linalg",
    "models",
    "regularizers",
    "solvers",
]


def __getattr__(name):
    # `keras_deq.distribute` (TensorFlow's `tf.distribute`) is imported on first use,
    # so that the package imports where TensorFlow is not installed (JAX, PyTorch).
    if name == "distribute":
        import importlib  # noqa: PLC0415

        return importlib.import_module("keras_deq.distribute")
    raise AttributeError(f"module 'keras_deq' has no attribute {name!r}")
