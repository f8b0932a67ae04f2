"""Multiscale DEQ cells (MDEQ) and the Lipschitz multiscale DEQ, as `DEQ` layers.

The state is a list of feature maps, one per branch: branch `i` has resolution
`(H / 2**i, W / 2**i)` and `channels[i]` channels. One call of the cell runs a
residual block on every branch (the injection `x` enters branch 0 only), fuses
the branches across resolutions, and applies a post-fusion step:

```
h_i = act(norm(conv3x3(z_i)))                       # expansion * channels[i] channels
o_i = norm(conv3x3(h_i) + [x if i == 0])
b_i = act(mix_alpha(z_i, o_i))                      # residual
y_i = mix_beta(b_i, {F_ij(b_j)}_{j != i})           # fusion
z_i+ = norm(conv1x1(act(y_i)))                      # post-fusion
```

`F_ij` goes down `k = i - j` levels with `k` stride-2 3x3 convs, each followed
by a norm, with `act` between them, and up `k = j - i` levels with a 1x1 conv,
a norm and a nearest-neighbour upsampling by `2**k`.

`MultiscaleCell` is MDEQ (Bai, Koltun, Kolter, 2020): `act = relu`, standard
group normalization, plain sums `mix_alpha = z_i + o_i`,
`mix_beta = b_i + sum_j F_ij(b_j)`. `LipschitzMultiscaleCell` is the Lipschitz
multiscale DEQ (Sato & Iiduka, 2026): a scaled ReLU `act = s * relu`, convex
mixes, mean-only group normalization with `|gamma| <= L_g`, and every conv's
operator norm capped at `L_c`, so that the cell is a contraction with a bound
computed by `lipschitz_bound()`.

The pieces live in one module each; this module gathers them under their former
import path (`from keras_deq.layers.multiscale import ...` keeps working):

| module | holds |
|---|---|
| `keras_deq.layers.multiscale_blocks` | `ScaledReLU`, `MeanGroupNormalization`, `fusion_weights` |
| `keras_deq.layers.multiscale_cell` | `MultiscaleCell` |
| `keras_deq.layers.lipschitz_multiscale_cell` | `LipschitzMultiscaleCell` |
| `keras_deq.layers.multiscale_deq` | `MultiscaleDEQ`, `LipschitzMultiscale` |
"""

from keras_deq.layers.lipschitz_multiscale_cell import NORMALIZATIONS, LipschitzMultiscaleCell
from keras_deq.layers.multiscale_blocks import MeanGroupNormalization, ScaledReLU, fusion_weights
from keras_deq.layers.multiscale_cell import GROUP_NORM_EPSILON, MultiscaleCell
from keras_deq.layers.multiscale_deq import LipschitzMultiscale, MultiscaleDEQ

__all__ = [
    "GROUP_NORM_EPSILON",
    "NORMALIZATIONS",
    "LipschitzMultiscale",
    "LipschitzMultiscaleCell",
    "MeanGroupNormalization",
    "MultiscaleCell",
    "MultiscaleDEQ",
    "ScaledReLU",
    "fusion_weights",
]
