"""The eigenvalues Keras lacks: of Hermitian matrices without their eigenvectors, and
the complex eigenvalues of real matrices. Each framework's module of the backend seam
(`keras_deq.backend.tensorflow`, `.jax`, `.torch`, imported on first use) implements
both; this module dispatches to the one of the Keras backend in use."""

import importlib

import keras


def _framework():
    """The module of `keras_deq.backend` for the Keras backend in use."""
    return importlib.import_module(f"keras_deq.backend.{keras.backend.backend()}")


def eigvalsh(real, imag=None):
    """The eigenvalues of the Hermitian matrices `real + i imag`, ascending, without
    eigenvectors (`imag=None`: real symmetric matrices).

    Keras tensors are real and `keras.ops.eigh` computes the eigenvectors too; the
    real form of a Hermitian `n x n` matrix, `[[A, -B], [B, A]]`, would double `n`.
    Either would at least double the time of the operator norms (`keras_deq.linalg`),
    taken after every optimizer step.

    Args:
        real: A `(..., n, n)` real symmetric tensor, the real part.
        imag: None, or a tensor like `real`, antisymmetric: the imaginary part.

    Returns:
        A `(..., n)` real tensor in `real`'s dtype.
    """
    return _framework().eigvalsh(real, imag)


def eigenvalue_moduli(matrices):
    """The moduli `|lambda|` of the (complex) eigenvalues of real square matrices.

    Keras has no op for the eigenvalues of a non-symmetric matrix without its
    eigenvectors, and its tensors are real: the complex eigenvalues stay here.

    Args:
        matrices: A `(..., n, n)` real tensor.

    Returns:
        A `(..., n)` real tensor in `matrices`' dtype (in no particular order).
    """
    return _framework().eigenvalue_moduli(matrices)
