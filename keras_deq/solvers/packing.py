"""Packing of any state structure into one `(batch, n)` matrix for the solvers.

Solvers work on a flat matrix so that vectors, images `(H, W, C)`, sequences and
lists of tensors (multiscale states) all share one implementation. A half-precision
state (float16, bfloat16, e.g. under a mixed-precision policy) is packed in float32:
the cell still runs in its own dtype, but the solver's iterates, histories and
mixing keep float32 precision.

Shapes: a sample dimension known when the packer is built is a Python int; on
TensorFlow an unknown one (a `None` in a `tf.function` signature) is read at run
time, as `keras.ops.shape` gives it.
"""

import functools
import operator

import keras
from keras import ops

HALF_DTYPES = ("float16", "bfloat16")


def solver_dtype(dtype):
    """The dtype name solvers iterate in: float32 for half-precision states."""
    dtype = keras.backend.standardize_dtype(dtype)
    return "float32" if dtype in HALF_DTYPES else dtype


def static_shape(t):
    """The static shape of `t` as a tuple (None for unknown dimensions), or None if
    its rank is unknown (a TensorFlow graph tensor, whose shape cannot be iterated)."""
    try:
        return tuple(t.shape)
    except (TypeError, ValueError):
        return None


def compatible(got, want):
    """Whether static shapes (tuples with None for unknown, or None) can be equal."""
    if got is None or want is None:
        return True
    return len(got) == len(want) and all(
        a is None or b is None or a == b for a, b in zip(got, want, strict=True)
    )


class Packer:
    """Flattens a nest of `(batch, ...)` tensors into `(batch, n)` and back.

    Args:
        structure: A tensor or a nest (list, tuple, dict) of tensors that all share
            the leading batch dimension.
    """

    def __init__(self, structure):
        self.structure = structure
        self.tensors = keras.tree.flatten(structure)
        if not self.tensors:
            raise ValueError("`z0` must contain at least one tensor. Received: an empty structure.")
        self.dtypes = [keras.backend.standardize_dtype(t.dtype) for t in self.tensors]
        self.dtype = solver_dtype(self.dtypes[0])
        self.static_shapes = [static_shape(t) for t in self.tensors]
        self.shapes = [tuple(ops.shape(t)[1:]) for t in self.tensors]
        self.sizes = [functools.reduce(operator.mul, s, 1) for s in self.shapes]
        self.single_matrix = len(self.tensors) == 1 and len(self.static_shapes[0]) == 2

    def pack(self, structure):
        tensors = keras.tree.flatten(structure)
        if self.single_matrix:
            return self._cast(tensors[0], self.dtype)
        batch = ops.shape(tensors[0])[0]
        flat = [ops.reshape(self._cast(t, self.dtype), (batch, -1)) for t in tensors]
        return flat[0] if len(flat) == 1 else ops.concatenate(flat, axis=1)

    def unpack(self, matrix):
        if self.single_matrix:
            return keras.tree.pack_sequence_as(self.structure, [self._cast(matrix, self.dtypes[0])])
        batch = ops.shape(matrix)[0]
        tensors, start = [], 0
        for shape, size, dtype in zip(self.shapes, self.sizes, self.dtypes, strict=True):
            part = matrix if len(self.sizes) == 1 else matrix[:, start : start + size]
            tensors.append(self._cast(ops.reshape(part, (batch, *shape)), dtype))
            start = start + size
        return keras.tree.pack_sequence_as(self.structure, tensors)

    @staticmethod
    def _cast(t, dtype):
        """`t` in `dtype`; `t` itself if it has that dtype already."""
        if keras.backend.standardize_dtype(t.dtype) == dtype:
            return t
        return ops.cast(t, dtype)

    def flat_fn(self, f):
        """Wraps `f` (structure -> structure) as a map of packed matrices."""

        def packed(matrix):
            out = f(self.unpack(matrix))
            self._check_output(out)
            return self.pack(out)

        return packed

    def _check_output(self, out):
        """`f` must return tensors shaped like the state (checked where shapes are known)."""
        flat = keras.tree.flatten(out)
        ok = len(flat) == len(self.tensors) and all(t is not None for t in flat)
        if ok:
            for t, want in zip(flat, self.static_shapes, strict=True):
                got = static_shape(t) if hasattr(t, "shape") else None
                if not compatible(got, want):
                    ok = False
        if not ok:
            shapes = [getattr(t, "shape", None) for t in flat]
            raise ValueError(
                "`f` must return a structure of tensors shaped like `z0`. Received: f "
                f"returned {shapes}, z0 has shapes {[t.shape for t in self.tensors]}"
            )
