"""benchmarks/pcdeq_norms.py --quick: pcDEQ converges at ||W||_2 = 8, the plain DEQ does not."""

import pytest
from scripts import load_script

pytestmark = pytest.mark.tensorflow_only("the benchmark reads the DEQ metrics of `fit` logs")


def test_pcdeq_converges_where_the_plain_deq_does_not(capsys):
    module = load_script("benchmarks/pcdeq_norms.py")
    result = module.main(["--quick", "--threads", "0"])
    out = capsys.readouterr().out
    assert "| ‖W‖₂ | seed | pcDEQ conv |" in out
    assert "| start ‖W‖₂ | seed | model |" in out
    norm, _, largest = max(result["sweep"], key=lambda row: row[0])
    assert norm == 8.0
    assert largest["pcdeq"]["conv"] == 1.0
    assert largest["deq"]["conv"] < 0.5 and largest["deq"]["steps"] == 200
    trained = {row["model"]: row for row in result["train"]}
    assert trained["pcdeq"]["conv"] == 1.0 and trained["pcdeq"]["test_conv"] == 1.0
    assert trained["deq"]["test_conv"] < 0.5
