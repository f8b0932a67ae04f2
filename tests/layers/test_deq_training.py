"""The DEQ layer inside Keras models: fit / evaluate / predict, eager, graph and XLA."""

import keras
import numpy as np
import pytest

from keras_deq import DEQ, DenseCell

MODES = {
    "eager": {"run_eagerly": True},
    "graph": {"run_eagerly": False, "jit_compile": False},
    "xla": {"run_eagerly": False, "jit_compile": True},
}
METRIC_KEYS = ("fwd_steps", "fwd_residual", "converged", "bwd_steps", "bwd_residual", "jac_loss")


def classification_data(n=64, seed=0):
    """Two linearly separable classes in 4 features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x[:, 0] - 0.5 * x[:, 1] + 0.25 * x[:, 2] > 0).astype("int32")
    return x, y


def deq_layer(name="deq", **kwargs):
    options = {"tol": 1e-4, "backward_tol": 1e-4, "max_iter": 40, "name": name}
    return DEQ(DenseCell(8), **{**options, **kwargs})


def sequential(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8), deq_layer(**kwargs), keras.layers.Dense(2)]
    )


def functional(seed=0):
    """Two DEQ layers in parallel branches, each reporting its own metrics."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    a = deq_layer("deq_a")(keras.layers.Dense(8)(inputs))
    b = deq_layer("deq_b", solver="broyden", state_shape=(8,))(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.Concatenate()([a, b]))
    return keras.Model(inputs, outputs)


def compile_model(model, mode, learning_rate=0.05, optimizer=None):
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        **MODES[mode],
    )
    return model


def check_metric_logs(logs, name, backward_tol=1e-4, training=True, model=None):
    """Checks the layer's metrics in fit logs (first epoch) or evaluate logs; on JAX,
    whose logs hold no layer metrics, the forward statistics of the layer's last batch
    (`solver_statistics()` of `model`'s layer `name`)."""
    if keras.backend.backend() == "jax":
        stats = find_layer(model, name).solver_statistics()
        assert stats["fwd_steps"] > 0 and 0 <= stats["fwd_residual"]
        # The last batch's after training: a trained cell, as in evaluation.
        assert stats["converged"] >= 0.9
        assert stats["jac_loss"] == 0
        return
    for key in METRIC_KEYS:
        assert f"{name}_{key}" in logs, (name, key, sorted(logs))
    first = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731
    assert first(logs[f"{name}_fwd_steps"]) > 0
    assert 0 <= first(logs[f"{name}_fwd_residual"])
    # Training may make a cell less contractive; the untrained ones all converge.
    assert first(logs[f"{name}_converged"]) >= (1.0 if training else 0.9)
    assert first(logs[f"{name}_jac_loss"]) == 0
    if training:
        assert first(logs[f"{name}_bwd_steps"]) > 0
        assert 0 <= first(logs[f"{name}_bwd_residual"]) <= backward_tol
    else:
        assert first(logs[f"{name}_bwd_steps"]) == 0


def find_layer(model, name):
    """The layer called `name` anywhere in `model` (nested layers too)."""
    (layer,) = [layer for layer in model._flatten_layers() if layer.name == name]
    return layer


# The DEQ's metrics and the adjoint solve's statistics (TensorFlow and PyTorch).
needs_layer_metrics = pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="on JAX the layer keeps no metrics, only its last forward statistics "
    "(solver_statistics())",
)


# ---------------------------------------------------------- 6. fit / evaluate / predict
@pytest.mark.parametrize(
    ("build", "mode"),
    [(sequential, "eager"), (sequential, "graph"), (functional, "graph")],
    ids=["sequential-eager", "sequential-graph", "functional-graph"],
)
def test_fit_evaluate_predict(build, mode):
    x, y = classification_data()
    model = compile_model(build(), mode)
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history
    assert history["loss"][-1] < 0.7 * history["loss"][0], history["loss"]
    names = ["deq"] if build is sequential else ["deq_a", "deq_b"]
    for name in names:
        check_metric_logs(history, name, model=model)
    evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
    assert evaluated["accuracy"] > 0.8
    for name in names:
        check_metric_logs(evaluated, name, training=False, model=model)
    predictions = model.predict(x, verbose=0, batch_size=16)
    assert predictions.shape == (64, 2)
    assert np.mean(np.argmax(predictions, axis=1) == y) == pytest.approx(evaluated["accuracy"])


@needs_layer_metrics
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_backward_statistics_after_one_step(mode):
    x, y = classification_data(n=16)
    model = compile_model(sequential(backward_tol=1e-5), mode)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["deq_bwd_steps"] > 0
    assert 0 <= logs["deq_bwd_residual"] <= 1e-5
    assert logs["deq_fwd_steps"] > 0
    assert logs["deq_converged"] == 1


@pytest.mark.parametrize("backward", ["phantom", "one_step", "unrolled"])
def test_other_modes_train_without_adjoint_statistics(backward):
    x, y = classification_data(n=16)
    model = compile_model(sequential(backward=backward), "graph")
    first = model.train_on_batch(x, y, return_dict=True)
    if keras.backend.backend() != "jax":  # JAX keeps no adjoint statistics
        assert first["deq_bwd_steps"] == 0
    for _ in range(4):
        last = model.train_on_batch(x, y, return_dict=True)
    assert last["loss"] < first["loss"]


def run_in_mode(mode, weights, x, y):
    model = sequential(seed=1)
    model.set_weights(weights)
    compile_model(model, mode, optimizer=keras.optimizers.SGD(0.5))
    before = model.predict(x, verbose=0)
    logs = model.train_on_batch(x, y, return_dict=True)
    after = model.predict(x, verbose=0)
    return before, logs, after, model.get_weights()


@pytest.mark.parametrize(
    "mode",
    [
        "graph",
        pytest.param(
            "xla",
            marks=pytest.mark.skipif(
                keras.backend.backend() == "torch",
                reason="on PyTorch jit_compile=True is torch.compile, which takes ~110 s to "
                "compile this step on a 2-core CPU (it passes): benchmarks/backends.py",
            ),
        ),
    ],
)
def test_same_predictions_and_step_as_eager(mode):
    x, y = classification_data(n=16)
    weights = sequential(seed=2).get_weights()
    reference = run_in_mode("eager", weights, x, y)
    got = run_in_mode(mode, weights, x, y)
    np.testing.assert_allclose(got[0], reference[0], rtol=1e-4, atol=1e-5)
    assert got[1]["loss"] == pytest.approx(reference[1]["loss"], rel=1e-5)
    np.testing.assert_allclose(got[2], reference[2], rtol=1e-4, atol=1e-5)
    for a, b in zip(got[3], reference[3], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The step did change the model.
    assert not np.allclose(reference[0], reference[2], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("build", [sequential, functional], ids=["sequential", "functional"])
def test_fit_evaluate_predict_xla(build):
    x, y = classification_data()
    model = compile_model(build(), "xla")
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history
    assert history["loss"][-1] < 0.7 * history["loss"][0], history["loss"]
    names = ["deq"] if build is sequential else ["deq_a", "deq_b"]
    for name in names:
        check_metric_logs(history, name)
    evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
    assert evaluated["accuracy"] > 0.8
    assert model.predict(x, verbose=0).shape == (64, 2)


@pytest.mark.slow
def test_non_convergence_under_xla_is_measured():
    x = np.random.default_rng(0).normal(size=(8, 8)).astype("float32")
    cell = DenseCell(8, activation="linear", kernel_initializer=keras.initializers.Orthogonal(0.99))
    model = keras.Sequential(
        [keras.Input((8,)), DEQ(cell, solver="fixed_point", max_iter=3, name="slow")]
    )
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    logs = model.train_on_batch(x, x, return_dict=True)
    assert logs["slow_converged"] < 1
    assert logs["slow_fwd_steps"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_every_solver_trains_in_every_mode(solver):
    x, y = classification_data(n=16)
    weights = sequential(seed=3, solver=solver).get_weights()
    results = {}
    for mode in MODES:
        model = sequential(seed=3, solver=solver)
        model.set_weights(weights)
        compile_model(model, mode, optimizer=keras.optimizers.SGD(0.5))
        logs = model.train_on_batch(x, y, return_dict=True)
        results[mode] = (logs["loss"], model.predict(x, verbose=0))
    for mode in ("graph", "xla"):
        assert results[mode][0] == pytest.approx(results["eager"][0], rel=1e-5)
        np.testing.assert_allclose(results[mode][1], results["eager"][1], rtol=1e-4, atol=1e-5)


@needs_layer_metrics
def test_layer_metrics_are_exposed_on_the_model():
    model = functional()
    names = {m.name for m in model.metrics}
    for layer_name in ("deq_a", "deq_b"):
        for key in METRIC_KEYS:
            assert f"{layer_name}_{key}" in names


class Block(keras.layers.Layer):
    """A custom layer that owns a DEQ."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.deq = deq_layer("inner_deq", state_shape=(8,))

    def call(self, x):
        return self.deq(x)


def test_metrics_of_nested_deq_layers_reach_the_logs():
    x, y = classification_data(n=16)
    keras.utils.set_random_seed(0)
    inner_model = keras.Sequential([keras.Input((8,)), deq_layer("model_deq")])
    model = keras.Sequential([keras.Input((4,)), Block(), inner_model, keras.layers.Dense(2)])
    history = compile_model(model, "graph").fit(x, y, epochs=1, verbose=0).history
    check_metric_logs(history, "inner_deq", model=model)
    check_metric_logs(history, "model_deq", model=model)


def test_deq_can_be_called_on_several_inputs_of_different_batch_sizes():
    layer = deq_layer()
    model = keras.Sequential([keras.Input((8,)), layer])
    for batch in (1, 5):
        x = np.random.default_rng(batch).normal(size=(batch, 8)).astype("float32")
        predictions = model.predict(x, verbose=0)
        assert predictions.shape == (batch, 8)
        np.testing.assert_allclose(predictions, layer(x), atol=1e-5)


# ------------------------------------- issue 12: the recipes' random forward budget
def _budgets(layer, x, calls):
    """The forward steps of `calls` training calls of `layer`, one compiled function
    (`tf.function`; on JAX a `jax.jit` of `stateless_call` that carries the layer's
    non-trainable state, its seed generator's included), and its number of traces."""
    layer(x)  # built outside the function: variables made while tracing retrace it
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        step_metric = layer._metrics_by_name["fwd_steps"]

        @tf.function
        def train_call(x):
            return layer(x, training=True)

        steps = []
        for _ in range(calls):
            step_metric.reset_state()
            train_call(x)
            steps.append(int(step_metric.result()))
        return steps, train_call.experimental_get_tracing_count()
    if keras.backend.backend() == "torch":  # eager: nothing is traced
        step_metric, steps = layer._metrics_by_name["fwd_steps"], []
        for _ in range(calls):
            step_metric.reset_state()
            layer(x, training=True)
            steps.append(int(step_metric.result()))
        return steps, 1
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    index = [id(v) for v in layer.non_trainable_variables].index(id(layer._stats["fwd_steps"]))
    traces = []

    @jax.jit
    def train_call(non_trainable, x):
        traces.append(1)
        _, non_trainable = layer.stateless_call(trainable, non_trainable, x, training=True)
        return non_trainable

    state, steps = [v.value for v in layer.non_trainable_variables], []
    for _ in range(calls):
        state = train_call(state, x)
        steps.append(int(state[index]))
    return steps, len(traces)


def _budget_layer(**kwargs):
    """A regularized DEQ whose every solve uses its whole budget (tol=1e-30)."""
    options = {"solver": "fixed_point", "max_iter": 6, "tol": 1e-30, "on_failure": "ignore"}
    return DEQ(DenseCell(8), jacobian_weight=0.1, **options, **kwargs)


BUDGET_INPUT = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")


def test_regularized_steps_draw_a_forward_budget_without_retracing():
    # The DEQ recipes' RAND_F_THRES_DELTA: on regularized steps max_iter + delta,
    # delta uniform in {-2, -1, 0, 1}.
    layer = _budget_layer(jacobian_frequency=0.5, jacobian_max_iter_delta=2, seed=1)
    steps, traces = _budgets(layer, BUDGET_INPUT, 200)
    assert traces == 1
    counts = {k: steps.count(k) for k in set(steps)}
    assert set(counts) == {4, 5, 6, 7}, counts
    # Unpicked steps (half) keep 6; picked steps spread over 4..7 (about 25 each).
    assert 115 <= counts[6] <= 160, counts
    for k in (4, 5, 7):
        assert 8 <= counts[k] <= 45, counts
    # Without the regularizer in the step (evaluation), the budget is max_iter.
    for metric in layer.metrics:  # (on JAX each call replaces the statistics)
        metric.reset_state()
    layer(BUDGET_INPUT, training=False)
    assert layer.solver_statistics()["fwd_steps"] == 6


def test_forward_budget_is_fixed_without_delta():
    steps, _ = _budgets(_budget_layer(), BUDGET_INPUT, 20)
    assert set(steps) == {6}
