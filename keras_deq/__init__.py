"""keras_deq: deep equilibrium models as Keras 3 layers (TensorFlow backend)."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from keras_deq import backward, callbacks, jacobian, layers, solvers  # noqa: E402
from keras_deq.layers import DEQ, DenseCell, PcDEQ  # noqa: E402

__version__ = "0.1.0"

__all__ = ["DEQ", "DenseCell", "PcDEQ", "backward", "callbacks", "jacobian", "layers", "solvers"]
