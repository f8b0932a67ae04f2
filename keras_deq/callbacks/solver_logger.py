"""`SolverLogger`: one line per epoch with the metrics and every DEQ layer's solver
statistics."""

import math
import time
from collections.abc import Mapping

import keras

from keras_deq.callbacks import common
from keras_deq.solvers.common import check_callable, check_positive_int

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
        self.layers = common.check_layers(layers)
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
        layers = common.deq_layers(self, hint="Pass stats=() to show only the log entries.")
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
