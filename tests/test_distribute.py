"""DEQ under `tf.distribute.MirroredStrategy` on two logical CPUs (see conftest.py).

The multi-worker test (marked slow) starts worker processes with examples/distributed/train.py.
"""

import contextlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq

DEVICES = ["/cpu:0", "/cpu:1"]
MAX_ITER = 30


@pytest.fixture(scope="module")
def strategy():
    assert len(tf.config.list_logical_devices("CPU")) >= 2, "conftest must set up 2 CPUs"
    return tf.distribute.MirroredStrategy(DEVICES)


def _data(n=128, features=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (np.sin(x[:, :1]) + 0.5 * x[:, 1:2]).astype("float32")
    return x, y


def _model(jacobian_weight=0.0, probes=1):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16),
            keras_deq.DEQ(
                keras_deq.DenseCell(16),
                max_iter=MAX_ITER,
                jacobian_weight=jacobian_weight,
                jacobian_probes=probes,
                seed=1,
                name="deq",
            ),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def _fit_pair(strategy, epochs, **kwargs):
    """Trains the same model on one device and under `strategy` from equal weights."""
    x, y = _data()
    single = _model(**kwargs)
    with strategy.scope():
        mirrored = _model(**kwargs)
    mirrored.set_weights(single.get_weights())
    fit = dict(batch_size=32, epochs=epochs, shuffle=False, verbose=0)
    h1 = single.fit(x, y, **fit).history
    h2 = mirrored.fit(x, y, **fit).history
    return h1, h2, single, mirrored


def test_fit_matches_single_device(strategy):
    h1, h2, single, mirrored = _fit_pair(strategy, epochs=3)
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=5e-3)
    assert h2["loss"][-1] < 0.5 * h2["loss"][0]  # it trains
    # Same trained weights, up to the solvers' tolerance.
    for a, b in zip(single.get_weights(), mirrored.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, atol=5e-3)
    # Solver metrics: per-replica means, in range, not summed over the 2 replicas.
    for key in ("deq_converged",):
        assert all(0.0 <= v <= 1.0 for v in h2[key])
        np.testing.assert_allclose(h2[key], h1[key], atol=0.05)
    for key in ("deq_fwd_steps", "deq_bwd_steps"):
        assert all(1.0 <= v <= MAX_ITER for v in h2[key]), (key, h2[key])
        ratio = np.array(h2[key]) / np.array(h1[key])
        assert (ratio > 0.75).all() and (ratio < 1.25).all(), (key, h1[key], h2[key])
    for key in ("deq_fwd_residual", "deq_bwd_residual"):
        assert all(0.0 <= v < 1e-3 for v in h2[key]), (key, h2[key])


def test_jacobian_loss_metric_comparable_to_single_device(strategy):
    h1, h2, _, _ = _fit_pair(strategy, epochs=2, jacobian_weight=0.5, probes=4)
    for jac1, jac2 in zip(h1["deq_jac_loss"], h2["deq_jac_loss"], strict=True):
        assert jac1 > 0 and jac2 > 0
        assert abs(jac2 - jac1) / jac1 < 0.2, (h1["deq_jac_loss"], h2["deq_jac_loss"])
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=0.05)


def _metric_model():
    # The input is the injection: x = 0 gives z* = 0 at the first step, a large x
    # needs all of max_iter fixed-point steps (and does not converge).
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras_deq.DEQ(
                keras_deq.DenseCell(
                    4,
                    use_injection=False,
                    kernel_initializer=keras.initializers.Orthogonal(0.9, seed=0),
                ),
                solver="fixed_point",
                max_iter=12,
                on_failure="ignore",
                name="deq",
            ),
        ]
    )


def _easy_and_hard_halves(n):
    """A global batch whose first half (zeros) solves in 1 step and second in 12, a
    one-device model, and its evaluation of each half."""
    rng = np.random.default_rng(0)
    x = np.concatenate([np.zeros((n, 4)), 3 * rng.normal(size=(n, 4))]).astype("float32")
    y = np.zeros_like(x)
    single = _metric_model()
    single.compile(loss="mse")
    halves = [
        single.evaluate(part, y[:n], batch_size=n, verbose=0, return_dict=True)
        for part in (x[:n], x[n:])
    ]
    return x, y, single, halves


def test_solver_metrics_are_means_over_replicas(strategy):
    # Replica 0 gets the first half of the global batch (zeros: 1 step), replica 1
    # the second half (12 steps). The global fwd_steps must be the mean of the
    # per-replica step counts, (1 + 12) / 2: not their sum, not one replica's value.
    n = 8
    x, y, single, halves = _easy_and_hard_halves(n)
    steps = [h["deq_fwd_steps"] for h in halves]
    assert steps[0] < steps[1]  # the test set-up discriminates
    with strategy.scope():
        mirrored = _metric_model()
        mirrored.compile(loss="mse", optimizer=keras.optimizers.SGD(0.0))
    mirrored.set_weights(single.get_weights())
    logs = mirrored.evaluate(x, y, batch_size=2 * n, verbose=0, return_dict=True)
    assert logs["deq_fwd_steps"] == pytest.approx(np.mean(steps))
    assert logs["deq_converged"] == pytest.approx(np.mean([h["deq_converged"] for h in halves]))
    assert 0.0 < logs["deq_converged"] < 1.0
    history = mirrored.fit(x, y, batch_size=2 * n, epochs=1, shuffle=False, verbose=0).history
    assert history["deq_fwd_steps"][0] == pytest.approx(np.mean(steps))
    assert history["deq_converged"][0] == pytest.approx(logs["deq_converged"])


@pytest.mark.parametrize("name", ["fixed_point", "anderson", "broyden"])
def test_solver_inside_strategy_run(strategy, name):
    solver = keras_deq.solvers.get(name)
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(3, 5)).astype("float32") for _ in range(2)]
    a = tf.constant(rng.normal(size=(5, 5)).astype("float32") * 0.2)

    def solve(x):
        return solver(lambda z: 0.5 * tf.tanh(z @ a) + x, tf.zeros_like(x), max_iter=60, tol=1e-6)

    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
    )
    result = strategy.run(tf.function(solve), args=(values,))
    states = strategy.experimental_local_results(result.state)
    converged = strategy.experimental_local_results(result.converged)
    for part, state, conv in zip(parts, states, converged, strict=True):
        reference = solve(tf.constant(part))
        assert bool(tf.reduce_all(conv))
        np.testing.assert_allclose(state.numpy(), reference.state.numpy(), atol=1e-5)
        # It is a fixed point of the replica's own map.
        residual = 0.5 * np.tanh(state.numpy() @ a.numpy()) + part - state.numpy()
        assert np.abs(residual).max() < 1e-4


def test_deq_gradient_inside_strategy_run(strategy):
    # Custom training loop: per-replica implicit gradients, summed over replicas,
    # equal the one-device gradient over the whole batch.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 6)).astype("float32")
    global_batch = x.shape[0]

    def make():
        return keras_deq.DEQ(
            keras_deq.DenseCell(6, kernel_initializer=keras.initializers.Orthogonal(0.7, seed=3)),
            tol=1e-6,
            max_iter=80,
            on_failure="ignore",
        )

    def loss_and_grads(layer, xs):
        with tf.GradientTape() as tape:
            z = layer(xs, training=True)
            loss = tf.reduce_sum(tf.square(z - 0.3)) / global_batch
        return loss, tape.gradient(loss, layer.trainable_variables)

    single = make()
    single.build((None, 6))
    with strategy.scope():
        mirrored = make()
        mirrored.build((None, 6))
    mirrored.set_weights(single.get_weights())
    loss1, grads1 = loss_and_grads(single, tf.constant(x))

    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(
            x[4 * ctx.replica_id_in_sync_group : 4 * (ctx.replica_id_in_sync_group + 1)]
        )
    )
    per_replica = strategy.run(tf.function(lambda xs: loss_and_grads(mirrored, xs)), args=(values,))
    loss2 = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica[0], axis=None)
    grads2 = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in per_replica[1]]
    np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-5)
    for g1, g2 in zip(grads1, grads2, strict=True):
        scale = float(tf.reduce_max(tf.abs(g1)))
        assert scale > 0
        np.testing.assert_allclose(g2.numpy(), g1.numpy(), atol=1e-4 * max(scale, 1.0))


# --------------------------------------------------------------------------------------
# keras_deq.distribute.fit_distributed: the training entry point for strategies under
# which Keras' `fit` fails (MultiWorkerMirroredStrategy, keras-team/keras#20585).

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "distributed" / "train.py"


def _dataset(x, y, batch_size):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def _sgd_model(strategy=None, **kwargs):
    # SGD, not Adam: Adam's update does not change when the gradient is scaled, so a loss
    # summed over the replicas instead of averaged would go unnoticed.
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = _model(**kwargs)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", metrics=["mae"])
    return model


def test_fit_distributed_matches_one_device_fit(strategy):
    x, y = _data()
    single = _sgd_model()
    mirrored = _sgd_model(strategy)
    mirrored.set_weights(single.get_weights())
    h1 = single.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0).history
    h2 = keras_deq.distribute.fit_distributed(
        mirrored, _dataset(x, y, 32), epochs=3, strategy=strategy, verbose=0
    ).history
    assert set(h2) == set(h1)
    assert h2["loss"][-1] < 0.5 * h2["loss"][0]  # it trains
    # Measured: losses within 5e-7 (relative), weights within 1e-7: the solvers' tolerance.
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-4)
    np.testing.assert_allclose(h2["mae"], h1["mae"], rtol=1e-4)
    for a, b in zip(single.get_weights(), mirrored.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-4)
    for key in ("deq_fwd_steps", "deq_bwd_steps"):  # per-replica means, not sums
        ratio = np.array(h2[key]) / np.array(h1[key])
        assert (ratio > 0.75).all() and (ratio < 1.25).all(), (key, h1[key], h2[key])
    assert all(v == 1.0 for v in h2["deq_converged"])


def test_fit_distributed_solver_metrics_are_means_over_replicas(strategy):
    # As test_solver_metrics_are_means_over_replicas: replica 0 needs 1 solver step,
    # replica 1 all 12, and the logs must report the mean over the replicas.
    n = 8
    x, y, single, halves = _easy_and_hard_halves(n)
    steps = [h["deq_fwd_steps"] for h in halves]
    converged = [h["deq_converged"] for h in halves]
    assert steps[0] < steps[1] and converged[0] > converged[1]
    with strategy.scope():
        mirrored = _metric_model()
        mirrored.compile(loss="mse", optimizer=keras.optimizers.SGD(0.0))
    mirrored.set_weights(single.get_weights())
    batch_logs = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: batch_logs.append(logs)
    )
    history = keras_deq.distribute.fit_distributed(
        mirrored, _dataset(x, y, 2 * n), epochs=1, callbacks=[record], verbose=0
    ).history
    assert len(batch_logs) == 1
    for logs in (*batch_logs, {k: v[-1] for k, v in history.items()}):
        assert logs["deq_fwd_steps"] == pytest.approx(np.mean(steps))
        assert logs["deq_converged"] == pytest.approx(np.mean(converged))
        assert logs["loss"] == pytest.approx(np.mean([h["loss"] for h in halves]), rel=1e-5)


def _jacobian_model(strategy=None):
    # A linear cell z -> z W + x with W = 0.5 * orthogonal: ||J||_F^2 / d = 0.25 exactly,
    # and the Hutchinson estimate scatters around it. The data loss is 0, so the training
    # loss is the Jacobian regularizer alone.
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras_deq.DEQ(
                    keras_deq.DenseCell(
                        8,
                        activation="linear",
                        use_injection=False,
                        kernel_initializer=keras.initializers.Orthogonal(0.5, seed=0),
                    ),
                    solver="fixed_point",
                    max_iter=40,
                    jacobian_weight=1.0,
                    jacobian_probes=8,
                    seed=1,
                    name="deq",
                ),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=lambda y_true, y_pred: keras.ops.mean(0.0 * y_pred, axis=-1),
        )
    return model


def test_fit_distributed_jacobian_loss_is_averaged_over_replicas(strategy):
    x = np.random.default_rng(3).normal(size=(64, 8)).astype("float32")
    single = _jacobian_model()
    mirrored = _jacobian_model(strategy)
    mirrored.set_weights(single.get_weights())
    w0 = single.trainable_weights[0].numpy()  # the cell's kernel
    dataset = _dataset(x, np.zeros_like(x), 64)
    h1 = keras_deq.distribute.fit_distributed(single, dataset, verbose=0).history
    h2 = keras_deq.distribute.fit_distributed(mirrored, dataset, verbose=0).history
    for h in (h1, h2):
        # The loss is the regularizer, weighted 1: the mean of the replicas' values.
        assert h["loss"][0] == pytest.approx(h["deq_jac_loss"][0], rel=1e-4)
        assert h["deq_jac_loss"][0] == pytest.approx(0.25, rel=0.1)
    # The regularizer's gradient is averaged over the replicas: the same SGD step as on one
    # device (up to the probes' noise), not twice it.
    step1 = single.trainable_weights[0].numpy() - w0
    step2 = mirrored.trainable_weights[0].numpy() - w0
    ratio = np.linalg.norm(step2) / np.linalg.norm(step1)
    cosine = np.sum(step1 * step2) / (np.linalg.norm(step1) * np.linalg.norm(step2))
    assert 0.85 < ratio < 1.15 and cosine > 0.95, (ratio, cosine)


def _small_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras_deq.DEQ(keras_deq.DenseCell(6), solver="fixed_point", max_iter=20, name="deq"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def test_fit_distributed_callbacks_and_jacobian_scheduler(strategy):
    x, y = _data(n=96)
    with strategy.scope():
        model = _small_model()  # jacobian_weight=0: the scheduler switches the regularizer on
    events = []
    record = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: events.append("train_begin"),
        on_epoch_begin=lambda epoch, logs: events.append(f"epoch_begin {epoch}"),
        on_train_batch_begin=lambda batch, logs: events.append(f"batch_begin {batch}"),
        on_train_batch_end=lambda batch, logs: events.append(
            (f"batch_end {batch}", sorted(logs), all(isinstance(v, float) for v in logs.values()))
        ),
        on_epoch_end=lambda epoch, logs: events.append(f"epoch_end {epoch}"),
        on_train_end=lambda logs: events.append("train_end"),
    )
    scheduler = keras_deq.callbacks.JacobianRegularizationScheduler(
        keras_deq.callbacks.stepwise_schedule(0.1, increment=0.1, every=2)
    )
    history = keras_deq.distribute.fit_distributed(
        model,
        _dataset(x, y, 32).repeat(),
        epochs=2,
        steps_per_epoch=3,
        callbacks=[scheduler, record],
        verbose=0,
    )
    assert isinstance(history, keras.callbacks.History) and history is model.history
    names = sorted(m.name for m in model.metrics if m.name.startswith("deq_")) + ["loss"]
    batch = [(f"batch_end {i}", sorted(names), True) for i in range(3)]
    epoch = [e for i in range(3) for e in (f"batch_begin {i}", batch[i])]
    assert events == [
        "train_begin",
        *("epoch_begin 0", *epoch, "epoch_end 0"),
        *("epoch_begin 1", *epoch, "epoch_end 1"),
        "train_end",
    ]
    assert int(model.optimizer.iterations.numpy()) == 6
    # Steps 0..5: weights 0.1, 0.1, 0.2, 0.2, 0.3, 0.3; the epoch logs hold the last one.
    assert history.history["jacobian_weight"] == pytest.approx([0.2, 0.3])
    assert float(model.get_layer("deq").jacobian_weight.numpy()) == pytest.approx(0.3)
    assert all(v > 0 for v in history.history["deq_jac_loss"])  # traced into the step


def test_fit_distributed_follows_explicit_pretraining(strategy):
    x, y = _data(n=64)
    model = _sgd_model(strategy)
    steps = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: steps.append(logs["deq_fwd_steps"])
    )
    pretrain = keras_deq.callbacks.ExplicitPretraining(steps=2, depth=3)
    keras_deq.distribute.fit_distributed(
        model, _dataset(x, y, 32), epochs=2, callbacks=[pretrain, record], verbose=0
    )
    # Two explicit steps (3 cell applications each), then the solver (step logs are
    # running means over the epoch, so epoch 2 starts afresh).
    assert steps[:2] == [3.0, 3.0]
    assert steps[2] != 3.0 and steps[3] != 3.0
    assert model.get_layer("deq").explicit_depth is None


def test_fit_distributed_stops_when_the_data_run_out():
    x, y = _data(n=64)
    model = _small_model()
    with pytest.warns(UserWarning, match="ran out of data"):
        history = keras_deq.distribute.fit_distributed(
            model, _dataset(x, y, 32), epochs=3, steps_per_epoch=3, verbose=0
        )
    assert len(history.history["loss"]) == 1
    assert int(model.optimizer.iterations.numpy()) == 2


def test_fit_distributed_compiles_with_xla():
    # The TPU path in small: a step compiled by XLA (as TPUStrategy does), on batches of a
    # static shape, trains like the step without XLA.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, 0.5 * np.tanh(x)))
    dataset = dataset.batch(16, drop_remainder=True)
    runs = []
    for jit_compile in (True, False):
        model = _metric_model()
        model.compile(optimizer=keras.optimizers.SGD(0.2), loss="mse", jit_compile=jit_compile)
        assert model.jit_compile is jit_compile
        history = keras_deq.distribute.fit_distributed(model, dataset, epochs=2, verbose=0)
        runs.append((history.history, model.get_weights()))
    (h1, w1), (h2, w2) = runs
    assert h1["loss"][-1] < h1["loss"][0]
    for key in ("loss", "deq_fwd_steps", "deq_converged"):
        np.testing.assert_allclose(h1[key], h2[key], rtol=1e-5)
    for a, b in zip(w1, w2, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_fit_distributed_rejects_bad_arguments(strategy):
    x, y = _data(n=32)
    dataset = _dataset(x, y, 16)
    model = _small_model()
    fit = keras_deq.distribute.fit_distributed
    uncompiled = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="must be compiled"):
        fit(uncompiled, dataset)
    with pytest.raises(ValueError, match="must be a keras.Model"):
        fit(keras.layers.Dense(1), dataset)
    with pytest.raises(ValueError, match="must be a tf.data.Dataset"):
        fit(model, (x, y))
    for epochs in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="`epochs` must be a positive integer"):
            fit(model, dataset, epochs=epochs)
    for steps in (0, 2.0, False):
        with pytest.raises(ValueError, match="`steps_per_epoch` must be a positive integer"):
            fit(model, dataset, steps_per_epoch=steps)
    with pytest.raises(ValueError, match="infinite"):
        fit(model, dataset.repeat())
    with pytest.raises(ValueError, match="`verbose` must be one of"):
        fit(model, dataset, verbose=3)
    with pytest.raises(ValueError, match="not created under `strategy`"):
        fit(model, dataset, strategy=strategy)  # `model` was created outside its scope
    with pytest.raises(ValueError, match="yielded no batch"):
        fit(model, dataset.take(0))
    assert int(model.optimizer.iterations.numpy()) == 0  # nothing was trained


def test_example_without_tpu_stops_with_a_message(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    spec = importlib.util.spec_from_file_location("distributed_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.raises(SystemExit, match="--strategy tpu: no TPU found"):
        example.main(["--strategy", "tpu"])


@pytest.mark.slow
def test_multi_worker_training_matches_one_process(tmp_path):
    """Two worker processes under MultiWorkerMirroredStrategy (examples/distributed).

    They train with `fit_distributed` to the loss of `model.fit` in one process, from the
    same initial weights on the same global batches, and end with identical weights.
    """
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    common = ["--epochs", "2", "--width", "16", "--output-dir", str(tmp_path)]
    runs = [["--strategy", "multi_worker", "--workers", "2", "--timeout", "400"]]
    runs.append(["--strategy", "one_device"])
    for args in runs:
        proc = subprocess.run(
            [sys.executable, str(EXAMPLE), *args, *common],
            env=env,
            capture_output=True,
            text=True,
            timeout=500,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {
        name: json.loads((tmp_path / f"result-{name}.json").read_text())
        for name in ("worker-0", "worker-1", "one_device")
    }
    weights = {name: np.load(tmp_path / f"weights-{name}.npz") for name in results}
    one, w0, w1 = results["one_device"], results["worker-0"], results["worker-1"]
    assert w0["replicas"] == w1["replicas"] == 2 and one["replicas"] == 1
    assert w0["initial_weights"] == w1["initial_weights"] == one["initial_weights"]
    # Both workers: identical weights and logs.
    for key in weights["worker-0"].files:
        np.testing.assert_array_equal(weights["worker-1"][key], weights["worker-0"][key])
    assert w0["history"] == w1["history"]
    # The same training as one process, up to the solvers' tolerance.
    np.testing.assert_allclose(w0["history"]["loss"], one["history"]["loss"], rtol=1e-4)
    assert w0["history"]["loss"][-1] < 0.7 * w0["history"]["loss"][0]  # it trains
    assert w0["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)
    for key in weights["one_device"].files:
        np.testing.assert_allclose(weights["worker-0"][key], weights["one_device"][key], atol=1e-4)
    # Solver statistics: per-replica means, comparable to one process's.
    for key in ("deq_fwd_steps", "deq_bwd_steps"):
        ratio = np.array(w0["history"][key]) / np.array(one["history"][key])
        assert ((ratio > 0.75) & (ratio < 1.25)).all(), (key, w0["history"], one["history"])
