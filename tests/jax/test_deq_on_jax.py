"""The DEQ layer on the JAX backend (run with `KERAS_BACKEND=jax`; skipped on others).

The implicit gradient against a dense linear solve, under `jax.jit`; the README's
model trained with `fit` on digits; what the constructor refuses on JAX; warnings.
"""

import warnings

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("JAX backend tests (KERAS_BACKEND=jax)", allow_module_level=True)

import jax  # noqa: E402

import keras_deq  # noqa: E402

B, F, N = 4, 3, 5


def linear_problem(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(N, N))
    w = (0.6 * w / np.linalg.norm(w, 2)).astype("float32")
    u = rng.normal(size=(F, N)).astype("float32")
    b = rng.normal(size=(N,)).astype("float32")
    x = rng.normal(size=(B, F)).astype("float32")
    t = rng.normal(size=(B, N)).astype("float32")
    return w, u, b, x, t


@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
@pytest.mark.parametrize("backward", ["implicit", keras_deq.backward.Phantom(300, 1.0)])
def test_gradient_matches_a_dense_solve_under_jit(solver, backward):
    w, u, b, x, t = linear_problem()
    cell = keras_deq.DenseCell(N, activation="linear")
    layer = keras_deq.DEQ(
        cell, state_shape=(N,), solver=solver, backward=backward, tol=1e-7, max_iter=300
    )
    layer.build((None, F))
    for variable, value in zip(cell.trainable_variables, (w, u, b), strict=True):
        variable.assign(value)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x):
        out, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
        return keras.ops.sum(out * t)

    grads, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, x)
    # Dense reference in float64, row vectors: z* = z* W + x U + b, u = g + u W^T.
    w64, u64, b64, x64, t64 = (a.astype("float64") for a in (w, u, b, x, t))
    z = (x64 @ u64 + b64) @ np.linalg.inv(np.eye(N) - w64)
    adjoint = t64 @ np.linalg.inv(np.eye(N) - w64.T)
    want = [z.T @ adjoint, x64.T @ adjoint, adjoint.sum(0), adjoint @ u64.T]
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


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backward": "unrolled"}, "cannot reverse-differentiate"),
        ({"on_failure": "raise"}, "on_failure='raise'"),
        ({"jacobian_weight": 0.1}, "Jacobian penalty"),
    ],
)
def test_what_jax_cannot_do_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_deq.DEQ(keras_deq.DenseCell(4), **kwargs)


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


def test_keras_file_round_trip(tmp_path):
    model = keras.Sequential(
        [keras.Input((6,)), keras_deq.DEQ(keras_deq.DenseCell(6), backward="phantom")]
    )
    x = np.random.default_rng(1).normal(size=(3, 6)).astype("float32")
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(restored(x)), np.asarray(model(x)), rtol=0, atol=1e-6)
