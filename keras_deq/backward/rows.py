"""Per-sample (row) masks that keep failed samples out of every gradient."""

import tensorflow as tf


def solved_rows(result, x):
    """Per-sample bool `(batch,)`: the solve found a finite iterate for the sample.

    A sample without one (NaN input, or a cell that is NaN everywhere) returns its
    initial state; the gradients leave it out (see `mask_rows`).
    """
    batch = tf.shape(tf.nest.flatten(x)[0])[0]
    finite = tf.math.is_finite(result.abs_residual)
    return tf.reduce_all(tf.reshape(finite, [batch, -1]), axis=1)


def finite_rows(structure):
    """Per-sample bool `(batch,)`: every entry of the sample in every tensor is finite."""
    rows = [
        tf.reduce_all(tf.reshape(tf.math.is_finite(t), [tf.shape(t)[0], -1]), axis=1)
        for t in tf.nest.flatten(structure)
    ]
    return tf.reduce_all(tf.stack(rows), axis=0)


def mask_rows(structure, ok):
    """Zeros the rows (first axis) of every float tensor in `structure` where `ok` is
    False, so that differentiating through a failed sample gives exact zeros, not
    `NaN * 0`."""

    def mask(t):
        return tf.where(_rows(ok, t), t, tf.zeros_like(t)) if t.dtype.is_floating else t

    return tf.nest.map_structure(mask, structure)


def select_rows(ok, a, b):
    """Rows of nest `a` where `ok`, else rows of nest `b`."""
    return tf.nest.map_structure(lambda t, u: tf.where(_rows(ok, t), t, u), a, b)


def _rows(ok, t):
    """`ok` `(batch,)` shaped to broadcast over the rows of `t`."""
    return tf.reshape(ok, tf.concat([[-1], tf.ones([tf.rank(t) - 1], tf.int32)], 0))


def zeros_for_none(grads, like):
    """`grads` with each None replaced by zeros shaped like the matching `like`."""
    return [tf.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


def finite_upstream(z):
    """Identity on the nest `z` whose gradient zeros the rows (samples) of the
    upstream gradient that hold NaN or Inf.

    A loss that overflows downstream of the layer (e.g. on a diverged state) then
    moves no weight through the layer, whatever the backward mode.
    """
    flat = tf.nest.flatten(z)

    @tf.custom_gradient
    def identity(*tensors):
        def grad(*upstream):
            upstream = zeros_for_none(upstream, tensors)
            return [tf.where(_rows(finite_rows(g), g), g, tf.zeros_like(g)) for g in upstream]

        return [tf.identity(t) for t in tensors], grad

    return tf.nest.pack_sequence_as(z, list(identity(*flat)))
