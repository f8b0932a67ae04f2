"""PcDEQ: the positive-concave guarantee, checked without any norm bound on W."""

import pathlib
import sys

import keras
import numpy as np
import pytest
from feature_references import FLOAT_DTYPES, layer_gradients
from keras import ops

import keras_deq
from keras_deq.layers.pcdeq import PositiveConcaveCell, positive_injection

ACTIVATIONS = [(1, "tanh"), (1, "softsign"), (1, "relu6"), (2, "sigmoid")]


def picard(cell, x, z0, steps):
    """Plain fixed-point iteration written here, independent of the solvers."""
    z = z0
    for _ in range(steps):
        z = cell(z, x)
    return z


def make_cell(activation, n, scale, seed=0, kernel_size=None, channels=None):
    cell = PositiveConcaveCell(activation, kernel_size=kernel_size, dtype="float64")
    width = channels or n
    shape = (None, 8, 8, width) if kernel_size else (None, n)
    cell.build(shape, shape)
    rng = np.random.default_rng(seed)
    size = np.prod(cell.kernel.shape[:-1])
    cell.kernel.assign(rng.uniform(0, 1, cell.kernel.shape) * scale / np.sqrt(size))
    return cell


@pytest.mark.float64
@pytest.mark.parametrize("variant,activation", ACTIVATIONS)
@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0, 20.0])
def test_unique_fixed_point_from_very_different_starts(variant, activation, scale):
    n = 64
    cell = make_cell(activation, n, scale)
    rng = np.random.default_rng(1)
    x = positive_injection(ops.convert_to_tensor(rng.normal(size=(4, n))), variant)
    starts = [np.zeros((4, n)), rng.uniform(0, 10, (4, n)), rng.uniform(0, 1000, (4, n))]
    ends = [np.asarray(picard(cell, x, ops.convert_to_tensor(z0), 300)) for z0 in starts]
    spread = max(np.max(np.abs(e - ends[0])) for e in ends)
    assert spread < 1e-8
    assert np.all(ends[0] > 0)


@pytest.mark.float64
def test_geometric_rate_matches_spectral_radius_of_jacobian():
    n = 64
    cell = make_cell("tanh", n, 0.3)  # W entries U[0, 0.3 / sqrt(n)]
    x = positive_injection(ops.convert_to_tensor(np.random.default_rng(2).normal(size=(1, n))), 1)
    z_star = picard(cell, x, ops.zeros((1, n), "float64"), 400)
    z, residuals = ops.zeros((1, n), "float64"), []
    for _ in range(30):
        z_next = cell(z, x)
        residuals.append(float(ops.norm(z_next - z)))
        z = z_next
    rate = np.exp(np.polyfit(np.arange(5, 30), np.log(residuals[5:30]), 1)[0])
    rho = float(
        keras_deq.jacobian.spectral_radius(lambda s: cell(s, x), z_star, num_iters=300, seed=0)[0]
    )
    assert rate < 1
    assert abs(rate - rho) / rho < 0.05


def test_converges_with_large_norm_where_unconstrained_deq_fails():
    n = 32
    rng = np.random.default_rng(3)
    positive = rng.uniform(0, 1, (n, n))
    positive *= 3.0 / np.linalg.norm(positive, 2)  # ||W||_2 = 3
    signed = rng.normal(size=(n, n))
    signed *= 3.0 / np.linalg.norm(signed, 2)
    x = rng.normal(size=(8, n))

    pc = keras_deq.PcDEQ(units=n, max_iter=100, tol=1e-6, dtype="float64", on_failure="ignore")
    pc.build((None, n))
    pc.cell.kernel.assign(positive)
    pc(x)
    injection = positive_injection(ops.convert_to_tensor(x), 1)
    local = np.linalg.norm(np.diag(1 - np.tanh(np.asarray(injection)[0]) ** 2) @ positive.T, 2)
    assert local > 1  # not a Euclidean contraction near z = 0

    generic = keras_deq.DEQ(
        keras_deq.DenseCell(n, use_injection=False, dtype="float64"),
        solver="fixed_point",
        max_iter=100,
        tol=1e-6,
        dtype="float64",
        on_failure="ignore",
    )
    generic.build((None, n))
    generic.cell.kernel.assign(signed)
    generic(x)
    assert pc.solver_statistics()["converged"] == 1.0
    assert generic.solver_statistics()["converged"] < 1.0


@pytest.mark.parametrize("variant,activation", ACTIVATIONS)
def test_constraints_and_positivity_survive_aggressive_training(variant, activation):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(128, 16)).astype("float32"), rng.integers(0, 3, 128)
    layer = keras_deq.PcDEQ(units=16, variant=variant, activation=activation)
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(16), layer, keras.layers.Dense(3)]
    )
    model.compile(
        keras.optimizers.SGD(0.5), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(x, y, batch_size=16, epochs=6, verbose=0)  # 48 steps
    assert float(ops.min(layer.cell.kernel)) >= 0.0
    assert float(ops.max(layer.cell.kernel)) > 0.0
    z = model.layers[1](model.layers[0](x))
    assert np.all(np.asarray(z) > 0)


def test_injection_is_made_positive_inside_the_layer():
    h = ops.convert_to_tensor([[-5.0, 0.0, 3.0]])
    assert np.all(np.asarray(positive_injection(h, 1)) > 0)
    np.testing.assert_allclose(np.asarray(positive_injection(h, 2)), [[0.0, 0.0, 3.0]])
    # The failure mode the softplus prevents: with a zero injection both z = 0 and
    # a large z are fixed points of tanh(W z) when rho(W) = 8.
    cell = make_cell("tanh", 16, 1.0)
    cell.kernel.assign(np.full((16, 16), 0.5))
    zero = ops.zeros((1, 16), "float64")
    np.testing.assert_allclose(np.asarray(picard(cell, zero, zero, 50)), 0.0)
    assert float(ops.min(picard(cell, zero, ops.ones((1, 16), "float64"), 50))) > 0.9
    layer = keras_deq.PcDEQ(units=16, dtype="float64")
    layer.build((None, 16))
    layer.cell.kernel.assign(np.full((16, 16), 0.5))
    assert float(ops.min(layer(np.zeros((1, 16))))) > 0.9  # unique, positive


class PicardFromInjection(keras.layers.Layer):
    """`steps` plain iterations of `cell` from zero on the positive injection of the
    input (variant 1): PcDEQ unrolled, for autodiff."""

    def __init__(self, cell, steps):
        super().__init__(dtype=cell.dtype_policy)
        self.cell, self.steps = cell, steps
        self.built = True  # no variables but the (built) cell's

    def call(self, h, training=None):
        return picard(self.cell, positive_injection(h, 1), ops.zeros_like(h), self.steps)


@pytest.mark.float64
def test_backward_converges_and_matches_unrolled_gradient():
    n = 12
    rng = np.random.default_rng(5)
    layer = keras_deq.PcDEQ(units=n, tol=1e-12, max_iter=500, backward_tol=1e-10, dtype="float64")
    layer.build((None, n))
    layer.cell.kernel.assign(rng.uniform(0, 1, (n, n)) * 2 / np.sqrt(n))
    x = ops.convert_to_tensor(rng.normal(size=(3, n)))
    target = ops.convert_to_tensor(rng.normal(size=(3, n)))

    def loss(z):
        return ops.sum((z - target) ** 2)

    implicit = layer_gradients(layer, x, loss, [layer.cell.kernel])
    if keras.backend.backend() != "jax":  # JAX keeps no adjoint statistics
        assert float(layer._metrics_by_name["bwd_residual"].result()) < 1e-10
    unrolled = layer_gradients(PicardFromInjection(layer.cell, 300), x, loss, [layer.cell.kernel])
    for a, b in zip(implicit, unrolled, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-10)


def test_conv_form_unique_fixed_point_and_nonneg_kernel():
    cell = make_cell("tanh", None, 5.0, kernel_size=3, channels=4)
    rng = np.random.default_rng(6)
    x = positive_injection(ops.convert_to_tensor(rng.normal(size=(2, 8, 8, 4))), 1)
    ends = [
        np.asarray(picard(cell, x, ops.convert_to_tensor(z0), 300))
        for z0 in (np.zeros((2, 8, 8, 4)), rng.uniform(0, 100, (2, 8, 8, 4)))
    ]
    assert np.max(np.abs(ends[0] - ends[1])) < 1e-8
    layer = keras_deq.PcDEQ(filters=4)
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, padding="same"), layer]
    )
    model.compile(keras.optimizers.SGD(1.0), "mse")
    model.fit(rng.normal(size=(32, 8, 8, 1)), rng.normal(size=(32, 8, 8, 4)), epochs=3, verbose=0)
    assert float(ops.min(layer.cell.kernel)) >= 0.0


def test_weight_norm_starts_at_the_plain_kernel_and_keeps_gains_nonnegative():
    cell = PositiveConcaveCell("tanh", weight_norm=True)
    cell.build((None, 6), (None, 6))
    np.testing.assert_allclose(np.asarray(cell.effective_kernel()), cell.kernel.numpy(), rtol=1e-5)
    assert isinstance(cell.gain.constraint, keras.constraints.NonNeg)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one of `units`"),
        ({"units": 4, "filters": 4}, "exactly one of `units`"),
        ({"units": 0}, "units"),
        ({"units": 4, "variant": 3}, "variant"),
        ({"units": 4, "variant": 1, "activation": "sigmoid"}, "activation"),
        ({"units": 4, "variant": 2, "activation": "relu"}, "activation"),
        ({"filters": 4, "kernel_size": 0}, "kernel_size"),
        ({"units": 4, "softplus_beta": 0}, "softplus_beta"),
        ({"units": 4, "max_iter": 0}, "max_iter"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_deq.PcDEQ(**kwargs)


def test_input_width_must_match_units():
    with pytest.raises(ValueError, match="last dimension 8"):
        keras_deq.PcDEQ(units=8)(np.zeros((2, 5), "float32"))


def test_config_and_keras_file_round_trip(tmp_path):
    layer = keras_deq.PcDEQ(units=6, variant=2, weight_norm=True, max_iter=50)
    model = keras.Sequential([keras.Input((6,)), layer])
    x = np.random.default_rng(7).normal(size=(3, 6)).astype("float32")
    restored = keras_deq.PcDEQ.from_config(layer.get_config())
    assert restored.get_config() == layer.get_config()
    model.save(tmp_path / "pc.keras")
    loaded = keras.models.load_model(tmp_path / "pc.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples" / "vision"


@pytest.fixture(scope="module")
def pcdeq_example():
    sys.path.insert(0, str(EXAMPLES))
    import pcdeq

    return pcdeq


@pytest.mark.parametrize(
    "builder,kwargs,input_shape,trainable",
    [
        # The paper's counts include one weight-norm gain per pcDEQ unit/filter.
        ("linear_pcdeq", {}, (28, 28, 1), 70_410),
        ("single_conv_pcdeq", {"channels": 82, "pool": 8}, (28, 28, 1), 69_136),
        ("multi_conv_pcdeq", {"channels": (12, 24, 48)}, (28, 28, 1), 41_278),
        ("single_conv_pcdeq", {"channels": 125, "pool": 8}, (32, 32, 3), 164_760),
        ("multi_conv_pcdeq", {"channels": (20, 50, 80)}, (32, 32, 3), 130_950),
        ("multi_conv_pcdeq", {"channels": (100, 120, 140)}, (32, 32, 3), 661_470),
    ],
)
def test_paper_architectures_have_the_papers_parameter_counts(
    pcdeq_example, builder, kwargs, input_shape, trainable
):
    model = getattr(pcdeq_example, builder)(input_shape, **kwargs)
    count = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert count == trainable


# ---------------------------------------------- issue 12: guarantees off the default path
def _dense_pcdeq_with_norm(n, norm, seed, **kwargs):
    """A dense float64 PcDEQ whose nonnegative W has spectral norm `norm`."""
    layer = keras_deq.PcDEQ(units=n, dtype="float64", **kwargs)
    layer.build((None, n))
    w = np.random.default_rng(seed).uniform(0, 1, (n, n))
    layer.cell.kernel.assign(w * norm / np.linalg.norm(w, 2))
    return layer, layer.cell.kernel.numpy()


def _numpy_positive_fixed_point(w, x, steps=3000):
    """The unique positive fixed point of tanh(z W + x), by plain float64 iteration
    from a positive start (ones), written here without the layer or the solvers."""
    z = np.ones_like(x)
    for _ in range(steps):
        z = np.tanh(z @ w + x)
    return z


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_solvers_that_leave_the_orthant_are_refused(solver):
    # Before: accepted, and on W with spectral norm 2.8-29 Anderson returned a fixed
    # point with negative entries for 44-145 of 256 samples (Broyden 8-38), converged=1.
    with pytest.raises(ValueError, match=r"solver='fixed_point'.*Received: solver="):
        keras_deq.PcDEQ(units=8, solver=solver)


@pytest.mark.float64
@pytest.mark.parametrize("norm", [2.8, 29.0])
@pytest.mark.parametrize("damping", [1.0, 0.5])
def test_accepted_solvers_find_the_unique_positive_fixed_point(norm, damping):
    n = 32
    layer, w = _dense_pcdeq_with_norm(
        n, norm, seed=3, solver_options={"damping": damping}, max_iter=400, tol=1e-10
    )
    h = np.random.default_rng(4).normal(size=(64, n))
    z = np.asarray(layer(h))
    x = np.asarray(positive_injection(ops.convert_to_tensor(h), 1))
    assert np.all(z >= 0)
    np.testing.assert_allclose(z, _numpy_positive_fixed_point(w, x), atol=1e-7)


def test_negative_initial_state_is_projected_onto_the_orthant():
    # Before: from z0 = -1 the layer returned z = -1 (tanh(-large) = -1 exactly),
    # a second exact fixed point outside the orthant, with residual 0.
    n = 16
    layer, w = _dense_pcdeq_with_norm(n, 20.0, seed=5, tol=1e-10)
    h = np.random.default_rng(6).normal(size=(8, n))
    z = np.asarray(layer(h, initial_state=-np.ones((8, n))))
    x = np.asarray(positive_injection(ops.convert_to_tensor(h), 1))
    assert np.all(z >= 0)
    np.testing.assert_allclose(z, _numpy_positive_fixed_point(w, x), atol=1e-7)
    np.testing.assert_allclose(z, np.asarray(layer(h)), atol=1e-7)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("level", [-6.0, -30.0])
def test_tiny_injection_is_not_accepted_at_zero(dtype, level):
    # Every input below about -5.5: softplus_5(h) <= 1e-12 (level -6), or 0 after
    # underflow (level -30). Before: the relative stop rule's epsilon accepted z = 0
    # at once (residual ~1e-4 with tol 1e-4) while the true fixed point is about 1.
    n = 32
    layer = keras_deq.PcDEQ(units=n, dtype=dtype)
    layer.build((None, n))
    w = np.random.default_rng(7).uniform(0, 1, (n, n))
    layer.cell.kernel.assign((w * 2.8 / np.linalg.norm(w, 2)).astype(dtype))
    h = np.full((4, n), level, dtype)
    z = np.asarray(layer(h)).astype("float64")
    x = positive_injection(ops.convert_to_tensor(h, "float64"), 1)
    x = np.maximum(np.asarray(x, "float64"), 1e-300)
    want = _numpy_positive_fixed_point(layer.cell.kernel.numpy().astype("float64"), x)
    assert want.min() > 0.1  # the unique positive fixed point is O(1), far from 0
    np.testing.assert_allclose(z, want, rtol=1e-3)
    assert layer.solver_statistics()["converged"] == 1.0
