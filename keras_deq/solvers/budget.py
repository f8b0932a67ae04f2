"""`Budget`: a forward solve's iteration budget, in training and at evaluation."""

import keras

from keras_deq import configurable
from keras_deq.solvers import common


@keras.saving.register_keras_serializable(package="keras_deq")
class Budget(configurable.Configurable):
    """How many iterations a `DEQ`'s forward solver may run, per call.

    Passed as `max_iter` of `keras_deq.DEQ`, in place of an int. A training call
    runs at most `max_iter` iterations, or, with `min_iter`, a number drawn
    uniformly from `[min_iter, max_iter]` at each call (the layer's `seed`); a call
    outside training (`training=False` or None: `evaluate`, `predict`) runs at most
    `eval_max_iter`. The draw is a tensor that the solver loop's stopping test
    reads, so a compiled training step is traced once for every budget it draws;
    an unrolled backward keeps `max_iter` as its static bound.

    Args:
        max_iter: The training budget (the largest drawn), a positive int.
        eval_max_iter: The budget outside training, a positive int; None: `max_iter`.
        min_iter: None (no draw), or the smallest training budget drawn, an int in
            `[1, max_iter]`.

    Example:

    ```python
    # Train with 8 to 12 iterations per step, evaluate with up to 30.
    budget = keras_deq.solvers.Budget(12, eval_max_iter=30, min_iter=8)
    layer = keras_deq.DEQ(keras_deq.layers.DenseCell(32), max_iter=budget)
    ```
    """

    family = "budget"

    def __init__(self, max_iter=30, eval_max_iter=None, min_iter=None):
        self.max_iter = common.check_positive_int("max_iter", max_iter)
        self.eval_max_iter = common.check_optional_positive_int("eval_max_iter", eval_max_iter)
        self.min_iter = common.check_optional_positive_int("min_iter", min_iter)
        if self.min_iter is not None and self.min_iter > self.max_iter:
            raise ValueError(
                "`min_iter` must be at most `max_iter`. "
                f"Received: min_iter={min_iter!r}, max_iter={max_iter!r}"
            )

    def for_call(self, training, seed=None):
        """The forward `max_iter` of one call.

        Args:
            training: Whether the call trains (a Python bool or None).
            seed: A `keras.random.SeedGenerator` for the training draw.

        Returns:
            An int (`eval_max_iter` outside training; `max_iter` in training without
            `min_iter`), or a scalar int32 tensor drawn in `[min_iter, max_iter]`.
        """
        if not training:
            return self.max_iter if self.eval_max_iter is None else self.eval_max_iter
        if self.min_iter is None or self.min_iter == self.max_iter:
            return self.max_iter
        return keras.random.randint((), self.min_iter, self.max_iter + 1, seed=seed, dtype="int32")


def get(max_iter):
    """`(budget, max_iter)`: a `Budget` (from itself or its config dict) and its
    training `max_iter`, or `(None, max_iter)` for anything else (an int, checked
    where it is used)."""
    if isinstance(max_iter, dict):
        try:
            max_iter = keras.saving.deserialize_keras_object(max_iter)
        except (TypeError, ValueError) as error:
            raise ValueError(
                "`max_iter` must be a positive int, a `Budget` or its config. "
                f"Received: max_iter={max_iter!r}"
            ) from error
    if isinstance(max_iter, Budget):
        return max_iter, max_iter.max_iter
    return None, max_iter
