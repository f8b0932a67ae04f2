"""DEQ under Keras mixed-precision policies: cell in half precision, solver in float32."""

import importlib.util
import pathlib

import keras
import numpy as np
import pytest
from feature_references import layer_gradients
from keras import ops

import keras_deq

HALF_POLICIES = ["mixed_float16", "mixed_bfloat16"]
EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load_digits_example():
    spec = importlib.util.spec_from_file_location("digits_example", EXAMPLES / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def _model(width=16, tol=1e-3, max_iter=40):
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(width),
            keras_deq.DEQ(keras_deq.DenseCell(width), max_iter=max_iter, tol=tol, name="deq"),
            keras.layers.Dense(1, dtype="float32"),
        ]
    )


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    return x, np.sin(x[:, :1]).astype("float32")


@pytest.mark.parametrize("policy", HALF_POLICIES, indirect=True)
def test_cell_runs_in_compute_dtype_and_statistics_in_float32(policy):
    keras.utils.set_random_seed(0)
    model = _model()
    layer = model.get_layer("deq")
    x, _ = _data()
    seen = []
    call = layer.cell.call

    def spy(z, x_in):
        seen.append(tuple(keras.backend.standardize_dtype(t.dtype) for t in (z, x_in)))
        return call(z, x_in)

    layer.cell.call = spy
    out = layer(model.layers[0](x))
    assert keras.backend.standardize_dtype(out.dtype) == layer.compute_dtype
    assert set(seen) == {(layer.compute_dtype,) * 2}
    # The statistics: metrics on TensorFlow, variables on JAX.
    for metric in layer.metrics:
        assert metric.dtype == "float32"
        assert np.isfinite(float(metric.result()))
    for variable in getattr(layer, "_stats", {}).values():
        assert variable.dtype == "float32"
    assert all(np.isfinite(v) for v in layer.solver_statistics().values())


@pytest.mark.parametrize("policy", HALF_POLICIES, indirect=True)
def test_solver_iterates_in_float32(policy):
    """A linear contraction evaluated in half precision: the solve (float32 iterates,
    see tests/solvers/test_packing.py) lands within the output rounding of the exact
    solution of `z = z a + b`."""
    dtype = "float16" if policy == "mixed_float16" else "bfloat16"
    rng = np.random.default_rng(1)
    a = 0.5 * rng.normal(size=(8, 8)) / np.sqrt(8)
    b = rng.normal(size=(4, 8))
    exact = np.linalg.solve(np.eye(8) - a.T, b.T).T  # z = z a + b

    def f(z):
        z = ops.matmul(ops.cast(z, "float32"), a.astype("float32"))
        return ops.cast(z + b.astype("float32"), dtype)

    result = keras_deq.solvers.get("anderson")(f, ops.zeros([4, 8], dtype), max_iter=50, tol=1e-6)
    assert keras.backend.standardize_dtype(result.state.dtype) == dtype
    assert keras.backend.standardize_dtype(result.rel_residual.dtype) == "float32"
    # f's output is rounded to `dtype`; the float32 mixing of rounded outputs still
    # lands within that rounding of the exact solution (no drift, no blow-up).
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    err = np.abs(np.asarray(ops.cast(result.state, "float32"), "float64") - exact)
    assert np.all(err <= 4 * eps * (np.abs(exact) + 1.0))


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_loss_scaling_with_the_implicit_gradient(policy):
    """Keras wraps the optimizer in a LossScaleOptimizer; the scaled implicit gradient,
    unscaled, matches the float32 model's gradient at the same weights."""
    x, y = _data()
    keras.utils.set_random_seed(0)
    mixed = _model(tol=1e-5)
    mixed.compile(keras.optimizers.SGD(0.1), "mse")
    assert isinstance(mixed.optimizer, keras.optimizers.LossScaleOptimizer)
    keras.mixed_precision.set_global_policy("float32")
    reference = _model(tol=1e-5)
    reference.set_weights(mixed.get_weights())

    def gradients(model, scale):
        def loss(out):
            return ops.mean(keras.losses.mean_squared_error(y, out)) * scale

        grads = layer_gradients(model, x, loss, model.trainable_variables)[1:]
        return [np.asarray(ops.cast(g, "float32")) / scale for g in grads]

    scale = float(mixed.optimizer.initial_scale)
    assert scale >= 2.0**10
    for g16, g32 in zip(gradients(mixed, scale), gradients(reference, 1.0), strict=True):
        assert np.all(np.isfinite(g16))
        np.testing.assert_allclose(g16, g32, rtol=0.05, atol=2e-3)


@pytest.fixture(scope="module")
def digits():
    return _load_digits_example().load_digits_split()


@pytest.fixture(scope="module")
def float32_history(digits):
    return _digits_accuracy(digits, "float32")


def _digits_accuracy(digits, policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        x_train, y_train, x_test, y_test = digits
        keras.utils.set_random_seed(0)
        model = _load_digits_example().build_model(width=64, tol=1e-3)
        model.compile(
            keras.optimizers.Adam(3e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        history = model.fit(
            x_train, y_train, batch_size=64, epochs=3, verbose=0, validation_data=(x_test, y_test)
        ).history
        weights = model.get_weights()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(np.all(np.isfinite(w)) for w in weights)
    if keras.backend.backend() != "tensorflow":
        # JAX's logs hold no layer metrics: the last solve's (a validation batch).
        history["deq_converged"] = [model.get_layer("deq").solver_statistics()["converged"]]
    return history


@pytest.mark.parametrize("policy_name", HALF_POLICIES)
def test_digits_trains_within_one_point_of_float32(digits, float32_history, policy_name):
    reference = float32_history
    mixed = _digits_accuracy(digits, policy_name)
    assert reference["val_accuracy"][-1] > 0.9
    assert abs(mixed["val_accuracy"][-1] - reference["val_accuracy"][-1]) <= 0.01
    # The solver still meets its tolerance in half precision.
    assert mixed["deq_converged"][-1] >= 0.99
