"""Nest bookkeeping shared by the backends' vector-Jacobian products (no framework import)."""

import keras


def split_like(primals, flat_primals, flat_grads):
    """The list `flat_grads` (one per tensor of `flat_primals`, a list per primal) cut
    and packed back into the structures of `primals`, as a tuple."""
    result, start = [], 0
    for primal, tensors in zip(primals, flat_primals, strict=True):
        part = list(flat_grads[start : start + len(tensors)])
        start += len(tensors)
        result.append(keras.tree.pack_sequence_as(primal, part))
    return tuple(result)
