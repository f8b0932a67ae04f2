"""The DEQ layer on the PyTorch backend (run with `KERAS_BACKEND=torch`; skipped on others).

The implicit gradient against a dense linear solve (with a nested state, which Keras'
own torch `custom_gradient` cannot carry); the Jacobian penalty's second-order gradient
against autodiff of the dense Jacobian; `on_failure="raise"` stopping `fit` before any
weight moves; the solver metrics in `fit`'s logs; the README model on digits; the
package without TensorFlow; the op-by-op paths and `backend.cond` on eager PyTorch.
"""

import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":
    pytest.skip("PyTorch backend tests (KERAS_BACKEND=torch)", allow_module_level=True)

import torch  # noqa: E402
from linear_problem import B, F, N, dense_gradients, linear_layer, linear_problem  # noqa: E402

import keras_deq  # noqa: E402
from keras_deq import backend  # noqa: E402


@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_gradient_matches_a_dense_solve(solver, backward):
    w, u, b, x, t = linear_problem()
    layer = linear_layer(solver, backward, w, u, b)
    x_in = torch.tensor(x, requires_grad=True)
    loss = (layer(x_in, training=True) * torch.tensor(t)).sum()
    sources = [v.value for v in layer.cell.trainable_variables] + [x_in]
    got = torch.autograd.grad(loss, sources)
    for g, want in zip(got, dense_gradients(w, u, b, x, t), strict=True):
        np.testing.assert_allclose(g.detach().numpy(), want, rtol=2e-4, atol=2e-5)


class PairCell(keras.layers.Layer):
    """A cell on a pair state `[a, c]`: `a' = a W + x U`, `c' = 0.5 a' + 0.2 c`."""

    def build(self, z_shape, x_shape):
        self.w = self.add_weight(shape=(N, N), initializer=keras.initializers.Orthogonal(0.5))
        self.u = self.add_weight(shape=(x_shape[-1], N), initializer="glorot_uniform")

    def call(self, z, x):
        a, c = z
        a_next = keras.ops.matmul(a, self.w) + keras.ops.matmul(x, self.u)
        return [a_next, 0.5 * a_next + 0.2 * c]


def test_implicit_gradient_of_a_nested_state_equals_the_unrolled_one():
    # Keras' torch custom_gradient allows one output; keras_deq's own autograd.Function
    # carries the two tensors of this state.
    x = np.random.default_rng(1).normal(size=(B, F)).astype("float32")
    grads = {}
    for mode in ("implicit", "unrolled"):
        keras.utils.set_random_seed(0)
        layer = keras_deq.DEQ(
            PairCell(), state_shape=[(N,), (N,)], backward=mode, tol=1e-7, max_iter=200
        )
        a, c = layer(x, training=True)
        loss = (a * a).sum() + (c * torch.arange(N)).sum()
        grads[mode] = torch.autograd.grad(loss, [v.value for v in layer.trainable_variables])
    for g, h in zip(grads["implicit"], grads["unrolled"], strict=True):
        np.testing.assert_allclose(g.numpy(), h.numpy(), rtol=1e-4, atol=1e-5)


def test_custom_gradient_lets_a_forward_error_through():
    # Keras' torch custom_gradient would turn this into NaN gradients.
    @backend.custom_gradient
    def broken(t):
        raise ValueError("broken forward")

    with pytest.raises(ValueError, match="broken forward"):
        broken(torch.ones(2, requires_grad=True))


def test_eager_torch_runs_op_by_op_and_cond_runs_the_branch_keras_runs():
    # The solver loop's op-by-op paths (Anderson's tuple history, the skipped row
    # replacement) are taken on eager PyTorch; `backend.cond` stands in for `ops.cond`.
    assert backend.runs_op_by_op()
    for pred in (True, False):
        flag = torch.tensor(pred)
        assert backend.cond(flag, lambda: "a", lambda: "b") == keras.ops.cond(
            flag, lambda: "a", lambda: "b"
        )
    meta = torch.zeros((), dtype=torch.bool, device="meta")
    assert backend.cond(meta, lambda: "a", lambda: "b") == "a"


def test_penalty_gradient_matches_autodiff_of_the_dense_jacobian():
    # With basis probes Hutchinson's estimate is exact: sum_i ||e_i^T J||^2 = ||J||_F^2.
    rng = np.random.default_rng(2)
    w = torch.tensor(rng.normal(size=(N, N)).astype("float32"), requires_grad=True)
    z = torch.tensor(rng.normal(size=(B, N)).astype("float32"))

    def f(s):
        return torch.tanh(s @ w)

    probes = [torch.eye(N)[i].expand(B, N) for i in range(N)]
    estimate = keras_deq.JacobianPenalty.estimate_with(f, z, probes) * N  # undo the 1/probes
    (got,) = torch.autograd.grad(estimate, w)
    # Reference: the per-sample Jacobian diag(1 - tanh^2) W^T, its squared Frobenius norm
    # averaged over samples and divided by N, differentiated by autodiff.
    w_ref = w.detach().clone().requires_grad_(True)
    slope = 1 - torch.tanh(z @ w_ref) ** 2  # (B, N)
    exact = ((slope[:, :, None] * w_ref.T[None]) ** 2).sum() / (B * N)
    (want,) = torch.autograd.grad(exact, w_ref)
    np.testing.assert_allclose(estimate.item(), exact.item(), rtol=1e-5)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-6)


def _failing_model(on_failure):
    keras.utils.set_random_seed(0)
    cell = keras_deq.DenseCell(6, kernel_initializer=keras.initializers.Orthogonal(3.0))
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras_deq.DEQ(cell, max_iter=5, tol=1e-9, on_failure=on_failure, name="deq"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def test_on_failure_raise_stops_fit_before_any_weight_moves():
    # The forward solve converges; the adjoint solve (one step to 1e-12) does not, and
    # raises inside `loss.backward()`, before the optimizer applies any update.
    x = np.random.default_rng(3).normal(size=(16, 6)).astype("float32")
    y = np.zeros((16, 2), "float32")
    keras.utils.set_random_seed(0)
    deq = keras_deq.DEQ(
        keras_deq.DenseCell(6),
        backward_max_iter=1,
        backward_tol=1e-12,
        on_failure="raise",
        name="deq",
    )
    model = keras.Sequential([keras.Input((6,)), deq, keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(FloatingPointError, match="backward solver did not reach tol"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_warn_warns_once_and_fit_logs_the_solver_metrics():
    x = np.random.default_rng(3).normal(size=(16, 6)).astype("float32")
    y = np.zeros((16, 2), "float32")
    model = _failing_model("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs = model.fit(x, y, batch_size=8, epochs=2, verbose=0).history
    found = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(found) == 1 and "'deq'" in str(found[0].message)
    assert logs["deq_converged"] == [0.0, 0.0]
    assert logs["deq_fwd_steps"] == [5.0, 5.0]
    assert all(steps > 0 for steps in logs["deq_bwd_steps"])


def test_readme_model_trains_digits():
    from sklearn.datasets import load_digits  # noqa: PLC0415

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64),
            keras_deq.DEQ(keras_deq.DenseCell(64), name="deq"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    logs = model.fit(x[:1400], y[:1400], batch_size=64, epochs=6, verbose=0).history
    assert logs["deq_converged"][-1] > 0.95
    assert model.evaluate(x[1400:], y[1400:], verbose=0)[1] > 0.85


def test_keras_file_round_trip(tmp_path):
    x = np.random.default_rng(4).normal(size=(5, 6)).astype("float32")
    model = keras.Sequential(
        [keras.Input((6,)), keras_deq.DEQ(keras_deq.DenseCell(6), solver="anderson")]
    )
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_the_package_trains_without_tensorflow_installed():
    script = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "import numpy as np, keras, keras_deq\n"
        "m = keras.Sequential([keras.Input((4,)), keras_deq.DEQ(keras_deq.DenseCell(4), "
        "jacobian_weight=0.1)])\n"
        "m.compile('adam', 'mse')\n"
        "m.fit(np.ones((8, 4), 'float32'), np.ones((8, 4), 'float32'), verbose=0)\n"
        "print('trained')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trained" in out.stdout
