"""benchmarks/implicit_bias.py: the diagonal linear DEQ computes theta = beta / (1 - lambda),
and the reference interpolators interpolate."""

import keras
import numpy as np
from scripts import load_script

bias = load_script("benchmarks/implicit_bias.py")


def test_diagonal_deq_is_the_linear_predictor_beta_over_one_minus_lambda():
    d = 6
    model = bias.build("deq", d, 0.01)
    rng = np.random.default_rng(0)
    model.get_layer("deq").cell.lam.assign(rng.uniform(-0.8, 0.8, d).astype("float32"))
    model.get_layer("readout").kernel.assign(rng.normal(size=(d, 1)).astype("float32"))
    theta, inverse = bias.predictor(model, "deq")
    x = rng.normal(size=(32, d)).astype("float32")
    out = keras.ops.convert_to_numpy(model(x))[:, 0]
    np.testing.assert_allclose(out, x @ theta, rtol=1e-4, atol=1e-4)
    assert np.all(inverse > 0)


def test_diagonal_network_and_interpolators():
    d = 8
    model = bias.build("diag-net", d, 0.5)
    theta, _ = bias.predictor(model, "diag-net")
    np.testing.assert_array_equal(theta, np.zeros(d))  # u = v at the start
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4, d)), rng.normal(size=4)
    l1 = bias.min_l1_interpolator(x, y)
    np.testing.assert_allclose(x @ l1, y, atol=1e-7)
    l2 = np.linalg.pinv(x) @ y
    assert np.sum(np.abs(l1)) <= np.sum(np.abs(l2)) + 1e-9
    assert bias.participation(np.array([1.0, 0, 0])) == 1.0
    assert bias.participation(np.ones(5)) == 5.0
