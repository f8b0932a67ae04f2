"""benchmarks/mondeq_norms.py --quick: monDEQ converges to the equation's unique solution at
||A||_2 = ||B||_2 = 8, plain iteration of the same equation and an unconstrained DEQ do not."""

import math

import pytest
from scripts import load_script

pytestmark = pytest.mark.tensorflow_only("the benchmark reads the DEQ metrics of `fit` logs")


def test_mondeq_converges_where_plain_iteration_does_not(capsys):
    module = load_script("benchmarks/mondeq_norms.py")
    result = module.main(["--quick", "--threads", "0"])
    out = capsys.readouterr().out
    assert "| ‖A‖₂ = ‖B‖₂ | seed | ‖W‖₂ | pr conv |" in out
    assert "| start norm | seed | model |" in out
    norm, _, w_norm, largest = max(result["sweep"], key=lambda row: row[0])
    assert norm == 8.0 and w_norm > 50
    assert largest["pr"]["conv"] == 1.0 and largest["pr"]["err"] < 1e-3
    assert largest["same-W"]["conv"] == 0.0 and largest["same-W"]["err"] > 0.5
    assert largest["deq"]["conv"] < 0.5 and math.isnan(largest["deq"]["err"])
    trained = {row["model"]: row for row in result["train"]}
    assert trained["mondeq"]["conv"] == 1.0 and trained["mondeq"]["test_conv"] == 1.0
    assert trained["mondeq"]["finite"]
    assert trained["deq"]["test_conv"] < 0.5
