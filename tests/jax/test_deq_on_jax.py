"""The DEQ layer on the JAX backend (run with `KERAS_BACKEND=jax`; skipped on others).

The implicit gradient against a dense linear solve, under `jax.jit`; the unrolled
gradient against a hand-written loop; the Jacobian penalty against a dense Jacobian;
the README's model trained with `fit` on digits; what the constructor refuses on
JAX; warnings.
"""

import warnings

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("JAX backend tests (KERAS_BACKEND=jax)", allow_module_level=True)

import jax  # noqa: E402
from linear_problem import B, F, N, dense_gradients, linear_layer, linear_problem  # noqa: E402

import keras_deq  # noqa: E402


@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
@pytest.mark.parametrize("backward", ["implicit", keras_deq.backward.Phantom(300, 1.0)])
def test_gradient_matches_a_dense_solve_under_jit(solver, backward):
    w, u, b, x, t = linear_problem()
    layer = linear_layer(solver, backward, w, u, b)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x):
        out, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
        return keras.ops.sum(out * t)

    grads, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, x)
    want = dense_gradients(w, u, b, x, t)  # float64, row vectors
    for got, ref in zip([*grads, grad_x], want, strict=True):
        error = np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref))
        assert error < 2e-5, error


def test_readme_model_trains_digits():
    from sklearn.datasets import load_digits  # noqa: PLC0415

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    split = 1347
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128),
            keras_deq.DEQ(keras_deq.DenseCell(128), solver="anderson", max_iter=30, tol=1e-4),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x[:split], y[:split], epochs=8, batch_size=64, verbose=0)
    scores = model.evaluate(x[split:], y[split:], verbose=0, return_dict=True)
    assert scores["accuracy"] >= 0.95, scores
    stats = model.layers[1].solver_statistics()
    assert 1 <= stats["fwd_steps"] <= 30 and 0 <= stats["converged"] <= 1, stats


def test_on_failure_raise_is_refused_at_construction_with_the_reason():
    with pytest.raises(ValueError, match="on_failure='raise'.*deletes the model's weights"):
        keras_deq.DEQ(keras_deq.DenseCell(4), on_failure="raise")


def test_an_unconverged_solve_warns_from_the_compiled_step():
    layer = keras_deq.DEQ(keras_deq.DenseCell(8), solver="fixed_point", max_iter=2, tol=1e-12)
    model = keras.Sequential([keras.Input((8,)), layer])
    model.compile("sgd", "mse")
    data = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(data, data, epochs=1, verbose=0)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("did not reach tol" in m for m in messages), messages
    assert layer.solver_statistics()["converged"] == 0.0


def test_a_converged_step_makes_no_host_round_trip(monkeypatch):
    from keras_deq import backend  # noqa: PLC0415

    round_trips = []
    original = backend.host_call

    def counting(fn, *args):
        def counted(*values):
            round_trips.append(1)
            return fn(*values)

        return original(counted, *args)

    monkeypatch.setattr(backend, "host_call", counting)
    layer = keras_deq.DEQ(keras_deq.DenseCell(8), max_iter=50, tol=1e-3)
    model = keras.Sequential([keras.Input((8,)), layer])
    model.compile("sgd", "mse")
    data = 0.1 * np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    model.fit(data, data, batch_size=8, epochs=2, verbose=0)
    assert layer.solver_statistics()["converged"] == 1.0
    assert round_trips == []


def test_keras_file_round_trip(tmp_path):
    model = keras.Sequential(
        [keras.Input((6,)), keras_deq.DEQ(keras_deq.DenseCell(6), backward="phantom")]
    )
    x = np.random.default_rng(1).normal(size=(3, 6)).astype("float32")
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(restored(x)), np.asarray(model(x)), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------ unrolled
def dense_layer(**kwargs):
    w, u, b, _, _ = linear_problem()
    cell = keras_deq.DenseCell(N)
    layer = keras_deq.DEQ(cell, state_shape=(N,), **kwargs)
    layer.build((None, F))
    for variable, value in zip(cell.trainable_variables, (2.0 * w, u, b), strict=True):
        variable.assign(value)
    return layer


@pytest.mark.parametrize(
    "max_iter, tol",
    [(60, 1e-3), (7, 1e-12)],  # stops early (masked iterations follow); runs out of budget
)
def test_unrolled_gradient_is_autodiff_through_the_iterations_run(max_iter, tol):
    _, _, _, x, t = linear_problem()
    layer = dense_layer(
        solver="fixed_point", backward="unrolled", max_iter=max_iter, tol=tol, on_failure="ignore"
    )
    cell = layer.cell
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x):
        out, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
        return keras.ops.sum(out * t)

    grads, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, x)
    layer(x, training=True)
    steps = int(layer.solver_statistics()["fwd_steps"])
    assert (steps < max_iter) == (tol > 1e-6), steps

    def iterates(trainable, x, count):
        z, out = keras.ops.zeros((B, N)), []
        for _ in range(count):
            fz, _ = cell.stateless_call(trainable, [], z, x)
            out.append((z, fz))
            z = fz
        return out

    # Which iterate the solver returns for each sample: the first that met `tol`,
    # else the one with the lowest absolute residual (numpy, from a plain loop).
    res = [
        (
            np.linalg.norm(fz - z, axis=1),
            np.linalg.norm(fz - z, axis=1) / np.linalg.norm(fz, axis=1),
        )
        for z, fz in iterates(trainable, x, steps)
    ]
    rel = np.stack([r for _, r in res])
    met = rel <= tol
    best = np.where(met.any(0), met.argmax(0), np.stack([a for a, _ in res]).argmin(0))

    def reference(trainable, x, offset):
        zs = [z for z, _ in iterates(trainable, x, steps + offset)]
        return sum(keras.ops.sum(zs[k + offset][i] * t[i]) for i, k in enumerate(best))

    want = jax.grad(reference, argnums=(0, 1))(trainable, x, 0)
    later = jax.grad(reference, argnums=(0, 1))(trainable, x, 2)
    for got, ref, other in zip(
        [*grads, grad_x], [*want[0], want[1]], [*later[0], later[1]], strict=True
    ):
        scale = np.max(np.abs(ref))
        error = np.max(np.abs(np.asarray(got) - np.asarray(ref))) / scale
        assert error < 1e-5, error
        # The comparison tells the iterations apart: two more differ by far more.
        assert np.max(np.abs(np.asarray(other) - np.asarray(ref))) / scale > 100 * error + 1e-6


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_unrolled_gradient_of_a_tight_solve_approaches_the_implicit_one(solver):
    _, _, _, x, t = linear_problem()
    grads = {}
    for backward in ("unrolled", "implicit"):
        layer = dense_layer(solver=solver, backward=backward, max_iter=80, tol=1e-6)
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, layer=layer, non_trainable=non_trainable):
            out, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
            return keras.ops.sum(out * t)

        grads[backward] = jax.jit(jax.grad(loss))(trainable)
    for a, b in zip(grads["unrolled"], grads["implicit"], strict=True):
        error = np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b)))
        assert error < 1e-3, error


def test_unrolled_trains_with_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(6, 6))).astype("float32")
    keras.utils.set_random_seed(0)
    layer = keras_deq.DEQ(keras_deq.DenseCell(6), backward="unrolled", max_iter=20)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6), layer])
    model.compile(keras.optimizers.Adam(0.01), "mse")
    history = model.fit(x, y, epochs=5, batch_size=16, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < 0.9 * history[0], history
    assert 1 <= layer.solver_statistics()["fwd_steps"] < 20


def test_unrolled_with_a_run_time_budget_needs_a_static_bound():
    from keras_deq.solvers.base import differentiable_loops  # noqa: PLC0415

    solver = keras_deq.solvers.get("fixed_point", max_iter=keras.ops.convert_to_tensor(5))
    with differentiable_loops(), pytest.raises(ValueError, match="static bound"):
        solver(lambda z: 0.5 * z + 1.0, keras.ops.zeros((2, 3)))
    with differentiable_loops(max_steps=8):
        result = solver(lambda z: 0.5 * z + 1.0, keras.ops.zeros((2, 3)))
    assert int(result.steps) == 5


# ------------------------------------------------------------------ jacobian penalty
def tanh_cell_problem(seed=0):
    w, u, b, x, _ = linear_problem(seed)
    w = 2.0 * w
    z = np.tanh(np.random.default_rng(seed + 1).normal(size=(B, N))).astype("float32")
    return w, u, b, x, z


def exact_frobenius(weights, x, z):
    """`||df/dz||_F^2 / (B N)` of `f(z) = tanh(z W + x U + b)` from a dense Jacobian."""
    w, u, b = weights

    def f(z):
        return jax.numpy.tanh(z @ w + x @ u + b)

    jac = jax.jacrev(f)(z)  # (B, N, B, N), zero across samples
    return jax.numpy.sum(jac**2) / (B * N)


def keras_cell(weights):
    cell = keras_deq.DenseCell(N)
    cell.build((None, N), (None, F))
    for variable, value in zip(cell.trainable_variables, weights, strict=True):
        variable.assign(value)
    return cell


def test_hutchinson_with_basis_probes_is_exact_with_its_gradient():
    # Probes sqrt(N) e_k, k = 1..N, average to the identity: the estimate is exact.
    w, u, b, x, z = tanh_cell_problem()
    cell = keras_cell((w, u, b))
    probes = [np.tile(np.sqrt(N) * np.eye(N, dtype="float32")[k], (B, 1)) for k in range(N)]

    def estimate(weights):
        def f(z_):
            return cell.stateless_call(list(weights), [], z_, x)[0]

        return keras_deq.JacobianPenalty.estimate_with(f, z, probes)

    weights = [jax.numpy.asarray(a) for a in (w, u, b)]
    got, got_grads = jax.value_and_grad(estimate)(weights)
    want, want_grads = jax.value_and_grad(exact_frobenius)(weights, x, z)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, ref in zip(got_grads, want_grads, strict=True):
        error = np.max(np.abs(np.asarray(a) - np.asarray(ref))) / np.max(np.abs(np.asarray(ref)))
        assert error < 1e-5, error
    assert np.max(np.abs(np.asarray(want_grads[0]))) > 1e-2  # a gradient to compare


def test_layer_penalty_and_its_gradient_match_the_dense_jacobian_in_expectation():
    # The loss the layer adds is weight * estimate at z*; Gaussian probes, averaged.
    w, u, b, x, _ = tanh_cell_problem()
    layer = keras_deq.DEQ(
        keras_deq.DenseCell(N),
        state_shape=(N,),
        jacobian_weight=3.0,
        jacobian_probes=64,
        tol=1e-6,
        max_iter=100,
        seed=1,
    )
    layer.build((None, F))
    for variable, value in zip(layer.cell.trainable_variables, (w, u, b), strict=True):
        variable.assign(value)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def penalty(trainable, non_trainable):
        out, non_trainable, losses = layer.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        return sum(losses), (out, non_trainable)

    step = jax.jit(jax.value_and_grad(penalty, has_aux=True))
    values, grads = [], []
    for _ in range(32):  # 32 x 64 probes: the seed state advances between calls
        (value, (z_star, non_trainable)), grad = step(trainable, non_trainable)
        values.append(float(value))
        grads.append([np.asarray(g) for g in grad])
    z_star = jax.lax.stop_gradient(z_star)
    want, want_grads = jax.value_and_grad(exact_frobenius)(trainable, x, z_star)
    # One call's estimate has a relative spread of about 8% here, the mean of 32 about 1.4%.
    assert abs(np.mean(values) / (3.0 * float(want)) - 1) < 0.06, (values, float(want))
    assert np.std(values) > 0  # the probes did change
    # d penalty / d weights, with z* held constant (the layer stops its gradient).
    for i, ref in enumerate(want_grads):
        mean = np.mean([g[i] for g in grads], axis=0)
        error = np.linalg.norm(mean - 3.0 * np.asarray(ref)) / np.linalg.norm(3.0 * ref)
        assert error < 0.1, (i, error)


def test_penalty_in_fit_lowers_the_jacobian_norm():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, N)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(N, N))).astype("float32")

    def train(weight):
        keras.utils.set_random_seed(0)
        layer = keras_deq.DEQ(
            keras_deq.DenseCell(N, kernel_initializer="glorot_uniform"),
            jacobian_weight=weight,
            max_iter=40,
            seed=0,
        )
        model = keras.Sequential([keras.Input((N,)), layer])
        model.compile(keras.optimizers.Adam(0.02), "mse")
        model.fit(x, y, epochs=4, batch_size=32, verbose=0)
        z = np.asarray(model(x[:16]))
        w, u, b = (v.value for v in layer.cell.trainable_variables)
        norm = float(exact_frobenius((w, u, b), x[:16], z)) * B / 16
        return norm, layer.solver_statistics()

    free, _ = train(0.0)
    penalized, stats = train(2.0)
    assert penalized < 0.7 * free, (penalized, free)
    assert stats["jac_loss"] > 0


def test_solver_logger_shows_the_layers_last_statistics():
    """JAX `fit` logs hold no layer metrics: `SolverLogger` prints the layer's last ones."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    y = np.random.default_rng(1).integers(0, 2, size=(32,))
    deq = keras_deq.DEQ(keras_deq.DenseCell(6), solver="anderson", max_iter=20, name="deq")
    model = keras.Sequential([keras.Input((6,)), deq, keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    lines = []
    logger = keras_deq.callbacks.SolverLogger(
        metrics=("loss",), stats=("fwd_steps", "bwd_steps"), print_fn=lines.append
    )
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[logger])
    assert "deq_fwd_steps" not in history.history
    header, row = lines
    cells = row.split()
    steps = deq.solver_statistics()["fwd_steps"]
    assert steps >= 2
    assert float(cells[2]) == pytest.approx(steps, abs=0.01)
    assert cells[3] == "-"  # the adjoint's statistics are not kept on JAX


def test_statistics_during_an_epoch_say_how_to_read_them():
    """Keras' JAX trainer detaches the variables' values during an epoch: reading the
    statistics then is a clear error that names the fix, and the fix gives the batch's."""
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    deq = keras_deq.DEQ(keras_deq.DenseCell(6), max_iter=20, name="deq")
    model = keras.Sequential([keras.Input((6,)), deq, keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    seen = []

    class Reader(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            with pytest.raises(RuntimeError, match=r"'deq'.*jax_state_sync"):
                deq.solver_statistics()
            self.model.jax_state_sync()
            seen.append(deq.solver_statistics())

    model.fit(x, x[:, :2], batch_size=16, epochs=1, verbose=0, callbacks=[Reader()])
    assert len(seen) == 2
    assert all(2 <= s["fwd_steps"] <= 20 and s["converged"] == 1.0 for s in seen)
    assert deq.solver_statistics() == seen[-1]  # after the epoch: attached again


def test_solver_logger_with_validation_shows_the_last_training_batch():
    """The epoch's validation calls the layer after its last training batch: the
    training columns still show that batch (they showed the last validation batch)."""
    keras.utils.set_random_seed(0)
    x = 3 * np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    y = np.random.default_rng(1).integers(0, 2, size=(32,))
    deq = keras_deq.DEQ(
        keras_deq.DenseCell(6), solver="fixed_point", max_iter=40, tol=1e-5, name="deq"
    )
    model = keras.Sequential([keras.Input((6,)), deq, keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trained = []

    class LastTrainingBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.model.jax_state_sync()  # the layer's variables are the step's
            trained.append(deq.solver_statistics()["fwd_steps"])

    lines = []
    logger = keras_deq.callbacks.SolverLogger(
        metrics=("loss",), stats=("fwd_steps",), print_fn=lines.append
    )
    validation = (np.zeros_like(x), y)  # zero inputs: a different number of steps
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        verbose=0,
        validation_data=validation,
        callbacks=[LastTrainingBatch(), logger],
    )
    validated = deq.solver_statistics()["fwd_steps"]
    assert validated != trained[-1]  # the test can tell the two apart
    assert float(lines[1].split()[2]) == pytest.approx(trained[-1], abs=0.01)


def test_export_serves_the_keras_predictions_in_a_fresh_process(tmp_path):
    # jax2tf cannot serialize a host callback: the layer makes none while it is converted.
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    x = np.random.default_rng(5).normal(size=(3, 4)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras_deq.DEQ(keras_deq.DenseCell(4))])
    want = model.predict(x, verbose=0)
    model.export(str(tmp_path / "exported"), verbose=False)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "served = tf.saved_model.load(sys.argv[1])\n"
        "np.save(sys.argv[3], served.serve(np.load(sys.argv[2])).numpy())\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tmp_path / "exported"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "got.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), want, rtol=1e-5, atol=1e-6)
