"""The README's demo: examples/digits.py."""

import importlib.util
import pathlib
import time

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "digits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("digits_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_demo_prints_accuracy_and_solver_stats(capsys):
    accuracy = load_example().main(["--epochs", "2", "--width", "32"])
    out = capsys.readouterr().out
    header, *rows = [line for line in out.splitlines() if line.strip()]
    for column in ("test acc", "fwd steps", "fwd resid", "bwd steps", "bwd resid"):
        assert column in header
    assert len([r for r in rows if r.split()[0].isdigit()]) == 2
    assert "test accuracy:" in out
    assert accuracy > 0.5


@pytest.mark.slow
def test_digits_demo_reaches_95_percent_within_3_minutes():
    start = time.perf_counter()
    accuracy = load_example().main([])
    assert accuracy >= 0.95
    assert time.perf_counter() - start < 180
