"""Former module of the OptEq units' operator-norm caps, kept so that its imports still work.

`SpectralNorm` and `ConvSpectralNorm` now live in `keras_deq.constraints` with every
other weight constraint, and the norms in `keras_deq.linalg` under names that say
what they return: `dense_spectral_norm` is `dense_spectral_norm_exact`,
`circular_conv_norm` is `circular_conv_norm_exact` and `same_conv_norm_bound` is
`same_conv_norm_upper` (an upper bound). Saved models name the constraints by their
registered names (`keras_deq>SpectralNorm`), not by module, so they load either way.
"""

from keras_deq.constraints import ConvSpectralNorm, SpectralNorm
from keras_deq.linalg import circular_conv_norm, dense_spectral_norm, same_conv_norm_bound

__all__ = [
    "ConvSpectralNorm",
    "SpectralNorm",
    "circular_conv_norm",
    "dense_spectral_norm",
    "same_conv_norm_bound",
]
