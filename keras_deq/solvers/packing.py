"""Packing of any state structure into one `(batch, n)` matrix for the solvers.

Solvers work on a flat matrix so that vectors, images `(H, W, C)`, sequences and
lists of tensors (multiscale states) all share one implementation. A half-precision
state (float16, bfloat16, e.g. under a mixed-precision policy) is packed in float32:
the cell still runs in its own dtype, but the solver's iterates, histories and
mixing keep float32 precision.
"""

import math

import tensorflow as tf

HALF_DTYPES = (tf.float16, tf.bfloat16)


def solver_dtype(dtype):
    """The dtype solvers iterate in: float32 for half-precision states."""
    dtype = tf.as_dtype(dtype)
    return tf.float32 if dtype in HALF_DTYPES else dtype


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
        self.dtypes = [t.dtype for t in self.tensors]
        self.dtype = solver_dtype(self.dtypes[0])
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
            return tf.nest.pack_sequence_as(self.structure, [tf.cast(matrix, self.dtypes[0])])
        batch = tf.shape(matrix)[0]
        parts = [matrix] if len(self.sizes) == 1 else tf.split(matrix, self.sizes, axis=1)
        tensors = [
            tf.cast(
                tf.reshape(
                    p,
                    tf.concat([[batch], shape], axis=0)
                    if not isinstance(shape, list)
                    else [batch] + shape,
                ),
                dtype,
            )
            for p, shape, dtype in zip(parts, self.shapes, self.dtypes, strict=True)
        ]
        return tf.nest.pack_sequence_as(self.structure, tensors)

    def flat_fn(self, f):
        """Wraps `f` (structure -> structure) as a map of packed matrices."""

        def packed(matrix):
            out = f(self.unpack(matrix))
            self._check_output(out)
            return self.pack(out)

        return packed

    def _check_output(self, out):
        """`f` must return tensors shaped like the state (checked where shapes are known)."""
        flat = tf.nest.flatten(out)
        ok = len(flat) == len(self.tensors) and all(t is not None for t in flat)
        if ok:
            for t, ref in zip(flat, self.tensors, strict=True):
                got, want = tf.TensorShape(getattr(t, "shape", None)), ref.shape
                if not got.is_compatible_with(want):
                    ok = False
        if not ok:
            shapes = [getattr(t, "shape", None) for t in flat]
            raise ValueError(
                "`f` must return a structure of tensors shaped like `z0`. Received: f "
                f"returned {shapes}, z0 has shapes {[t.shape for t in self.tensors]}"
            )
