"""Keras layers: the `DEQ` wrapper, ready-made cells, and the papers' layers."""

# `multiscale` and `opteq`: the former one-file modules of those layers, which gather
# their pieces under the old import paths (`keras_deq.layers.opteq.OptEqBlock`, ...).
from keras_deq.layers import multiscale as multiscale
from keras_deq.layers import opteq as opteq
from keras_deq.layers.cell import Cell
from keras_deq.layers.cells import DenseCell
from keras_deq.layers.deq import DEQ
from keras_deq.layers.lipschitz_multiscale_cell import LipschitzMultiscaleCell
from keras_deq.layers.mondeq import MonDEQ
from keras_deq.layers.monotone_cell import MonotoneCell
from keras_deq.layers.multiscale_cell import MultiscaleCell
from keras_deq.layers.multiscale_deq import LipschitzMultiscale, MultiscaleDEQ
from keras_deq.layers.opteq_block import OptEqBlock
from keras_deq.layers.opteq_cell import OptEqCell
from keras_deq.layers.pcdeq import PcDEQ, PositiveConcaveCell
from keras_deq.layers.reparametrization import KernelReparametrization
from keras_deq.layers.spectral_reparametrization import SpectralReparametrization
from keras_deq.layers.transformer import DEQTransformerCell
from keras_deq.layers.weight_normalization import WeightNormalization

__all__ = [
    "DEQ",
    "Cell",
    "DEQTransformerCell",
    "DenseCell",
    "KernelReparametrization",
    "LipschitzMultiscale",
    "LipschitzMultiscaleCell",
    "MonDEQ",
    "MonotoneCell",
    "MultiscaleCell",
    "MultiscaleDEQ",
    "OptEqBlock",
    "OptEqCell",
    "PcDEQ",
    "PositiveConcaveCell",
    "SpectralReparametrization",
    "WeightNormalization",
]
