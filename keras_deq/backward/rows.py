"""Per-sample (row) masks that keep failed samples out of every gradient."""

import keras
from keras import ops

from keras_deq import backend
from keras_deq.solvers import result as res


def solved_rows(result, x):
    """Per-sample bool `(batch,)`: the solve found a finite iterate for the sample.

    A sample without one (NaN input, or a cell that is NaN everywhere) returns its
    initial state; the gradients leave it out (see `mask_rows`).
    """
    batch = ops.shape(keras.tree.flatten(x)[0])[0]
    finite = ops.isfinite(result.abs_residual)
    return ops.all(ops.reshape(finite, (batch, -1)), axis=1)


def finite_rows(structure):
    """Per-sample bool `(batch,)`: every entry of the sample in every tensor is finite."""
    rows = [
        ops.all(ops.reshape(ops.isfinite(t), (ops.shape(t)[0], -1)), axis=1)
        for t in keras.tree.flatten(structure)
    ]
    return ops.all(ops.stack(rows), axis=0)


def mask_rows(structure, ok, lazy=False):
    """Zeros the rows (first axis) of every float tensor in `structure` where `ok` is
    False, so that differentiating through a failed sample gives exact zeros, not
    `NaN * 0`. `lazy`: see `select_rows`."""

    def zeros():
        return keras.tree.map_structure(
            lambda t: ops.zeros_like(t) if backend.is_float(t) else t, structure
        )

    return select_rows(ok, structure, zeros, lazy)


def select_rows(ok, a, b, lazy=False):
    """Rows of nest `a` where `ok`, else rows of nest `b` (or of the nest a function `b`
    returns). With `lazy`, skipped when every row is `ok`
    (`keras_deq.solvers.result.replace_rows`)."""
    return (res.replace_rows if lazy else res.where_rows)(ops.logical_not(ok), b, a)


def zeros_for_none(grads, like):
    """`grads` with each None replaced by zeros shaped like the matching `like`."""
    return [ops.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


def finite_upstream(z):
    """Identity on the nest `z` whose gradient zeros the rows (samples) of the
    upstream gradient that hold NaN or Inf.

    A loss that overflows downstream of the layer (e.g. on a diverged state) then
    moves no weight through the layer, whatever the backward mode.
    """
    flat = keras.tree.flatten(z)

    def clean(upstream):
        upstream = zeros_for_none(upstream, flat)
        return [mask_rows(g, finite_rows(g), lazy=True) for g in upstream]

    return keras.tree.pack_sequence_as(z, backend.identity_with_gradient(flat, clean))
