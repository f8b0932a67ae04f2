"""benchmarks/jacobian_steps.py: steps at equal quality, and a --quick smoke run."""

import math

import pytest
from scripts import load_script

bench = load_script("benchmarks/jacobian_steps.py")


def record(at, quality, steps):
    return {"at": at, "q": quality, "fwd": steps, "bwd": steps, "val_fwd": steps,
            "cum_steps": steps * at}  # fmt: skip


def test_matched_takes_the_best_quality_both_reach_and_the_first_time_each_does():
    curves = {
        "plain": [record(1, 3.0, 10), record(2, 2.5, 20), record(3, 2.8, 30)],
        "regularized": [record(1, 3.1, 5), record(2, 2.7, 6), record(3, 2.4, 7)],
    }
    target, reached = bench.matched(curves, "q", higher_is_better=False)
    assert target == 2.5  # the plain run's best; the regularized run goes lower
    assert reached["plain"]["at"] == 2 and reached["regularized"]["at"] == 3
    row = bench.ratio_row("x", target, reached, "plain", "regularized")
    assert "| 2 / 3 |" in row and "| 2.86 |" in row  # 20 / 7
    target, reached = bench.matched(curves, "q", higher_is_better=True)
    assert target == 3.0 and reached["plain"]["at"] == 1 and reached["regularized"]["at"] == 1


# ~26 s of CPU (two DEQ-Transformers traced, one with the second-order penalty): slow.
@pytest.mark.slow
def test_quick_language_model_run(capsys):
    result = bench.main(["--part", "lm", "--quick", "--threads", "0"])
    assert set(result["curves"]) == {"deq", "deq+jr"}
    assert not math.isnan(result["target"]) and set(result["reached"]) == {"deq", "deq+jr"}
    assert "| lm, seed 0 |" in capsys.readouterr().out
