"""Anderson acceleration (type II) with a relative ridge."""

import functools
import operator

import keras
import numpy as np
from keras import ops

from keras_deq.solvers import common
from keras_deq.solvers import result as res
from keras_deq.solvers.base import Solver


@keras.saving.register_keras_serializable(package="keras_deq")
class Anderson(Solver):
    """Anderson-accelerated fixed-point iteration.

    Each iteration mixes the last `window` iterates with weights `alpha` that
    minimize `||sum_i alpha_i g_i||^2 + lam ||alpha||^2` subject to
    `sum_i alpha_i = 1`, where `g_i = f(z_i) - z_i`. The ridge `lam` is relative:
    `lam = ridge * mean_i ||g_i||^2`, so it shrinks with the residuals and the
    acceleration does not stall near the solution. If the small system is
    singular or not finite for a sample, that sample takes a plain step instead.

    Args:
        max_iter: Maximum number of iterations (each evaluates `f` once).
        tol: Tolerance on the per-sample residual named by `stop_mode`.
        stop_mode: `"rel"` for `||f(z) - z|| / ||f(z)||`, `"abs"` for `||f(z) - z||`.
        window: Number of past iterates mixed (the history size `m`).
        beta: Mixing parameter in (0, 1]: 1 mixes the `f(z_i)`, smaller values
            move part way from the mixed `z_i`.
        ridge: Relative Tikhonov regularization of the least-squares system, >= 0.
            Values below 100 machine epsilons of the accumulation dtype are raised
            to that floor, which keeps the small system invertible.

    Examples:
        >>> from keras import ops
        >>> solver = Anderson(window=3)
        >>> result = solver(lambda z: 0.9 * ops.tanh(z) + 1.0, ops.zeros((4, 8)))
        >>> bool(ops.all(result.converged))
        True
    """

    name = "anderson"

    def __init__(self, max_iter=50, tol=1e-4, stop_mode="rel", window=5, beta=1.0, ridge=1e-4):
        super().__init__(max_iter, tol, stop_mode)
        self.window = common.check_positive_int("window", window)
        self.beta = common.check_fraction("beta", beta)
        self.ridge = common.check_nonnegative_float("ridge", ridge, finite=False)

    def init(self, f, z0):
        # The last `window` values of f(z_i) and of the residuals g_i = f(z_i) - z_i,
        # oldest first, as tuples of `(batch, n)` tensors: a new entry shifts the tuple,
        # which costs no copy (a ring buffer in one tensor rewrites it every iteration).
        zeros = ops.zeros_like(z0)
        acc = res.accumulation_dtype(z0.dtype)
        gram = ops.zeros((ops.shape(z0)[0], self.window, self.window), acc)
        return (zeros,) * self.window, (zeros,) * self.window, gram

    def step(self, f, z, fz, state, k):
        history_f, history_g, gram = state
        window, dtype = self.window, z.dtype
        acc = res.accumulation_dtype(dtype)
        # ||f(z) - z||^2 as the loop's residual computes it (in a graph, the same ops are
        # computed once). A sample where it is not finite gets g = 0 and f = z in its
        # history so that it cannot spoil anything; its weights then fall back to a
        # plain step (and the loop freezes it).
        diff = ops.cast(fz, acc) - ops.cast(z, acc)
        finite = ops.isfinite(ops.sum(diff * diff, axis=1))[:, None]
        g = ops.where(finite, fz - z, ops.zeros_like(z))
        history_f = (*history_f[1:], ops.where(finite, fz, z))
        history_g = (*history_g[1:], g)
        g_acc = ops.cast(g, acc)
        row = ops.stack([ops.sum(ops.cast(h, acc) * g_acc, axis=1) for h in history_g], axis=1)
        gram = _shift_gram(gram, row)
        alpha = ops.cast(_mixing_weights(gram, k, window, self.ridge), dtype)
        z_next = _combine(alpha, history_f)
        if self.beta != 1.0:
            z_next -= (1.0 - self.beta) * _combine(alpha, history_g)
        return z_next, (history_f, history_g, gram)


def anderson(f, z0, max_iter=50, tol=1e-4, stop_mode="rel", window=5, beta=1.0, ridge=1e-4):
    """Anderson-accelerated fixed-point iteration.

    The function form of `Anderson(max_iter, tol, stop_mode, window, beta, ridge)(f, z0)`.
    Each iteration mixes the last `window` iterates with weights `alpha` that
    minimize `||sum_i alpha_i g_i||^2 + lam ||alpha||^2` subject to
    `sum_i alpha_i = 1`, where `g_i = f(z_i) - z_i`, with the relative ridge
    `lam = ridge * mean_i ||g_i||^2`.

    Args:
        f: The map, taking and returning a structure like `z0`.
        z0: The initial state: a `(batch, ...)` tensor or a nest of such tensors.
        max_iter: Maximum number of iterations (each evaluates `f` once).
        tol: Tolerance on the per-sample residual named by `stop_mode`.
        stop_mode: `"rel"` for `||f(z) - z|| / ||f(z)||`, `"abs"` for `||f(z) - z||`.
        window: Number of past iterates mixed (the history size `m`).
        beta: Mixing parameter in (0, 1]: 1 mixes the `f(z_i)`, smaller values
            move part way from the mixed `z_i`.
        ridge: Relative Tikhonov regularization of the least-squares system, >= 0.
            Values below 100 machine epsilons of the accumulation dtype are raised
            to that floor, which keeps the small system invertible.

    Returns:
        A `SolverResult`.

    Examples:
        >>> from keras import ops
        >>> result = anderson(lambda z: 0.9 * ops.tanh(z) + 1.0, ops.zeros((4, 8)))
        >>> bool(ops.all(result.converged))
        True
    """
    common.check_callable("f", f)
    return Anderson(max_iter, tol, stop_mode, window, beta, ridge)(f, z0)


def _shift_gram(gram, row):
    """Drops the oldest row/column of the `(batch, m, m)` Gram matrix and appends `row`
    (the inner products of every history entry, newest last, with the newest residual)."""
    top = ops.concatenate([gram[:, 1:, 1:], row[:, :-1, None]], axis=2)
    return ops.concatenate([top, row[:, None, :]], axis=1)


def _mixing_weights(gram, k, window, ridge):
    """Solves for the Anderson weights, falling back to the newest iterate.

    The history is ordered oldest first; after `k + 1` iterations its last
    `min(k + 1, window)` entries are valid.
    """
    acc = keras.backend.standardize_dtype(gram.dtype)
    n_valid = ops.minimum(k + 1, window)
    valid = ops.cast(ops.arange(window, dtype="int32") >= window - n_valid, acc)
    # A sample whose Gram matrix overflowed solves the identity system instead and
    # falls back to the newest iterate below.
    finite = ops.all(ops.isfinite(gram), axis=(1, 2))
    gram = ops.where(finite[:, None, None], gram, ops.zeros_like(gram))
    eye = ops.convert_to_tensor(np.eye(window), acc)
    mean_sq = ops.sum(gram * eye, axis=(1, 2)) / ops.cast(n_valid, acc)
    tiny = res.tiny_for(acc)
    # The system is scaled by the mean squared residual (the weights do not depend
    # on that scale), so that its entries are O(1) even for huge residuals.
    gram = gram / (mean_sq + tiny)[:, None, None]
    # The ridge never drops below a few machine epsilons (relative), so that the
    # system stays invertible with `ridge=0` and a linearly dependent history
    # (TensorFlow's linear solve raises on an exactly singular matrix). An infinite
    # ridge means equal weights: any huge finite value gives them.
    lam = min(max(ridge, 100.0 * float(res.finfo(acc).eps)), 1e30)
    system = gram + eye * (lam * valid + (1.0 - valid))
    rhs = ops.zeros_like(gram[:, :, :1]) + valid[:, None]
    w = ops.linalg.solve(system, rhs)[:, :, 0]
    total = ops.sum(w, axis=1, keepdims=True)
    alpha = w / total
    ok = ops.all(ops.isfinite(alpha), axis=1, keepdims=True) & (ops.abs(total) > tiny)
    newest = ops.convert_to_tensor(np.eye(window)[-1:], acc)
    return ops.where(ok & finite[:, None], alpha, newest)


def _combine(alpha, history):
    """`sum_i alpha[:, i] * history[i]` for a tuple of `(batch, n)` tensors."""
    return functools.reduce(operator.add, [alpha[:, i : i + 1] * h for i, h in enumerate(history)])
