"""MonDEQ: the unique equilibrium, at weight norms where plain iteration fails, against
NumPy (an independent float64 solve and dense-solve gradients)."""

import keras
import numpy as np
import pytest
from feature_references import layer_gradients
from keras import ops
from monotone_references import (
    equation_residual,
    equilibrium,
    exact_gradients,
    random_weights,
    scaled,
    weight_matrix,
)

import keras_deq
from keras_deq.layers import MonotoneCell

SPLITTINGS = ["peaceman_rachford", "forward_backward"]


def make_layer(n, d, norm, seed=0, dtype="float32", **kwargs):
    """A built MonDEQ whose `A`, `B` have spectral norm `norm`; returns it and NumPy's
    float64 `(W, U, b)` of its weights (`b` random, not zero). Its solves are not
    compiled apart (`jit_compile=False`), which `solve` traces faster."""
    kwargs.setdefault("on_failure", "ignore")
    kwargs.setdefault("jit_compile", False)
    layer = keras_deq.MonDEQ(n, dtype=dtype, **kwargs)
    layer.build((None, d))
    cell = layer.cell
    rng = np.random.default_rng(seed)
    a, b = random_weights(rng, n, norm)
    cell.kernel_a.assign(a.astype(dtype))
    cell.kernel_b.assign(b.astype(dtype))
    cell.bias.assign(rng.normal(scale=0.5, size=n).astype(dtype))
    a, b = (v.numpy().astype("float64") for v in (cell.kernel_a, cell.kernel_b))
    w = weight_matrix(a, b, cell.monotonicity)
    return layer, w, cell.injection_kernel.numpy().astype("float64"), cell.bias.numpy()


def compiled_call(layer):
    """`layer(x, initial_state=s)` as a function `(x, s) -> (z, statistics)`, compiled once
    for all the calls (the weights are read at each call): eagerly, TensorFlow runs the
    loop op by op, recomputing `I - W`, its norm bound and the resolvent at every step
    (6 ms a step here, 0.1 ms in a graph; a compiled solve computes them once, outside the
    loop), and JAX compiles each call's loop anew."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        graph = tf.function(lambda x, s: layer(x, initial_state=s))

        def call(x, s):
            return np.asarray(graph(x, s), "float64"), layer.solver_statistics()

        return call
    if keras.backend.backend() == "torch":  # eager

        def call_eagerly(x, s):
            z = layer(x, initial_state=s)
            return np.asarray(z, "float64"), layer.solver_statistics()

        return call_eagerly
    import jax  # noqa: PLC0415

    jitted = jax.jit(lambda t, n, x, s: layer.stateless_call(t, n, x, initial_state=s))

    def call(x, s):
        trainable = [v.value for v in layer.trainable_variables]
        out, non_trainable = jitted(
            trainable, [v.value for v in layer.non_trainable_variables], x, s
        )
        for variable, value in zip(layer.non_trainable_variables, non_trainable, strict=True):
            variable.assign(value)
        return np.asarray(out, "float64"), layer.solver_statistics()

    return call


@pytest.mark.parametrize(
    "splitting,monotonicity,norm",
    [("peaceman_rachford", 0.1, 8.0), ("forward_backward", 1.0, 1.0)],
)
def test_equilibrium_matches_numpy_and_is_unique(splitting, monotonicity, norm):
    n, d = 16, 8
    layer, w, u_kernel, bias = make_layer(
        n, d, norm, splitting=splitting, monotonicity=monotonicity, max_iter=3000, tol=1e-6
    )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, d)).astype("float32")
    u = x.astype("float64") @ u_kernel + bias
    want = equilibrium(w, u)
    assert equation_residual(w, u, want) < 1e-9  # the reference solves the equation
    assert 0 < np.count_nonzero(want) < want.size  # some units active, some not
    scale = np.abs(want).max()
    call = compiled_call(layer)
    for start_scale in (0.0, 10.0, 1e3):
        z, stats = call(x, rng.normal(scale=start_scale, size=(8, n)).astype("float32"))
        assert stats["converged"] == 1.0
        np.testing.assert_allclose(z, want, atol=2e-4 * scale)


def plain_deq(n, d, u_kernel, bias):
    """The DEQ of `z <- relu(z kernel + x U + b)`, iterated as it is (a `DenseCell`)."""
    cell = keras_deq.DenseCell(n, activation="relu")
    deq = keras_deq.DEQ(
        cell,
        solver="fixed_point",
        max_iter=200,
        state_shape=(n,),
        on_failure="ignore",
        jit_compile=False,
    )
    deq.build((None, d))
    cell.injection_kernel.assign(u_kernel.astype("float32"))
    cell.bias.assign(bias.astype("float32"))
    return deq, compiled_call(deq)


def test_converges_at_large_norms_where_plain_iteration_fails():
    n, d = 32, 8
    x = np.random.default_rng(3).normal(size=(16, d)).astype("float32")
    zeros = np.zeros((16, n), "float32")
    layer, _, u_kernel, bias = make_layer(n, d, 1.0, seed=2, max_iter=200)
    mon = compiled_call(layer)
    same, same_call = plain_deq(n, d, u_kernel, bias)
    other, other_call = plain_deq(n, d, u_kernel, bias)
    for norm in (4.0, 8.0, 16.0):
        a, b = random_weights(np.random.default_rng(int(norm)), n, norm)
        layer.cell.kernel_a.assign(a.astype("float32"))
        layer.cell.kernel_b.assign(b.astype("float32"))
        w = weight_matrix(a.astype("float32"), b.astype("float32"), 0.1)
        z, stats = mon(x, zeros)
        assert stats["converged"] == 1.0, norm
        want = equilibrium(w, x.astype("float64") @ u_kernel + bias)
        np.testing.assert_allclose(z, want, atol=1e-3 * np.abs(want).max())
        # The same equation z = relu(W z + U x + b), iterated as it is: every sample
        # diverges (to Inf within 11-27 iterations, measured).
        same.cell.kernel.assign(w.T.astype("float32"))
        assert same_call(x, zeros)[1]["converged"] == 0.0, norm
        # An unconstrained W of spectral norm `norm`: most samples do not converge
        # (measured: none at 4, 1 of 16 at 8 and 16).
        gaussian = scaled(np.random.default_rng(4).normal(size=(n, n)), norm)
        other.cell.kernel.assign(gaussian.astype("float32"))
        assert other_call(x, zeros)[1]["converged"] < 0.5, norm


@pytest.mark.parametrize(
    "splitting,monotonicity,norm",
    [("peaceman_rachford", 0.1, 3.0), ("forward_backward", 1.0, 0.5)],
)
def test_implicit_gradient_matches_dense_solves(splitting, monotonicity, norm):
    n, d = 6, 4
    layer, w, u_kernel, _ = make_layer(
        n,
        d,
        norm,
        seed=5,
        splitting=splitting,
        monotonicity=monotonicity,
        max_iter=2000,
        tol=1e-7,
        backward_max_iter=2000,
        backward_tol=1e-7,
    )
    cell = layer.cell
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, d)).astype("float32")
    g = rng.normal(size=(3, n))
    weights = ops.convert_to_tensor(g.astype("float32"))
    variables = [cell.kernel_a, cell.kernel_b, cell.injection_kernel, cell.bias]
    got = layer_gradients(layer, x, lambda z: ops.sum(z * weights), variables)
    bias = cell.bias.numpy().astype("float64")
    z = equilibrium(w, x.astype("float64") @ u_kernel + bias)
    want = exact_gradients(w, cell.kernel_a.numpy().astype("float64"), u_kernel, bias, x, z, g)
    for name, value in zip(["x", "a", "b", "injection", "bias"], got, strict=True):
        expected = want[name]
        np.testing.assert_allclose(
            np.asarray(value), expected, atol=2e-3 * np.abs(expected).max(), err_msg=name
        )


@pytest.mark.float64
def test_implicit_gradient_matches_dense_solves_in_float64():
    n, d = 6, 4
    layer, w, u_kernel, _ = make_layer(
        n, d, 3.0, seed=7, dtype="float64", tol=1e-12, max_iter=3000, backward_tol=1e-12
    )
    cell = layer.cell
    rng = np.random.default_rng(8)
    x, g = rng.normal(size=(3, d)), rng.normal(size=(3, n))
    variables = [cell.kernel_a, cell.kernel_b, cell.injection_kernel, cell.bias]
    got = layer_gradients(layer, x, lambda z: ops.sum(z * g), variables)
    bias = cell.bias.numpy()
    z = equilibrium(w, x @ u_kernel + bias)
    want = exact_gradients(w, cell.kernel_a.numpy(), u_kernel, bias, x, z, g)
    for name, value in zip(["x", "a", "b", "injection", "bias"], got, strict=True):
        np.testing.assert_allclose(np.asarray(value), want[name], rtol=1e-7, atol=1e-10)


def test_trains_and_stays_convergent_with_a_large_learning_rate():
    # The default solves: compiled apart on TensorFlow (XLA, the resolvent hoisted out
    # of the loop), jitted with the step on JAX.
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(128, 8)).astype("float32"), rng.integers(0, 3, 128)
    layer = keras_deq.MonDEQ(16, max_iter=300)
    model = keras.Sequential([keras.Input((8,)), layer, keras.layers.Dense(3)])
    model.compile(
        keras.optimizers.Adam(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)
    assert np.linalg.norm(layer.cell.kernel_a.numpy(), 2) > 1.5  # grew from about 1.15
    layer(x)
    assert layer.solver_statistics()["converged"] == 1.0


def test_a_plain_deq_of_the_cell_returns_the_splitting_state():
    n, d = 5, 3
    rng = np.random.default_rng(10)
    x = rng.normal(size=(4, d)).astype("float32")
    cell = MonotoneCell(n)
    deq = keras_deq.DEQ(cell, solver="fixed_point", max_iter=100, tol=1e-6)
    v = np.asarray(deq(x), "float64")
    assert v.min() < 0  # Peaceman-Rachford's state, not z*
    a, b = (w.numpy().astype("float64") for w in (cell.kernel_a, cell.kernel_b))
    u = x.astype("float64") @ cell.injection_kernel.numpy() + cell.bias.numpy()
    want = equilibrium(weight_matrix(a, b, cell.monotonicity), u)
    np.testing.assert_allclose(np.asarray(cell.readout(v)), want, atol=1e-5)


def test_config_and_keras_file_round_trip(tmp_path):
    fb = keras_deq.MonDEQ(6, splitting="forward_backward", monotonicity=0.5)
    assert keras_deq.MonDEQ.from_config(fb.get_config()).get_config() == fb.get_config()
    layer = keras_deq.MonDEQ(6, alpha=0.3, jit_compile=False)  # faster to trace
    model = keras.Sequential([keras.Input((4,)), layer, keras.layers.Dense(2)])
    x = np.random.default_rng(11).normal(size=(3, 4)).astype("float32")
    assert keras_deq.MonDEQ.from_config(layer.get_config()).get_config() == layer.get_config()
    model.save(tmp_path / "mon.keras")
    loaded = keras.models.load_model(tmp_path / "mon.keras")
    assert isinstance(loaded.layers[0], keras_deq.MonDEQ)
    cell_config = {**loaded.layers[0].cell.get_config(), "name": layer.cell.name}
    assert cell_config == layer.cell.get_config()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("solver", ["anderson", "broyden", keras_deq.solvers.Anderson()])
def test_solvers_without_the_guarantee_are_refused(solver):
    with pytest.raises(ValueError, match=r"solver='fixed_point'.*Received: solver="):
        keras_deq.MonDEQ(4, solver=solver)


def test_damped_fixed_point_and_any_adjoint_solver_are_accepted():
    layer = keras_deq.MonDEQ(
        4,
        solver=keras_deq.solvers.FixedPoint(max_iter=300, damping=0.5),
        backward_solver="anderson",
    )
    layer(np.ones((2, 3), "float32"))
    assert layer.solver_statistics()["converged"] == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"units": 0}, "units"),
        ({"units": 4, "monotonicity": 0.0}, "monotonicity"),
        ({"units": 4, "splitting": "admm"}, "splitting"),
        ({"units": 4, "splitting": "forward_backward", "alpha": 0.01}, "alpha"),
        ({"units": 4, "alpha": -1.0}, "alpha"),
        ({"units": 4, "max_iter": 0}, "max_iter"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_deq.MonDEQ(**kwargs)


def test_inputs_must_be_matrices():
    with pytest.raises(ValueError, match=r"\(batch, features\)"):
        keras_deq.MonDEQ(4)(np.zeros((2, 3, 3), "float32"))
