"""Keras layers: the `DEQ` wrapper and ready-made cells."""

from keras_deq.layers.cells import DenseCell
from keras_deq.layers.deq import DEQ

__all__ = ["DEQ", "DenseCell"]
