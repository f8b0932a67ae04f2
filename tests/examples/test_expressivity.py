"""examples/synthetic/construction.py: a hand-set ReLU DEQ is exactly the 2^k-piece sawtooth.

Issue 17: the trained width-10 DEQ of `benchmarks/expressivity.py` predicts the mean on the
32-piece sawtooth, yet the model class holds the target. These tests pin that down: the
hand-set `keras_deq.DEQ(DenseCell(2k, "relu"))` (nilpotent W, plain fixed-point iteration)
matches an independent numpy tent-map composition on a dense grid, in k + 1 solver steps.
"""

import keras
import numpy as np
import pytest
from scripts import load_script

construction = load_script("examples/synthetic/construction.py")


def numpy_sawtooth(x, k):
    """t^{∘k} written independently of the example: the triangle wave of period 2^(1-k)."""
    phase = np.mod(np.asarray(x, "float64") * 2.0 ** (k - 1), 1.0)
    return 1.0 - np.abs(2.0 * phase - 1.0)


@pytest.mark.parametrize("k,width", [(5, 10), (10, 20)])
def test_hand_set_deq_is_the_sawtooth(k, width):
    model = construction.build_sawtooth_deq(k, width)
    deq = model.get_layer("deq")
    weights = construction.sawtooth_weights(k, width)
    assert construction.nilpotency_index(weights["kernel"]) == k
    # Strictly upper triangular in the cell's row-vector convention z W.
    np.testing.assert_array_equal(np.triu(weights["kernel"], 1), weights["kernel"])
    # A dense dyadic grid (4 points per linear piece and the breakpoints) plus random points.
    grid = np.arange(2 ** (k + 2) + 1) / 2 ** (k + 2)
    rand = np.random.default_rng(k).uniform(0.0, 1.0, 4096)
    x = np.concatenate([grid, rand]).astype("float32")[:, None]
    pred = keras.ops.convert_to_numpy(model(x))[:, 0].astype("float64")
    target = numpy_sawtooth(x[:, 0], k)
    assert np.max(np.abs(pred - target)) < 1e-5
    # Plain iteration from z = 0 fills one level per step: z_k is the exact fixed point,
    # and the (k + 1)-th cell evaluation sees a zero residual.
    stats = deq.solver_statistics()
    assert stats["fwd_steps"] == k + 1
    assert stats["converged"] == 1.0
    # 2^k linear pieces on the grid, slopes ±2^k.
    slopes = np.diff(pred[: len(grid)]) / np.diff(grid)
    np.testing.assert_allclose(np.abs(slopes), 2.0**k, rtol=1e-5)
    assert 1 + np.count_nonzero(np.diff(np.sign(slopes))) == 2**k


def test_fewer_steps_do_not_reach_the_fixed_point():
    # With a budget of k steps the solver stops one evaluation short of seeing the
    # zero residual: the construction needs its k + 1 steps, not fewer.
    k = 5
    model = construction.build_sawtooth_deq(k, max_iter=k, on_failure="ignore")
    deq = model.get_layer("deq")
    x = np.linspace(0.0, 1.0, 257, dtype="float32")[:, None]
    model(x)
    assert deq.solver_statistics()["converged"] < 1.0


def test_example_main_prints_error_and_steps(capsys):
    r = construction.main(["--k", "5"])
    out = capsys.readouterr().out
    assert "6 cell evaluations" in out and "32 linear pieces" in out
    assert r["max_abs_error"] < 1e-5 and r["pieces"] == 32


def test_rejects_a_width_too_small():
    with pytest.raises(ValueError, match="width >= 2k"):
        construction.sawtooth_weights(5, 8)
