"""benchmarks/opteq_prior.py: the paired comparison's statistics, and a --quick smoke run in
which the prior is chosen on the validation split."""

import pytest
from scripts import load_script

pytestmark = pytest.mark.tensorflow_only("the benchmark trains Keras models on TensorFlow")


def test_paired_statistics():
    paired = load_script("benchmarks/opteq_prior.py").paired
    result = paired([0.01, 0.02, 0.0, 0.03, -0.01])
    assert result["mean"] == pytest.approx(0.01)
    # t(0.975, 4) = 2.776; std 0.01581 / sqrt(5)
    assert result["high"] - result["mean"] == pytest.approx(2.7764 * 0.015811 / 5**0.5, rel=1e-3)
    assert (result["wins"], result["ties"], result["losses"]) == (3, 1, 1)
    assert result["sign_p"] == pytest.approx(0.625)  # 3 of 4, two-sided
    assert 0 < result["wilcoxon_p"] <= 1
    assert paired([0.0, 0.0])["sign_p"] == 1.0


def test_candidate_syntax():
    module = load_script("benchmarks/opteq_prior.py")
    assert module.parse_candidate("l2:structural:0.3") == {
        "prior": "l2",
        "prior_mode": "structural",
        "prior_strength": 0.3,
    }
    with pytest.raises(SystemExit):
        module.parse_args(["--grid", "decorrelation"])


def test_quick_run_chooses_on_validation(capsys):
    module = load_script("benchmarks/opteq_prior.py")
    result = module.main(["--quick", "--threads", "0"])
    out = capsys.readouterr().out
    assert "| Model | Validation acc. (mean ± std) |" in out and "chosen on validation:" in out
    assert set(result["results"]) == {"none", result["chosen"]}
    for accuracies in result["results"].values():
        assert len(accuracies["val"]) == len(accuracies["test"]) == 2


def test_merge_keeps_the_seeds_every_candidate_has(tmp_path):
    module = load_script("benchmarks/opteq_prior.py")
    (tmp_path / "a.txt").write_text(
        "  none, seed 0: val 0.9500, test 0.9400 (80 s)\n"
        "  none, seed 1: val 0.9600, test 0.9500 (80 s)\n"
    )
    (tmp_path / "b.txt").write_text("  l2:structural:0.3, seed 1: val 0.9700, test 0.9610 (9 s)\n")
    results = module.merge([tmp_path / "b.txt", tmp_path / "a.txt"])
    assert list(results) == ["none", "l2:structural:0.3"]
    assert results["none"] == {"val": [0.96], "test": [0.95]}
    assert results["l2:structural:0.3"] == {"val": [0.97], "test": [0.961]}
