"""A progress bar with an ETA for the benchmarks that run for minutes.

`Progress(total)` draws a `keras.utils.Progbar` over a benchmark's units of work (runs,
trainings, training steps): how many are done, the elapsed time per unit and an estimate
of the time left. It draws on stderr, so that stdout holds what the benchmark prints, the
final tables included, unchanged. `progress.print(...)` prints a line (a per-run result)
above the bar; `progress.callback()` advances the bar by one per training batch of `fit`.

    with Progress(len(runs), unit_name="run") as progress:
        for run in runs:
            result = measure(run)
            progress.advance()
            progress.print(f"  {run}: {result}")
    print(table)
"""

import contextlib
import sys

import keras


class Progress:
    """A `keras.utils.Progbar` on stderr over `total` units of work.

    Args:
        total: Units of work in the whole benchmark.
        unit_name: Their name in the time per unit (`"run"`, `"step"`, ...).
        stream: Where the bar is drawn (stderr by default).
    """

    def __init__(self, total, unit_name="run", stream=None):
        self.total = int(total)
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self._closed = False
        with self._drawing():
            self.bar = keras.utils.Progbar(self.total, unit_name=unit_name, interval=0.0)
            self.bar.update(0)

    @contextlib.contextmanager
    def _drawing(self):
        # Progbar writes to sys.stdout: point it at the bar's stream meanwhile.
        with contextlib.redirect_stdout(self.stream):
            yield

    def advance(self, n=1):
        """Counts `n` more units done and redraws the bar (its ETA)."""
        self.done = min(self.done + n, self.total)
        if not self._closed:
            with self._drawing():
                self.bar.update(self.done)
            self._closed = self.done >= self.total  # the bar ended its line

    def print(self, *args, **kwargs):
        """`print(*args, **kwargs)` (stdout unless `file=`) above the bar, then the bar again."""
        if not self._closed:
            self.stream.write("\r" + " " * self.bar._prev_total_width + "\r")
            self.stream.flush()
        print(*args, **{"flush": True, **kwargs})
        if not self._closed:
            with self._drawing():
                self.bar.update(self.done)

    def close(self):
        """Ends the bar's line, if the work ended before the count did."""
        if not self._closed:
            self.stream.write("\n")
            self.stream.flush()
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def callback(self):
        """A `keras.callbacks.Callback` that advances the bar by one per training batch."""
        progress = self

        class Advance(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                progress.advance()

        return Advance()
