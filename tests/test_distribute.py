"""DEQ under `tf.distribute.MirroredStrategy` on two logical CPUs (see conftest.py)."""

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


def test_solver_metrics_are_means_over_replicas(strategy):
    # Replica 0 gets the first half of the global batch (zeros: 1 step), replica 1
    # the second half (12 steps). The global fwd_steps must be the mean of the
    # per-replica step counts, (1 + 12) / 2: not their sum, not one replica's value.
    n = 8
    rng = np.random.default_rng(0)
    x = np.concatenate([np.zeros((n, 4)), 3 * rng.normal(size=(n, 4))]).astype("float32")
    y = np.zeros_like(x)
    single = _metric_model()
    single.compile(loss="mse")
    halves = [
        single.evaluate(part, y[:n], batch_size=n, verbose=0, return_dict=True)
        for part in (x[:n], x[n:])
    ]
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
