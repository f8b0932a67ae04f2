"""MonotoneCell: the parametrization's monotonicity and each splitting step's contraction,
checked against NumPy at large weight norms."""

import keras
import numpy as np
import pytest
from keras import ops
from monotone_references import random_weights, weight_matrix

from keras_deq.layers import MonotoneCell

SPLITTINGS = ["peaceman_rachford", "forward_backward"]


def make_cell(n, d, norm, monotonicity=0.1, seed=0, **kwargs):
    """A built float32 cell whose `A` and `B` have spectral norm `norm`."""
    cell = MonotoneCell(n, monotonicity=monotonicity, **kwargs)
    cell.build((None, n), (None, d))
    a, b = random_weights(np.random.default_rng(seed), n, norm)
    cell.kernel_a.assign(a.astype("float32"))
    cell.kernel_b.assign(b.astype("float32"))
    return cell, cell.kernel_a.numpy().astype("float64"), cell.kernel_b.numpy().astype("float64")


@pytest.mark.parametrize("norm", [0.1, 4.0, 8.0, 16.0])
@pytest.mark.parametrize("monotonicity", [0.05, 0.5, 2.0])
def test_i_minus_w_is_strongly_monotone_for_any_weights(norm, monotonicity):
    n = 32
    cell, a, b = make_cell(n, 4, norm, monotonicity, seed=int(norm * 10))
    w = np.asarray(cell.weight_matrix(), "float64")
    want = weight_matrix(a, b, monotonicity)
    # float32: entries of A^T A are about norm^2, rounded to 1e-7 of that.
    atol = 1e-6 * max(norm**2, 1.0)
    np.testing.assert_allclose(w, want, atol=atol)
    np.testing.assert_allclose(np.asarray(cell.operator(), "float64"), np.eye(n) - want, atol=atol)
    symmetric = np.eye(n) - 0.5 * (want + want.T)
    assert np.linalg.eigvalsh(symmetric).min() >= monotonicity - 1e-9
    computed = np.eye(n) - 0.5 * (w + w.T)
    assert np.linalg.eigvalsh(computed).min() >= monotonicity - n * atol
    if norm >= 4:
        assert np.linalg.norm(want, 2) > 0.9 * norm**2  # W itself: far from a contraction


@pytest.mark.parametrize("norm", [0.5, 16.0])
def test_step_sizes_follow_from_the_weights(norm):
    m = 0.1
    fb, a, b = make_cell(24, 4, norm, m, splitting="forward_backward")
    lipschitz = np.linalg.norm(np.eye(24) - weight_matrix(a, b, m), 2)
    upper = float(fb.lipschitz_upper())
    assert lipschitz * (1 - 1e-6) <= upper <= lipschitz * 24 ** (1 / 64) * (1 + 1e-6)
    alpha = float(fb.step_size())
    assert alpha == pytest.approx(m / upper**2, rel=1e-5)
    assert alpha < 2 * m / lipschitz**2  # the forward-backward condition, certified
    pr, _, _ = make_cell(24, 4, norm, m)
    assert float(pr.step_size()) == pytest.approx(1 / np.sqrt(m * upper), rel=1e-5)
    fixed, _, _ = make_cell(24, 4, norm, m, alpha=0.25)
    assert float(fixed.step_size()) == pytest.approx(0.25)


def contraction_factor(cell, a, b):
    """The splitting's proven Lipschitz constant, from NumPy's exact `L`."""
    m = cell.monotonicity
    lipschitz = np.linalg.norm(np.eye(a.shape[0]) - weight_matrix(a, b, m), 2)
    alpha = float(cell.step_size())
    if cell.splitting == "forward_backward":
        return np.sqrt(1 - 2 * alpha * m + alpha**2 * lipschitz**2)
    return np.sqrt(1 - 4 * alpha * m / (1 + alpha * lipschitz) ** 2)


@pytest.mark.parametrize("splitting", SPLITTINGS)
@pytest.mark.parametrize("norm", [4.0, 16.0])
def test_each_step_is_a_contraction_where_plain_iteration_expands(splitting, norm):
    n, d = 16, 6
    cell, a, b = make_cell(n, d, norm, splitting=splitting, seed=3)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, d)).astype("float32")
    v1, v2 = (rng.normal(scale=3.0, size=(64, n)).astype("float32") for _ in range(2))
    t1, t2 = (np.asarray(cell(ops.convert_to_tensor(v), x), "float64") for v in (v1, v2))
    ratio = np.linalg.norm(t1 - t2, axis=1) / np.linalg.norm(v1 - v2, axis=1)
    rho = contraction_factor(cell, a, b)
    assert rho < 1
    assert ratio.max() <= rho + 1e-5
    # The plain map relu(W z + u) with the same W expands some of the same pairs.
    w = weight_matrix(a, b, cell.monotonicity)
    p1, p2 = (np.maximum(v.astype("float64") @ w.T, 0) for v in (v1, v2))
    assert (np.linalg.norm(p1 - p2, axis=1) / np.linalg.norm(v1 - v2, axis=1)).max() > 1


@pytest.mark.parametrize("splitting", SPLITTINGS)
def test_readout_and_state_shape(splitting):
    cell = MonotoneCell(5, splitting=splitting)
    assert cell.state_shape((None, 3)) == (5,)
    state = ops.convert_to_tensor([[-1.0, 2.0, 0.0, -3.0, 4.0]])
    got = np.asarray(cell.readout(state))
    want = [[0.0, 2.0, 0.0, 0.0, 4.0]] if splitting == "peaceman_rachford" else state
    np.testing.assert_allclose(got, want)


def test_config_round_trip():
    cell = MonotoneCell(7, monotonicity=0.3, alpha=0.5, kernel_initializer="orthogonal")
    again = MonotoneCell.from_config(cell.get_config())
    assert again.get_config() == cell.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(cell))
    assert isinstance(restored, MonotoneCell) and restored.alpha == 0.5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"units": 0}, "units"),
        ({"units": 4, "monotonicity": 0}, "monotonicity"),
        ({"units": 4, "monotonicity": -0.1}, "monotonicity"),
        ({"units": 4, "monotonicity": float("inf")}, "monotonicity"),
        ({"units": 4, "monotonicity": "big"}, "monotonicity"),
        ({"units": 4, "splitting": "douglas_rachford"}, "splitting"),
        ({"units": 4, "alpha": 0.0}, "alpha"),
        ({"units": 4, "alpha": -1.0}, "alpha"),
        ({"units": 4, "splitting": "forward_backward", "alpha": 0.1}, "alpha"),
        ({"units": 4, "kernel_initializer": "no_such_initializer"}, "kernel_initializer"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MonotoneCell(**kwargs)


def test_build_checks_the_shapes():
    with pytest.raises(ValueError, match=r"\(batch, 4\)"):
        MonotoneCell(4).build((None, 5), (None, 3))
    with pytest.raises(ValueError, match="one input tensor"):
        MonotoneCell(4).build((None, 4), [(None, 3), (None, 3)])
