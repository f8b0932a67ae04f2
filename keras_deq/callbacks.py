"""Callbacks that steer DEQ layers during `fit`."""

import keras

from keras_deq.layers.deq import DEQ


def _deq_layers(callback):
    """The DEQ layers a callback steers: its `layers`, or every DEQ of its model."""
    if callback.layers is not None:
        return list(callback.layers)
    found = [layer for layer in callback.model._flatten_layers() if isinstance(layer, DEQ)]
    if not found:
        raise ValueError(f"{type(callback).__name__} found no DEQ layer in the model.")
    return found


def _retrace(model):
    """Makes Keras trace its train, test and predict functions again."""
    model.make_train_function(force=True)
    model.make_test_function(force=True)
    model.make_predict_function(force=True)


def stepwise_schedule(initial, increment=0.1, every=None, stop_step=None):
    """The Jacobian-regularization schedule of the DEQ papers' recipes.

    `weight(step) = initial + increment * floor(step / every)`, and 0 from
    `stop_step` on.

    Args:
        initial: Weight at step 0.
        increment: Added every `every` steps.
        every: Steps between increments; None keeps the weight constant.
        stop_step: First step at which the weight is 0; None never stops.

    Returns:
        A function `step -> weight`.

    With `steps_per_execution=k` in `compile`, the weight is updated every `k`
    steps (Keras calls batch hooks once per execution).

    Examples:
        >>> schedule = stepwise_schedule(1.0, increment=0.1, every=100, stop_step=1000)
        >>> schedule(0), round(schedule(250), 6), schedule(1000)
        (1.0, 1.2, 0.0)
    """

    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"`every` must be a positive integer or None. Received: every={every!r}")
    if stop_step is not None and (
        isinstance(stop_step, bool) or not isinstance(stop_step, int) or stop_step < 0
    ):
        raise ValueError(
            f"`stop_step` must be a non-negative integer or None. Received: stop_step={stop_step!r}"
        )

    def schedule(step):
        if stop_step is not None and step >= stop_step:
            return 0.0
        bumps = step // every if every else 0
        return float(initial + increment * bumps)

    return schedule


class JacobianRegularizationScheduler(keras.callbacks.Callback):
    """Sets the Jacobian-regularization weight (and frequency) of DEQ layers.

    The schedule is a function of the global training step, read from the
    optimizer's iteration counter, so a run resumed with
    `keras.callbacks.BackupAndRestore` continues the schedule where it stopped.

    Args:
        schedule: A function `step -> weight` (see `stepwise_schedule`).
        frequency: Optional fixed probability per step, or a function
            `step -> probability`; None leaves the layers' own.
        layers: DEQ layers to steer; None steers every `DEQ` in the model.
        verbose: If 1, print the weight when it changes.

    Example:

    ```python
    model.fit(x, y, callbacks=[
        keras_deq.callbacks.JacobianRegularizationScheduler(
            keras_deq.callbacks.stepwise_schedule(0.5, 0.1, every=1000), frequency=0.3)
    ])
    ```
    """

    def __init__(self, schedule, frequency=None, layers=None, verbose=0):
        super().__init__()
        if not callable(schedule):
            raise ValueError(
                f"`schedule` must be a function of the step. Received: schedule={schedule!r}"
            )
        self.schedule = schedule
        self.frequency = frequency
        self.layers = layers
        self.verbose = verbose
        self._last = None

    def _targets(self):
        return _deq_layers(self)

    def on_train_begin(self, logs=None):
        disabled = [layer for layer in self._targets() if not layer._jacobian_enabled]
        for layer in disabled:
            layer._jacobian_enabled = True
        if disabled:
            # The regularizer was not in the traced training graph: trace it again.
            self.model.make_train_function(force=True)

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        weight = float(self.schedule(step))
        frequency = self.frequency(step) if callable(self.frequency) else self.frequency
        for layer in self._targets():
            layer.jacobian_weight = weight
            if frequency is not None:
                layer.jacobian_frequency = frequency
        if self.verbose and weight != self._last:
            print(f"\nStep {step}: Jacobian regularization weight set to {weight:g}.")
        self._last = weight

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["jacobian_weight"] = self._last


class ExplicitPretraining(keras.callbacks.Callback):
    """Trains DEQ layers as explicit networks for the first steps of a run.

    For the first `steps` training steps (the optimizer's iteration counter, so
    a resumed run continues where it stopped), each DEQ layer applies its cell
    `depth` times from the initial state and is differentiated by autodiff, with
    no solver: a weight-tied network of `depth` layers. This is the "pretrain"
    phase of the DEQ recipes (e.g. the DEQ-Transformer's), which gives the cell
    a sensible scale before the solver and the implicit gradient take over. The
    train, test and predict functions are traced again at each switch; at the
    end of `fit` the layers return to solving.

    Args:
        steps: Number of explicit training steps, >= 0.
        depth: Cell applications per explicit forward pass, >= 1.
        layers: DEQ layers to switch; None switches every `DEQ` in the model.
        verbose: If 1, print when the phase starts and ends.

    Example:

    ```python
    model.fit(x, y, epochs=5, callbacks=[
        keras_deq.callbacks.ExplicitPretraining(steps=500, depth=4),
    ])
    ```
    """

    def __init__(self, steps, depth, layers=None, verbose=0):
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"`steps` must be a non-negative integer. Received: steps={steps!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"`depth` must be a positive integer. Received: depth={depth!r}")
        self.steps = steps
        self.depth = depth
        self.layers = layers
        self.verbose = verbose

    def _switch(self, explicit):
        depth = self.depth if explicit else None
        changed = False
        for layer in _deq_layers(self):
            changed |= layer.explicit_depth != depth
            layer.explicit_depth = depth
        if changed:
            _retrace(self.model)
            if self.verbose:
                step = int(self.model.optimizer.iterations.numpy())
                phase = f"explicit (depth {self.depth})" if explicit else "the solver"
                print(f"\nStep {step}: DEQ layers now train with {phase}.")

    def on_train_begin(self, logs=None):
        self._switch(int(self.model.optimizer.iterations.numpy()) < self.steps)

    def on_train_batch_begin(self, batch, logs=None):
        self._switch(int(self.model.optimizer.iterations.numpy()) < self.steps)

    def on_train_end(self, logs=None):
        self._switch(False)
