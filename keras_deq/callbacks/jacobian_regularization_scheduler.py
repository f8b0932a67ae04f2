"""`JacobianRegularizationScheduler`: the Jacobian penalty's weight and frequency
over training, and `stepwise_schedule`."""

import keras

from keras_deq.callbacks import common
from keras_deq.callbacks.explicit_pretraining import ExplicitPretraining
from keras_deq.solvers.common import (
    check_nonnegative_float,
    check_nonnegative_int,
    check_optional_positive_int,
)


def stepwise_schedule(initial, increment=0.1, every=None, stop_step=None):
    """The Jacobian-regularization schedule of the DEQ papers' recipes.

    `weight(step) = initial + increment * floor(step / every)`, and 0 from
    `stop_step` on.

    Args:
        initial: Weight at step 0.
        increment: Added every `every` steps.
        every: Steps between increments, a positive integer (numpy integers
            too); None keeps the weight constant.
        stop_step: First step at which the weight is 0, a non-negative
            integer; None never stops.

    Returns:
        A function `step -> weight`.

    With `steps_per_execution=k` in `compile`, the weight is updated every `k`
    steps (Keras calls batch hooks once per execution).

    Examples:
        >>> schedule = stepwise_schedule(1.0, increment=0.1, every=100, stop_step=1000)
        >>> schedule(0), round(schedule(250), 6), schedule(1000)
        (1.0, 1.2, 0.0)
    """

    every = check_optional_positive_int("every", every)
    stop_step = check_nonnegative_int("stop_step", stop_step, optional=True)

    def schedule(step):
        if stop_step is not None and step >= stop_step:
            return 0.0
        bumps = step // every if every else 0
        return float(initial + increment * bumps)

    return schedule


class JacobianRegularizationScheduler(keras.callbacks.Callback):
    """Sets the Jacobian-regularization weight (and frequency) of DEQ layers.

    The schedule is a function of the training step, derived from the
    optimizer's iteration counter at each batch (no count of its own), so a run
    resumed with `keras.callbacks.BackupAndRestore` continues the schedule where
    it stopped.

    By default the schedule's step is the optimizer's step. The DEQ papers'
    recipes count it from the end of the explicit pretraining phase instead
    (`gamma_t = gamma_0 + 0.1 * floor(t_deq / JAC_INCREMENTAL)`, `t_deq` the
    steps after pretraining): pass `after=` the `ExplicitPretraining` callback,
    or its number of steps. Then, at optimizer step `t`:

    - while `t < after` (pretraining), the weight is `pretrain_weight` (0 by
      default: no penalty; the recipes' `PRETRAIN_JAC_LOSS_WEIGHT`), and a
      `frequency` function is called with step 0;
    - from then on, the weight is `schedule(t - after)`, and a `frequency`
      function is called with `t - after` too.

    Args:
        schedule: A function `step -> weight` (see `stepwise_schedule`).
        frequency: Optional fixed probability per step, or a function
            `step -> probability`; None leaves the layers' own.
        layers: A non-empty list of the `keras_deq.DEQ` layers to steer; None
            steers every `DEQ` in the model.
        verbose: If 1, print the weight when it changes.
        after: None (the schedule's step is the optimizer's step), a
            non-negative integer (numpy integers too): the optimizer step at
            which the schedule's step 0 falls, or an `ExplicitPretraining`
            callback, whose `steps` is read at each batch.
        pretrain_weight: The weight while the optimizer step is below `after`;
            a non-negative number. Only with `after`.

    Example:

    ```python
    model.fit(x, y, callbacks=[
        keras_deq.callbacks.JacobianRegularizationScheduler(
            keras_deq.callbacks.stepwise_schedule(0.5, 0.1, every=1000), frequency=0.3)
    ])

    # The recipe: 500 explicit steps without the penalty, then 0.5 + 0.1 every
    # 1000 steps counted from the end of pretraining.
    pretrain = keras_deq.callbacks.ExplicitPretraining(steps=500, depth=4)
    model.fit(x, y, callbacks=[
        pretrain,
        keras_deq.callbacks.JacobianRegularizationScheduler(
            keras_deq.callbacks.stepwise_schedule(0.5, 0.1, every=1000),
            frequency=0.3,
            after=pretrain,
        ),
    ])
    ```
    """

    def __init__(
        self, schedule, frequency=None, layers=None, verbose=0, after=None, pretrain_weight=0.0
    ):
        super().__init__()
        if not callable(schedule):
            raise ValueError(
                f"`schedule` must be a function of the step. Received: schedule={schedule!r}"
            )
        if not isinstance(after, ExplicitPretraining):
            after = check_nonnegative_int("after", after, optional=True)
        pretrain_weight = check_nonnegative_float("pretrain_weight", pretrain_weight)
        if after is None and pretrain_weight != 0:
            raise ValueError(
                "`pretrain_weight` is the weight before the step `after`, so it needs "
                f"`after`. Received: pretrain_weight={pretrain_weight!r}, after=None"
            )
        self.schedule = schedule
        self.frequency = frequency
        self.layers = common.check_layers(layers)
        self.verbose = verbose
        self.after = after
        self.pretrain_weight = pretrain_weight
        self._last = None

    def _targets(self):
        return common.deq_layers(self)

    def _start(self):
        """The optimizer step at which the schedule's step 0 falls."""
        if isinstance(self.after, ExplicitPretraining):
            return self.after.steps
        return self.after or 0

    def on_train_begin(self, logs=None):
        disabled = [layer for layer in self._targets() if not layer._jacobian_enabled]
        for layer in disabled:
            layer._jacobian_enabled = True
        if disabled:
            # The regularizer was not in the traced training graph: trace it again.
            self.model.make_train_function(force=True)

    def on_train_batch_begin(self, batch, logs=None):
        iterations = int(self.model.optimizer.iterations.numpy())
        step = iterations - self._start()
        if step < 0:
            weight, step = self.pretrain_weight, 0
        else:
            weight = float(self.schedule(step))
        frequency = self.frequency(step) if callable(self.frequency) else self.frequency
        for layer in self._targets():
            layer.jacobian_weight = weight
            if frequency is not None:
                layer.jacobian_frequency = frequency
        if self.verbose and weight != self._last:
            where = f"Step {iterations}"
            if self.after is not None:
                phase = "pretraining" if iterations < self._start() else f"schedule step {step}"
                where += f" ({phase})"
            print(f"\n{where}: Jacobian regularization weight set to {weight:g}.")
        self._last = weight

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["jacobian_weight"] = self._last
