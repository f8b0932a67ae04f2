"""benchmarks/lipschitz_speedup.py --quick: both models train on two seeds, the Lipschitz one
converges in fewer forward steps, and the seed table gives the medians (a smoke run)."""

import pytest
from scripts import load_script

pytestmark = pytest.mark.tensorflow_only("the benchmark reads the DEQ metrics of `train_on_batch`")


def test_seed_table_and_medians(capsys):
    module = load_script("benchmarks/lipschitz_speedup.py")
    result = module.main(["--quick", "--seeds", "0", "1", "--threads", "0"])
    out = capsys.readouterr().out
    assert "| seed | train step | inference | fwd steps |" in out and "| median |" in out
    assert [run["seed"] for run in result["runs"]] == [0, 1]
    for run in result["runs"]:
        lipschitz = run["rows"]["lipschitz"]
        assert lipschitz["converged"] == 1.0 and lipschitz["bound"] < 1
        assert run["ratios"]["fwd"] > 2 and run["constraints_ms"] > 0
    fwd = sorted(run["ratios"]["fwd"] for run in result["runs"])
    assert result["medians"]["fwd"] == pytest.approx(sum(fwd) / 2)


def test_merge_reads_the_seed_rows_of_saved_outputs(tmp_path, capsys):
    module = load_script("benchmarks/lipschitz_speedup.py")
    header = "| seed | train step | inference | fwd steps | bwd steps | ..."
    (tmp_path / "a.txt").write_text(
        f"{header}\n| 0 | 3.00x | 4.00x | 4.50x | 6.00x | 94.00% | 93.00% | -1.00 | 90.0 | 9.0 |\n"
        "| median | 3.00x | 4.00x | 4.50x | 6.00x | 94.00% | 93.00% | -1.00 | 90.0 | 9.0 |\n"
    )
    (tmp_path / "b.txt").write_text(
        "| 1 | 3.50x | 3.00x | 4.50x | 5.00x | 92.00% | 93.50% | +1.50 | 80.0 | 8.0 |\n"
        "| 2 | 2.50x | 5.00x | 4.40x | 7.00x | 95.00% | 93.00% | -2.00 | 70.0 | 7.0 |\n"
    )
    result = module.main(["--merge", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    assert [run["seed"] for run in result["runs"]] == [0, 1, 2]
    assert result["medians"]["step"] == 3.0 and result["medians"]["infer"] == 4.0
    assert result["medians"]["acc"] == pytest.approx(-0.01)
    assert "| median | 3.00x | 4.00x | 4.50x | 6.00x | 94.00% | 93.00% | -1.00 |" in (
        capsys.readouterr().out
    )
