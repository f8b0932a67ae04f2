"""benchmarks/krylov_adjoint.py --quick: both adjoints train the digits DEQ (and, slow, the
DEQ-Transformer language model) and solve its adjoint to the tolerance (smoke runs; the
timings are their own)."""

import pytest
from scripts import load_script

pytestmark = pytest.mark.tensorflow_only("the benchmark reads the DEQ metrics of `fit` logs")


def test_anderson_and_gmres_adjoints_train_and_solve(capsys):
    module = load_script("benchmarks/krylov_adjoint.py")
    result = module.main(["--quick", "--threads", "0"])
    out = capsys.readouterr().out
    assert "| seed | adjoint | bwd evals / step (first → last epoch) |" in out
    assert "| scale | tol | adjoint | evals | met tol |" in out
    trained = {row["adjoint"]: row for row in result["train"]}
    assert set(trained) == {"anderson", "gmres"}
    for row in trained.values():
        assert 1 < row["bwd"][0] <= 30 and row["bwd_res"] <= 1e-4 and row["ms_per_step"] > 0
    solves = {row["adjoint"]: row for row in result["solves"]}
    assert set(solves) == {"anderson(5)", "gmres(20)"}
    assert solves["gmres(20)"]["conv"] == 1.0 and solves["gmres(20)"]["res"] <= 1e-4
    assert solves["anderson(5)"]["conv"] == 1.0


@pytest.mark.slow  # a minute on 2 shared cores: two language models traced and trained
def test_language_model_adjoints_train_and_solve_per_position(capsys):
    module = load_script("benchmarks/krylov_adjoint.py")
    result = module.main(["--model", "lm", "--quick", "--threads", "0"])
    out = capsys.readouterr().out
    assert "| adjoint | bwd evals / step (first → last quarter) |" in out
    assert "validation windows (" in out and "| scale | tol | adjoint | evals | met tol |" in out
    trained = {row["adjoint"]: row for row in result["train"]}
    assert set(trained) == {"anderson", "gmres"}
    for row in trained.values():
        assert 1 < row["bwd"][0] <= 12 and row["bwd_res"] <= 1e-3 and row["ms_per_step"] > 0
        assert 0 < row["val_bpc"] < 10
    # Same initial weights and batches, and adjoints to the same tolerance: the same run.
    assert abs(trained["anderson"]["val_bpc"] - trained["gmres"]["val_bpc"]) < 0.05
    solves = {row["adjoint"]: row for row in result["solves"]}
    assert set(solves) == {"anderson(5)", "gmres(20)", "gmres(20) apart"}
    for row in solves.values():
        assert row["conv"] == 1.0 and row["res"] <= 1e-3
