"""benchmarks/progress.py: the progress bar (with an ETA) of the long benchmarks."""

import io
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
from progress import Progress  # noqa: E402


def test_bar_on_its_stream_lines_on_stdout(capsys):
    stream = io.StringIO()
    with Progress(3, unit_name="run", stream=stream) as progress:
        for k in range(3):
            progress.advance()
            progress.print(f"run {k} done")
    assert capsys.readouterr().out == "run 0 done\nrun 1 done\nrun 2 done\n"
    bar = stream.getvalue()
    assert "1/3" in bar and "3/3" in bar and "/run" in bar
    assert bar.endswith("\n") and bar.count("\n") == 1  # one line, ended when the work ends


def test_unfinished_bar_ends_its_line_and_counts_fit_batches():
    import keras
    import numpy as np

    stream = io.StringIO()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with Progress(10, unit_name="step", stream=stream) as progress:
        x = np.zeros((8, 2), "float32")
        model.fit(x, x[:, :1], batch_size=2, epochs=1, verbose=0, callbacks=[progress.callback()])
        assert progress.done == 4
    assert " 4/10" in stream.getvalue() and stream.getvalue().endswith("\n")
