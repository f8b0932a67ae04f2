"""Callbacks that steer DEQ layers during `fit`, and one that reports their solvers."""

import math
import time
from collections.abc import Mapping

import keras

from keras_deq.layers.deq import DEQ
from keras_deq.solvers.common import (
    check_callable,
    check_nonnegative_float,
    check_nonnegative_int,
    check_optional_positive_int,
    check_positive_int,
)


def _check_layers(layers):
    """None, or a non-empty list (or tuple) of `keras_deq.DEQ` layers, as a list."""
    if layers is None:
        return None
    if not isinstance(layers, (list, tuple)):
        raise ValueError(
            "`layers` must be None (every DEQ layer of the model) or a non-empty list of "
            f"keras_deq.DEQ layers. Received: layers={layers!r}"
        )
    if not layers:
        raise ValueError(
            "`layers` is empty, so the callback would steer nothing. Pass None to steer "
            "every DEQ layer of the model, or a non-empty list of keras_deq.DEQ layers. "
            f"Received: layers={layers!r}"
        )
    for layer in layers:
        if not isinstance(layer, DEQ):
            raise ValueError(
                "`layers` must hold keras_deq.DEQ layers (DEQ or a subclass, such as "
                f"PcDEQ). Received an element of type {type(layer).__name__}: {layer!r}"
            )
    return list(layers)


def _deq_layers(callback, hint=""):
    """The DEQ layers a callback steers: its `layers`, or every DEQ of its model."""
    if callback.layers is not None:
        return list(callback.layers)
    found = [layer for layer in callback.model._flatten_layers() if isinstance(layer, DEQ)]
    if not found:
        raise ValueError(
            f"{type(callback).__name__} found no DEQ layer in the model. {hint}".rstrip()
        )
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
        self.layers = _check_layers(layers)
        self.verbose = verbose
        self.after = after
        self.pretrain_weight = pretrain_weight
        self._last = None

    def _targets(self):
        return _deq_layers(self)

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

    A `JacobianRegularizationScheduler` given this callback as `after=` counts
    its schedule's steps from the end of this phase, as the recipes do.

    Args:
        steps: Number of explicit training steps, an integer >= 0 (numpy
            integers too).
        depth: Cell applications per explicit forward pass, an integer >= 1.
        layers: A non-empty list of the `keras_deq.DEQ` layers to switch; None
            switches every `DEQ` in the model.
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
        self.steps = check_nonnegative_int("steps", steps)
        self.depth = check_positive_int("depth", depth)
        self.layers = _check_layers(layers)
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


# ------------------------------------------------------------------ SolverLogger
# The solver statistics a `SolverLogger` can show (each also as `val_<stat>`): column
# title and number format.
_STAT_COLUMNS = {
    "fwd_steps": ("fwd steps", ".2f"),
    "fwd_residual": ("fwd resid", ".2e"),
    "converged": ("converged", ".3f"),
    "bwd_steps": ("bwd steps", ".2f"),
    "bwd_residual": ("bwd resid", ".2e"),
    "jac_loss": ("jac loss", ".2e"),
}
_STATS = (*_STAT_COLUMNS, *(f"val_{stat}" for stat in _STAT_COLUMNS))
_MIN_WIDTH = 9


def _check_metrics(metrics):
    """Log keys to show, as a dict `key -> column title`."""
    if isinstance(metrics, Mapping):
        items = list(metrics.items())
    elif isinstance(metrics, (list, tuple)):
        items = [(key, key) for key in metrics]
    else:
        items = None
    if items is None or not all(
        isinstance(key, str) and key and isinstance(title, str) for key, title in items
    ):
        raise ValueError(
            "`metrics` must be a list or tuple of log keys (non-empty strings, such as "
            "'accuracy' or 'val_loss'), or a dict mapping log keys to column titles. "
            f"Received: metrics={metrics!r}"
        )
    return dict(items)


def _check_stats(stats):
    """A tuple of solver statistics, each one of `_STATS`."""
    if not isinstance(stats, (list, tuple)) or not all(stat in _STATS for stat in stats):
        raise ValueError(
            f"`stats` must be a list or tuple of solver statistics, each one of {_STATS}. "
            f"Received: stats={stats!r}"
        )
    return tuple(stats)


def _format_value(value, spec):
    """A log value in the format `spec`; None (auto) gives 4 decimals or 3 digits."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if spec is None:
        spec = (
            ".4f" if value == 0 or not math.isfinite(value) or 1e-3 <= abs(value) < 1e5 else ".3e"
        )
    return format(value, spec)


def _logged_or_last(logs, key, layer_stat, last):
    """`logs[key]`; else, for a training statistic that the logs lack (on JAX, whose
    `fit` logs hold no layer metrics), the layer's value after its last training batch
    (`last`: each layer's `solver_statistics()` then, by `id`)."""
    if logs.get(key) is not None or layer_stat is None or keras.backend.backend() == "tensorflow":
        return logs.get(key)
    layer, name = layer_stat
    return last[id(layer)].get(name)


class SolverLogger(keras.callbacks.Callback):
    """Prints one aligned line per epoch: chosen logs and the DEQ solver statistics.

    At the start of training it prints a header naming the columns; at the end
    of each epoch (or of every `every`-th and of the last one), a line with:

    - the epoch number (counted from 1);
    - the log entries named by `metrics` (4 decimals, or 3 significant digits
      in scientific notation for values below 1e-3 or from 1e5 on);
    - for each DEQ layer, the statistics named by `stats`, read from the logs
      at `{layer.name}_{stat}` (`val_{layer.name}_{stat}` for `val_` ones; on JAX,
      whose logs hold no layer metrics, the training ones are the layer's last
      training batch, `layer.solver_statistics()` before the epoch's
      validation, and `-` where it has none):
      steps with 2 decimals, residuals and `jac_loss` in scientific notation,
      `converged` with 3 decimals. With one DEQ layer the columns are titled
      by the statistic (`fwd steps`); with several, by the layer too
      (`deq1 fwd steps`);
    - the epoch's wall time in seconds (`epoch s`: from the epoch's start to
      its end, validation included; not cumulative).

    A value missing from the logs (a `val_` entry in an epoch without
    validation, a metric the model does not compute) prints as `-`.

    Args:
        metrics: The log entries to show before the solver statistics: a list
            or tuple of log keys (the column titles), or a dict mapping log
            keys to column titles.
        stats: The solver statistics to show per DEQ layer, a list or tuple of
            `fwd_steps`, `fwd_residual`, `converged`, `bwd_steps`,
            `bwd_residual`, `jac_loss`, each also as `val_<stat>` (the
            statistic in validation). Empty: no solver column, and the model
            needs no DEQ layer.
        layers: A non-empty list of the `keras_deq.DEQ` layers to report; None
            reports every `DEQ` in the model (an error if there is none and
            `stats` is not empty).
        prefix: A string put in front of every line, the header's too (e.g.
            the name of a worker, `"[worker-0] "`).
        print_fn: A function called with each line (a string without newline);
            None prints it to standard output at once (flushed).
        every: Print every `every` epochs (and the last epoch of `fit`), a
            positive integer.

    Example:

    ```python
    model.fit(x, y, epochs=3, validation_data=(x_val, y_val), verbose=0, callbacks=[
        keras_deq.callbacks.SolverLogger(),
    ])
    ```

    prints, for a model with one DEQ layer:

    ```
    epoch  accuracy val_accuracy fwd steps fwd resid bwd steps bwd resid converged epoch s
        1    0.8134       0.9083     12.37  8.81e-05     14.02  9.12e-05     1.000     2.9
        2    0.9317       0.9361     11.05  8.47e-05     12.88  8.93e-05     1.000     0.6
        3    0.9520       0.9444     10.61  8.62e-05     12.41  9.02e-05     1.000     0.6
    ```
    """

    def __init__(
        self,
        metrics=("accuracy", "val_accuracy"),
        stats=("fwd_steps", "fwd_residual", "bwd_steps", "bwd_residual", "converged"),
        layers=None,
        prefix="",
        print_fn=None,
        every=1,
    ):
        super().__init__()
        self.metrics = _check_metrics(metrics)
        self.stats = _check_stats(stats)
        self.layers = _check_layers(layers)
        if not isinstance(prefix, str):
            raise ValueError(f"`prefix` must be a string. Received: prefix={prefix!r}")
        self.prefix = prefix
        self.print_fn = None if print_fn is None else check_callable("print_fn", print_fn)
        self.every = check_positive_int("every", every)
        self._columns, self._widths = [], []
        self._start = None
        self._fitting = False
        self._before_validation = None

    def _print(self, line):
        if self.print_fn is None:
            print(line, flush=True)
        else:
            self.print_fn(line)

    def _solver_columns(self):
        """`(title, log key, format)` of each solver statistic of each DEQ layer."""
        if not self.stats:
            return []
        layers = _deq_layers(self, hint="Pass stats=() to show only the log entries.")
        columns = []
        for layer in layers:
            for stat in self.stats:
                validation = stat.startswith("val_")
                name = stat[4:] if validation else stat
                title, spec = _STAT_COLUMNS[name]
                title = f"val {title}" if validation else title
                if len(layers) > 1:
                    title = f"{layer.name} {title}"
                key = f"{'val_' if validation else ''}{layer.name}_{name}"
                columns.append((title, key, spec, None if validation else (layer, name)))
        return columns

    def _line(self, cells):
        return self.prefix + " ".join(
            cell.rjust(width) for cell, width in zip(cells, self._widths, strict=True)
        )

    def on_train_begin(self, logs=None):
        self._columns = [(title, key, None, None) for key, title in self.metrics.items()]
        self._columns += self._solver_columns()
        titles = ["epoch", *(column[0] for column in self._columns), "epoch s"]
        self._widths = [5, *(max(len(c[0]), _MIN_WIDTH) for c in self._columns), 7]
        self._print(self._line(titles))
        self._fitting = True

    def _last_statistics(self):
        """Each reported layer's `solver_statistics()` now (empty if not built), by `id`."""
        layers = {id(stat[0]): stat[0] for *_, stat in self._columns if stat is not None}
        return {
            key: layer.solver_statistics() if layer.built else {} for key, layer in layers.items()
        }

    def on_train_end(self, logs=None):
        self._fitting = False

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._before_validation = None

    def on_test_begin(self, logs=None):
        # On JAX the layers keep the statistics of their last call, so the epoch's
        # validation would overwrite the last training batch's: keep those first.
        if self._fitting and keras.backend.backend() != "tensorflow":
            self._before_validation = self._last_statistics()

    def on_epoch_end(self, epoch, logs=None):
        last = epoch + 1 == (self.params or {}).get("epochs")
        if (epoch + 1) % self.every and not last:
            return
        logs = logs or {}
        seconds = time.perf_counter() - self._start if self._start is not None else None
        cells = [str(epoch + 1)]
        latest = {}
        if keras.backend.backend() != "tensorflow":
            latest = self._before_validation or self._last_statistics()
        values = [_logged_or_last(logs, key, layer, latest) for _, key, _, layer in self._columns]
        cells += [
            "-" if value is None else _format_value(value, column[2])
            for value, column in zip(values, self._columns, strict=True)
        ]
        cells.append("-" if seconds is None else f"{seconds:.1f}")
        self._print(self._line(cells))
