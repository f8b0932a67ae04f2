"""benchmarks/steep_separation.py: the hand-set DEQ is the steep target δ / (‖x‖² + δ) with
weights in [0, 1] for every d and δ, and the data and width matching are as documented."""

import keras
import numpy as np
import pytest
from scripts import load_script

steep = load_script("benchmarks/steep_separation.py")


def numpy_target(x, delta):
    # Written apart from the script: the rescaled 1 / (|x|^2 + δ).
    x = np.asarray(x, dtype="float64")
    return delta / (np.einsum("nd,nd->n", x, x) + delta)


def constructed(d, delta, tol):
    model = steep.build_deq(d, width=1, max_iter=30, tol=tol)
    model.build((None, d))
    return steep.construction(model, delta)


@pytest.mark.parametrize("d", [6, 20])
@pytest.mark.parametrize("log2_delta", [-5, -10])
def test_construction_is_the_target_in_float32(d, log2_delta):
    delta = 2.0**log2_delta
    model = constructed(d, delta, tol=1e-6)
    _, _, x, _ = steep.steep_ball(d, delta, 8, 1024, seed=1)
    out = keras.ops.convert_to_numpy(model(x))[:, 0].astype("float64")
    y = numpy_target(x, delta)
    # The fixed point z = (1 - q) z + δ is conditioned by 1 / q <= 1 / δ: float32 rounding
    # of one cell evaluation (2^-24 relative) becomes up to about 2^-24 / δ in z*.
    np.testing.assert_allclose(out, y, rtol=4 * 2.0**-24 / delta, atol=0)
    assert out[0] == pytest.approx(1.0, rel=4 * 2.0**-24 / delta)  # x = 0: the maximum
    assert steep.train_lib.max_abs_weight(model) <= 1.0  # whatever δ and d
    stats = model.get_layer("deq").solver_statistics()
    assert stats["converged"] == 1.0
    assert stats["fwd_steps"] <= 6  # Anderson on a scalar linear map


def test_construction_is_the_target_in_float64():
    d, delta = 20, 2.0**-10
    previous = keras.config.floatx(), keras.config.dtype_policy()
    # The global policy, once read, no longer follows floatx: set both.
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        model = constructed(d, delta, tol=1e-13)
        _, _, x, _ = steep.steep_ball(d, delta, 8, 256, seed=2)
        out = keras.ops.convert_to_numpy(model(x.astype("float64")))[:, 0]
    finally:
        keras.config.set_floatx(previous[0])
        keras.config.set_dtype_policy(previous[1])
    np.testing.assert_allclose(out, numpy_target(x, delta), rtol=1e-9, atol=0)


def test_plain_iteration_contracts_at_one_minus_q():
    d, delta = 6, 2.0**-10
    model = constructed(d, delta, tol=1e-6)
    cell = model.get_layer("deq").cell
    x = np.zeros((1, d), "float32")
    z = np.zeros((1, 1), "float32")
    residuals = []
    for _ in range(3):
        nxt = keras.ops.convert_to_numpy(cell(z, x))
        residuals.append(float(np.abs(nxt - z)[0, 0]))
        z = nxt
    # q(0) = δ: plain iteration gains a factor 1 - δ per step, hence Anderson.
    assert residuals[2] / residuals[1] == pytest.approx(1 - delta, abs=1e-5)


def test_data_and_matching():
    d, delta = 10, 2.0**-10
    x_train, y_train, x_test, y_test = steep.steep_ball(d, delta, 4096, 512, seed=0)
    assert x_train.shape == (4096, d) and y_test.shape == (512, 1)
    sq = np.sum(x_train.astype("float64") ** 2, axis=1)
    assert sq.max() <= 1.0 + 1e-6 and sq.min() < delta / 4  # the unit ball, down to its core
    assert 0.05 < np.mean(sq < 4 * delta) < 0.3  # the steep region is sampled
    np.testing.assert_allclose(y_train[:, 0], numpy_target(x_train, delta), rtol=1e-6)
    assert y_test[0, 0] == 1.0 and not x_test[0].any()
    target = steep.deq_params(d, 4)
    for depth in (2, 3, 4):
        width = steep.matched_fnn_width(d, depth, target)
        params = steep.train_lib.fnn_params(d, width, depth)
        assert abs(params - target) <= abs(steep.train_lib.fnn_params(d, width + 1, depth) - target)
        assert abs(params - target) <= abs(steep.train_lib.fnn_params(d, width - 1, depth) - target)


@pytest.mark.slow
def test_quick_run_prints_every_model(capsys):
    out = steep.main(["--quick", "--wide", "16"])
    models = [(r["model"], r["match"]) for r in out["rows"]]
    assert models == [
        ("deq", "-"),
        ("fnn-L2", "params"),
        ("fnn-L3", "params"),
        ("fnn-L4", "params"),
        ("fnn-L3", "none"),
    ]
    assert "FNN/DEQ max abs weight" in capsys.readouterr().out
    assert all(np.isfinite(r["max_weight"]) for r in out["runs"])
