"""benchmarks/krylov_adjoint.py --quick: both adjoints train the digits DEQ and solve its
adjoint to the tolerance (a smoke run; the timings are its own)."""

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
