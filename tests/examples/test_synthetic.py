"""examples/synthetic: the paper-004 stand-in generators and the training script."""

import numpy as np
import pytest
from scripts import load_script

tasks = load_script("examples/synthetic/tasks.py")


def count_linear_pieces(fn, resolution_bits):
    """Pieces of a piecewise-linear fn on [0, 1], from slope changes on a dyadic grid."""
    x = np.arange(2**resolution_bits + 1, dtype="float64") / 2**resolution_bits
    slopes = np.diff(fn(x)) / np.diff(x)
    return 1 + int(np.count_nonzero(np.abs(np.diff(slopes)) > 1e-6))


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_tent_composition_has_2_to_the_k_linear_pieces(k):
    # Breakpoints are at j / 2^k: exact on a finer dyadic grid.
    assert count_linear_pieces(lambda x: tasks.sawtooth_fn(x, k), k + 3) == 2**k
    # And the slopes are ±2^k.
    x = np.arange(2 ** (k + 3) + 1) / 2 ** (k + 3)
    slopes = np.diff(tasks.sawtooth_fn(x, k)) / np.diff(x)
    np.testing.assert_allclose(np.abs(slopes), 2.0**k)


@pytest.mark.parametrize("name,k", [("sawtooth5", 5), ("sawtooth10", 10)])
def test_sawtooth_split(name, k):
    x_train, y_train, x_test, y_test = tasks.load(name, seed=3)
    assert x_train.shape == (4096, 1) and y_train.shape == (4096, 1)
    assert x_test.shape == (1024, 1) and y_test.shape == (1024, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.float32
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    np.testing.assert_allclose(y_train[:, 0], tasks.sawtooth_fn(x_train[:, 0], k), atol=1e-3)
    # Seeded: same seed same data, other seed other data.
    np.testing.assert_array_equal(tasks.load(name, seed=3)[0], x_train)
    assert not np.array_equal(tasks.load(name, seed=4)[0], x_train)


@pytest.mark.parametrize("delta", [2.0**-5, 2.0**-10])
def test_steep_values(delta):
    np.testing.assert_allclose(
        tasks.steep_fn([0.0, 0.5, 1.0], delta), [1 / delta, 1 / (0.5 + delta), 1 / (1 + delta)]
    )
    x_train, y_train, x_test, y_test = tasks.steep(delta, scaled=False, seed=1)
    np.testing.assert_allclose(
        y_train[:, 0], 1.0 / (x_train[:, 0].astype("float64") + delta), rtol=1e-5
    )
    # The test set holds both endpoints; x = 0 is the steepest point.
    assert x_test[0, 0] == 0.0 and x_test[1, 0] == 1.0
    np.testing.assert_allclose(y_test[0, 0], 1.0 / delta, rtol=1e-6)
    # Default: rescaled by δ to (0, 1].
    _, y_scaled, _, y_test_scaled = tasks.steep(delta, seed=1)
    np.testing.assert_allclose(y_scaled, delta * y_train, rtol=1e-5)
    assert y_test_scaled[0, 0] == pytest.approx(1.0)


def test_gotu_split_sizes_and_targets():
    x_train, y_train, x_test, y_test = tasks.gotu(10, seed=0)
    assert x_train.shape == (512, 10) and x_test.shape == (512, 10)
    assert y_train.shape == (512, 1) and y_test.shape == (512, 1)
    assert set(np.unique(x_train)) == {-1.0, 1.0}
    assert np.all(x_train[:, 0] == 1.0) and np.all(x_test[:, 0] == -1.0)
    for x, y in ((x_train, y_train), (x_test, y_test)):
        np.testing.assert_array_equal(y[:, 0], x[:, 0] * x[:, 1] + x[:, 2])
        assert set(np.unique(y)) == {-2.0, 0.0, 2.0}
    # The two halves are disjoint and together are the whole cube.
    rows = {tuple(r) for r in np.concatenate([x_train, x_test])}
    assert len(rows) == 1024
    # On the seen half f1 = x2 + x3; extrapolating that to x1 = -1 costs MSE 4.
    naive = x_test[:, 1] + x_test[:, 2]
    assert np.mean((naive - y_test[:, 0]) ** 2) == pytest.approx(4.0)


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="Unknown task"):
        tasks.load("sawtooth3")


def test_flop_and_parameter_counts():
    train = load_script("examples/synthetic/train.py")
    assert train.deq_params(1, 10) == 131
    assert train.deq_flops_per_iteration(1, 10) == 240
    assert train.fnn_params(1, 10, 3) == 141
    assert train.fnn_flops(1, 10, 3) == 2 * 10 + 10 + 2 * 100 + 10 + 2 * 10 + 1 + 20
    for match, count in (("params", train.fnn_params), ("flops", train.fnn_flops)):
        for depth in (2, 3, 4):
            w = train.matched_fnn_width(10, depth, 10, match)
            target = (
                train.deq_params(10, 10)
                if match == "params"
                else train.deq_flops_per_iteration(10, 10)
            )
            assert all(
                abs(count(10, w, depth) - target) <= abs(count(10, v, depth) - target)
                for v in range(1, 100)
            )


@pytest.mark.parametrize(
    "argv",
    [
        ["--task", "sawtooth5", "--model", "deq"],
        ["--task", "steep10", "--model", "fnn", "--depth", "3", "--match", "flops"],
        ["--task", "gotu", "--model", "fnn", "--depth", "2", "--match", "params"],
    ],
)
def test_train_main_smoke(argv, capsys):
    train = load_script("examples/synthetic/train.py")
    tiny = ["--epochs", "1", "--n-train", "256", "--n-test", "64", "--batch-size", "128"]
    result = train.main(argv + tiny)
    out = capsys.readouterr().out
    for text in ("test MSE", "L∞ error", "max |weight|"):
        assert text in out
    assert np.isfinite(result["test_mse"]) and np.isfinite(result["max_weight"])
    if "deq" in argv:
        assert "DEQ forward steps" in out
        assert 1 <= result["fwd_steps"] <= 30
    if "gotu" in argv:
        assert "GOTU error" in out and result["gotu"] == result["test_mse"]
    assert result["params"] > 0 and result["flops"] > 0
