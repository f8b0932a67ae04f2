"""benchmarks/conv_step.py runs and prints its table (a smoke run; the timings are its own)."""

import pytest
from scripts import load_script

pytestmark = pytest.mark.tensorflow_only("the benchmark times TensorFlow graphs")


def test_conv_step_prints_every_solver_and_plan(capsys):
    module = load_script("benchmarks/conv_step.py")
    module.main(["--fwd", "3", "--bwd", "2", "--repeats", "1", "--calls", "1", "--threads", "0"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    # header, two bare loops, two rows per forward solver and plan
    assert len(rows) == 1 + 2 + 2 * 3 * 2
    for solver in ("fixed_point", "anderson"):
        for plan in ("False", "auto", "True"):
            assert sum(f"| {solver} | {plan} |" in row for row in rows) == 2
