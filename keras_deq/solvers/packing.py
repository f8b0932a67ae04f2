"""Packing of any state structure into one `(batch, n)` matrix for the solvers.

Solvers work on a flat matrix so that vectors, images `(H, W, C)`, sequences and
lists of tensors (multiscale states) all share one implementation.
"""

import math

import tensorflow as tf


class Packer:
    """Flattens a nest of `(batch, ...)` tensors into `(batch, n)` and back.

    Args:
        structure: A tensor or a nest (list, tuple, dict) of tensors that all share
            the leading batch dimension.
    """

    def __init__(self, structure):
        self.structure = structure
        self.tensors = tf.nest.flatten(structure)
        if not self.tensors:
            raise ValueError("`z0` must contain at least one tensor. Received: an empty structure.")
        self.dtype = self.tensors[0].dtype
        self.shapes = [self._sample_shape(t) for t in self.tensors]
        self.sizes = [self._size(t, s) for t, s in zip(self.tensors, self.shapes, strict=True)]
        self.single_matrix = len(self.tensors) == 1 and self.tensors[0].shape.rank == 2

    @staticmethod
    def _sample_shape(t):
        static = t.shape[1:]
        if static.is_fully_defined():
            return static.as_list()
        return tf.shape(t)[1:]

    @staticmethod
    def _size(t, shape):
        if isinstance(shape, list):
            return math.prod(shape)
        return tf.reduce_prod(shape)

    def pack(self, structure):
        tensors = tf.nest.flatten(structure)
        if self.single_matrix:
            return tf.cast(tensors[0], self.dtype)
        batch = tf.shape(tensors[0])[0]
        flat = [tf.reshape(tf.cast(t, self.dtype), [batch, -1]) for t in tensors]
        return flat[0] if len(flat) == 1 else tf.concat(flat, axis=1)

    def unpack(self, matrix):
        if self.single_matrix:
            return tf.nest.pack_sequence_as(self.structure, [matrix])
        batch = tf.shape(matrix)[0]
        parts = [matrix] if len(self.sizes) == 1 else tf.split(matrix, self.sizes, axis=1)
        tensors = [
            tf.reshape(
                p,
                tf.concat([[batch], shape], axis=0)
                if not isinstance(shape, list)
                else [batch] + shape,
            )
            for p, shape in zip(parts, self.shapes, strict=True)
        ]
        return tf.nest.pack_sequence_as(self.structure, tensors)

    def flat_fn(self, f):
        """Wraps `f` (structure -> structure) as a map of packed matrices."""

        def packed(matrix):
            return self.pack(f(self.unpack(matrix)))

        return packed
