"""Tests of the `keras_deq.DEQ` layer: arguments, shapes, failures, regularizer, saving.

Gradient correctness is in tests/test_backward.py; models, fit and XLA in
test_deq_training.py.
"""

import json
import re
import warnings

import keras
import numpy as np
import pytest
from deq_statistics import LAYER_METRICS, logged, reset_statistics, statistic
from feature_references import FLOAT_DTYPES, layer_gradients
from keras import ops

import keras_deq
from keras_deq import DEQ, DenseCell


# ----------------------------------------------------------------------------- helpers
def runtime_warnings(caught):
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


def data(batch=4, features=5, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, features)).astype("float32")


ON_JAX_RAISE_IS_REFUSED = (
    "on_failure='raise' is refused on JAX (no sound way to stop a compiled step); "
    "tests/jax checks the refusal"
)


class ShrinkCell(keras.layers.Layer):
    """Returns a state with fewer features than it receives (a broken cell)."""

    def call(self, z, x):
        return z[:, :3] + x[:, :3]


class NoneCell(keras.layers.Layer):
    def call(self, z, x):
        return None


@keras.saving.register_keras_serializable(package="keras_deq_tests")
class TwoStateCell(keras.layers.Layer):
    """State `[a (3,), b (4,)]`."""

    def build(self, z_shape, x_shape):
        orth = keras.initializers.Orthogonal
        self.w_a = self.add_weight(name="w_a", shape=(4, 3), initializer=orth(0.4, seed=1))
        self.w_b = self.add_weight(name="w_b", shape=(3, 4), initializer=orth(0.4, seed=2))
        self.u_a = self.add_weight(
            name="u_a", shape=(x_shape[-1], 3), initializer=keras.initializers.RandomNormal(seed=3)
        )

    def call(self, z, x):
        a, b = z
        a_next = keras.ops.tanh(keras.ops.matmul(b, self.w_a) + keras.ops.matmul(x, self.u_a))
        b_next = keras.ops.tanh(keras.ops.matmul(a, self.w_b))
        return [a_next, b_next]


@keras.saving.register_keras_serializable(package="keras_deq_tests")
class TwoInputCell(keras.layers.Layer):
    """Injection `[x1, x2]`, state (5,)."""

    def build(self, z_shape, x_shape):
        self.w = self.add_weight(
            name="w", shape=(5, 5), initializer=keras.initializers.Orthogonal(0.5, seed=4)
        )

    def call(self, z, x):
        x1, x2 = x
        return keras.ops.tanh(keras.ops.matmul(z, self.w) + x1 - x2)


# -------------------------------------------------------------------- 8. arguments
@pytest.mark.parametrize("cell", [None, "dense", lambda z, x: z, keras.ops.tanh])
def test_cell_must_be_a_layer(cell):
    with pytest.raises(ValueError, match="cell"):
        DEQ(cell)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"solver": "newton"}, r"solver='newton'"),
        ({"solver": None}, r"solver=None"),
        ({"backward_solver": "newton"}, r"backward_solver='newton'"),
        ({"backward": "exact"}, r"backward='exact'"),
        ({"backward": None}, r"backward=None"),
        ({"max_iter": 0}, r"max_iter=0"),
        ({"max_iter": -2}, r"max_iter=-2"),
        ({"max_iter": 2.5}, r"max_iter=2.5"),
        ({"max_iter": True}, r"max_iter=True"),
        ({"tol": 0}, r"tol=0"),
        ({"tol": -1e-3}, r"tol=-0.001"),
        ({"tol": float("nan")}, r"tol=nan"),
        ({"backward_max_iter": 0}, r"backward_max_iter=0"),
        ({"backward_tol": -1.0}, r"backward_tol=-1.0"),
        ({"stop_mode": "max"}, r"stop_mode='max'"),
        ({"phantom_steps": 0}, r"phantom_steps=0"),
        ({"phantom_damping": 0.0}, r"phantom_damping=0.0"),
        ({"phantom_damping": 1.5}, r"phantom_damping=1.5"),
        ({"jacobian_weight": -0.1}, r"jacobian_weight=-0.1"),
        ({"jacobian_frequency": 0.0}, r"jacobian_frequency=0.0"),
        ({"jacobian_frequency": 2.0}, r"jacobian_frequency=2.0"),
        ({"jacobian_probes": 0}, r"jacobian_probes=0"),
        ({"on_failure": "error"}, r"on_failure='error'"),
        ({"on_failure": None}, r"on_failure=None"),
    ],
)
def test_bad_argument_names_the_argument(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DEQ(DenseCell(5), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"solver_options": {"windoww": 3}}, r"windoww.*solver_options="),
        ({"solver": "fixed_point", "solver_options": {"window": 3}}, r"window.*solver_options="),
        ({"solver": "broyden", "solver_options": {"damping": 0.5}}, r"damping.*solver_options="),
        (
            {"backward_solver": "anderson", "backward_solver_options": {"memory": 3}},
            r"memory.*backward_solver_options=",
        ),
        # The backward solver defaults to the forward one; its options are checked against it.
        (
            {"solver": "fixed_point", "backward_solver_options": {"window": 3}},
            r"window.*backward_solver_options=",
        ),
    ],
)
def test_unknown_solver_option_is_refused(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DEQ(DenseCell(5), **kwargs)


def test_known_solver_options_are_accepted_and_used():
    x = data()
    layer = DEQ(
        DenseCell(5),
        solver="fixed_point",
        solver_options={"damping": 0.5},
        backward_solver="anderson",
        backward_solver_options={"window": 2},
        tol=1e-5,
        max_iter=200,
    )
    undamped = DEQ(DenseCell(5), solver="fixed_point", tol=1e-5, max_iter=200)
    layer(x)
    undamped(x)
    undamped.set_weights(layer.get_weights())
    reset_statistics(undamped)
    np.testing.assert_allclose(layer(x), undamped(x), atol=1e-4)
    # Damping 0.5 on a contraction with rate <= 0.5 slows the iteration down.
    assert statistic(layer, "fwd_steps") > statistic(undamped, "fwd_steps")


@pytest.mark.parametrize(
    "state_shape",
    [(), [], (0,), (-2,), (3.0,), (True,), ("3",), "abc", 5, [(3,), ()], [(3,), "x"], [[]]],
)
def test_malformed_state_shape(state_shape):
    with pytest.raises(ValueError, match="state_shape"):
        DEQ(DenseCell(5), state_shape=state_shape)


def test_cell_output_shape_must_match_state_shape():
    with pytest.raises(ValueError, match=r"\(3,\).*\(5,\)"):
        DEQ(ShrinkCell())(data(features=5))


def test_cell_output_must_match_explicit_state_shape():
    with pytest.raises(ValueError, match=r"\(3,\).*\(6,\)"):
        DEQ(ShrinkCell(), state_shape=(6,))(data(features=5))


class FirstPartCell(keras.layers.Layer):
    """Returns only the first part of a list state."""

    def call(self, z, x):
        return z[0]


def test_cell_output_must_match_list_state():
    with pytest.raises(ValueError, match=r"\[\(3,\)\].*state shape=\[\(3,\), \(4,\)\]"):
        DEQ(FirstPartCell(), state_shape=[(3,), (4,)])(data(features=5))


def test_cell_returning_none_is_refused():
    with pytest.raises(ValueError, match="NoneType"):
        DEQ(NoneCell())(data())


def test_list_input_needs_state_shape():
    with pytest.raises(ValueError, match="state_shape"):
        DEQ(DenseCell(5))([data(), data()])


# ------------------------------------------------------------------ 10. state shape
def test_state_shape_different_from_input():
    x = data(batch=3, features=5)
    layer = DEQ(DenseCell(7), state_shape=(7,), tol=1e-6, max_iter=100, on_failure="ignore")
    z = layer(x)
    assert statistic(layer, "converged") == 1
    assert tuple(z.shape) == (3, 7)
    assert layer.compute_output_shape((None, 5)) == (None, 7)
    assert layer.compute_output_shape((3, 5)) == (3, 7)
    cell = layer.cell
    # It is the fixed point of the cell.
    np.testing.assert_allclose(cell(z, x), z, atol=1e-4)
    model = keras.Sequential([keras.Input((5,)), layer])
    assert model.output_shape == (None, 7)
    assert model.predict(x, verbose=0).shape == (3, 7)


def test_default_state_shape_is_the_input_shape():
    layer = DEQ(DenseCell(5))
    assert layer.compute_output_shape((None, 5)) == (None, 5)
    assert tuple(layer(data(batch=2, features=5)).shape) == (2, 5)


def test_list_state_output_shape():
    layer = DEQ(TwoStateCell(), state_shape=[(3,), (4,)])
    assert layer.compute_output_shape((None, 5)) == [(None, 3), (None, 4)]
    out = layer(data(batch=2, features=5))
    assert [tuple(t.shape) for t in out] == [(2, 3), (2, 4)]
    inputs = keras.Input((5,))
    outputs = DEQ(TwoStateCell(), state_shape=[(3,), (4,)])(inputs)
    assert [tuple(t.shape) for t in outputs] == [(None, 3), (None, 4)]


def test_image_state_shape():
    class ConvCell(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = keras.layers.Conv2D(
                3, 3, padding="same", kernel_initializer=keras.initializers.RandomNormal(0, 0.05)
            )
            self.inject = keras.layers.Conv2D(3, 1)

        def call(self, z, x):
            return keras.ops.tanh(self.conv(z) + self.inject(x))

    layer = DEQ(ConvCell(), state_shape=(4, 4, 3), on_failure="ignore")
    assert layer.compute_output_shape((None, 4, 4, 2)) == (None, 4, 4, 3)
    z = layer(np.random.default_rng(1).normal(size=(2, 4, 4, 2)).astype("float32"))
    assert tuple(z.shape) == (2, 4, 4, 3)
    assert statistic(layer, "converged") == 1


def test_initial_state_gives_the_same_fixed_point_without_gradient():
    x = ops.convert_to_tensor(data())
    layer = DEQ(DenseCell(5), tol=1e-6, max_iter=100, on_failure="ignore")
    z_star = layer(x)
    assert statistic(layer, "converged") == 1
    steps_from_zero = statistic(layer, "fwd_steps")
    reset_statistics(layer)
    z = layer(x, initial_state=z_star)
    np.testing.assert_allclose(z, z_star, atol=1e-5)
    assert statistic(layer, "fwd_steps") < steps_from_zero
    assert initial_state_gradient(layer, x, z_star) is None


def initial_state_gradient(layer, x, z0):
    """The gradient of `sum(layer(x, initial_state=z0))` with respect to `z0`: None when
    the output does not depend on it (on JAX, where autodiff gives zeros instead: None
    when it is all zeros)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        z0 = tf.Variable(z0)
        with tf.GradientTape() as tape:
            z = layer(x, initial_state=z0)
        return tape.gradient(tf.reduce_sum(z), z0)
    if keras.backend.backend() == "torch":
        import torch  # noqa: PLC0415

        z0 = z0.detach().requires_grad_(True)
        z = layer(x, initial_state=z0)
        if not z.requires_grad:
            return None
        (grad,) = torch.autograd.grad(ops.sum(z), z0, allow_unused=True)
        return grad
    import jax  # noqa: PLC0415

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def total(z0):
        z, _ = layer.stateless_call(trainable, non_trainable, x, initial_state=z0)
        return ops.sum(z)

    grad = jax.grad(total)(z0)
    return None if not np.any(np.asarray(grad)) else grad


# --------------------------------------------------------------- 9. non-convergence
def slow_layer(**kwargs):
    """A linear cell with W = 0.99 I that Picard iteration cannot solve in 3 steps.

    From z = 0 the iterates are z_k = c (1 + ... + 0.99^(k-1)), so the best
    relative residual after 3 evaluations is 0.99^2 / (1 + 0.99 + 0.99^2) = 0.33
    whatever the injection c, and the absolute one is 0.98 ||c||.
    """
    cell = DenseCell(8, activation="linear", kernel_initializer=keras.initializers.Identity(0.99))
    options = {"solver": "fixed_point", "max_iter": 3, "tol": 1e-4, "name": "slow"}
    return DEQ(cell, **{**options, **kwargs})


def test_non_convergence_warns_once_eagerly():
    layer = slow_layer()
    x = data(features=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            layer(x)
        layer_gradients(layer, x, ops.sum, layer.trainable_variables)
    found = runtime_warnings(caught)
    assert len(found) == 1, [str(w.message) for w in found]
    message = str(found[0].message)
    assert "slow" in message and "forward" in message and "tol=0.0001" in message
    assert statistic(layer, "converged") < 1
    assert statistic(layer, "fwd_steps") == 3


def test_non_convergence_warns_once_in_fit():
    x = data(batch=16, features=8)
    y = data(batch=16, features=8, seed=1)
    layer = slow_layer()
    model = keras.Sequential([keras.Input((8,)), layer])
    model.compile(optimizer="sgd", loss="mse", jit_compile=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0).history
        trained = logged(layer, history, "converged")
        result = model.evaluate(x, y, verbose=0, return_dict=True)
        evaluated = logged(layer, result, "converged")
        model.predict(x, verbose=0)
    found = runtime_warnings(caught)
    assert len(found) == 1, [str(w.message) for w in found]
    assert "slow" in str(found[0].message)
    assert np.max(trained) < 1
    assert evaluated < 1


def test_non_convergence_in_graph_predict_warns():
    x = data(batch=16, features=8)
    model = keras.Sequential([keras.Input((8,)), slow_layer()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.predict(x, verbose=0, batch_size=8)
        model.predict(x, verbose=0, batch_size=8)
    assert len(runtime_warnings(caught)) == 1


def test_failure_message_reports_the_residual_compared_with_tol():
    # stop_mode="abs": tol bounds the absolute residual, so the message must quote it
    # (here the relative residual is below tol while the absolute one is far above).
    x = 100.0 * data(features=8)
    layer = slow_layer(stop_mode="abs", tol=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x)
    found = runtime_warnings(caught)
    assert len(found) == 1
    assert statistic(layer, "converged") == 0
    message = str(found[0].message)
    quoted = float(re.search(r"residual ([0-9.e+-]+?)\.? ", message).group(1))
    assert quoted > 1.0, message


def test_unconverged_backward_warns_once_in_fit():
    x = data(batch=16, features=8)
    y = data(batch=16, features=8, seed=1)
    layer = DEQ(
        DenseCell(8, kernel_initializer=keras.initializers.Orthogonal(0.9, seed=0)),
        solver="fixed_point",
        max_iter=200,
        backward_max_iter=2,
        name="adj",
    )
    model = keras.Sequential([keras.Input((8,)), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0).history
    found = runtime_warnings(caught)
    assert len(found) == 1, [str(w.message) for w in found]
    assert "backward" in str(found[0].message)
    if keras.backend.backend() != "tensorflow":  # JAX keeps no adjoint statistics
        assert layer.solver_statistics()["converged"] == 1.0
        return
    assert history["adj_converged"] == [1.0, 1.0]
    assert history["adj_bwd_steps"] == [2.0, 2.0]
    assert min(history["adj_bwd_residual"]) > 1e-4


@pytest.mark.tensorflow_only(ON_JAX_RAISE_IS_REFUSED)
def test_non_convergence_raises_eagerly():
    layer = slow_layer(on_failure="raise")
    with pytest.raises(FloatingPointError, match="did not reach tol"):
        layer(data(features=8))


@pytest.mark.tensorflow_only(ON_JAX_RAISE_IS_REFUSED)
def test_non_convergence_raises_in_fit():
    x = data(batch=8, features=8)
    model = keras.Sequential([keras.Input((8,)), slow_layer(on_failure="raise")])
    model.compile(optimizer="sgd", loss="mse", jit_compile=False)
    with pytest.raises(Exception, match="did not reach tol"):
        model.fit(x, x, epochs=1, verbose=0)


def test_on_failure_ignore_is_silent_but_measured():
    layer = slow_layer(on_failure="ignore")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(data(features=8))
    assert not runtime_warnings(caught)
    assert statistic(layer, "converged") < 1


def test_converged_layer_does_not_warn():
    layer = DEQ(DenseCell(8), max_iter=50, tol=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(data(features=8))
    assert not runtime_warnings(caught)
    assert statistic(layer, "converged") == 1


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_nan_input_is_reported_not_silent(solver):
    x = data(batch=2, features=5)
    good = DEQ(DenseCell(5), solver=solver, name="good")
    z_good = good(x[1:])
    x_bad = x.copy()
    x_bad[0, 2] = np.nan
    layer = DEQ(DenseCell(5), solver=solver, name="bad")
    layer(x_bad[1:])
    layer.set_weights(good.get_weights())
    reset_statistics(layer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = layer(x_bad)
    found = runtime_warnings(caught)
    assert len(found) == 1
    assert "1 sample" in str(found[0].message)
    assert statistic(layer, "converged") == 0.5
    # The residual metric averages the finite samples only.
    assert statistic(layer, "fwd_residual") == pytest.approx(
        statistic(good, "fwd_residual"), rel=1e-2
    )
    # The good sample is unaffected by the bad one.
    np.testing.assert_allclose(np.asarray(z)[1:], z_good, atol=1e-6)

    if keras.backend.backend() != "jax":  # JAX refuses on_failure="raise"
        with pytest.raises(FloatingPointError):
            DEQ(DenseCell(5), solver=solver, on_failure="raise")(x_bad)


def test_nan_input_whole_batch():
    layer = DEQ(DenseCell(5))
    x = np.full((3, 5), np.nan, "float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x)
    assert len(runtime_warnings(caught)) == 1
    assert statistic(layer, "converged") == 0


# ------------------------------------------------------ 11. Jacobian regularization
def orthogonal_linear_layer(**kwargs):
    cell = DenseCell(
        8, activation="linear", kernel_initializer=keras.initializers.Orthogonal(0.5, seed=0)
    )
    return DEQ(cell, seed=0, name="deq", **kwargs)


def test_jacobian_loss_only_in_training():
    x = data(features=8)
    layer = orthogonal_linear_layer(jacobian_weight=1.0, jacobian_probes=64)
    layer(x, training=True)
    assert len(layer.losses) == 1
    # ||W||_F^2 / d = 0.25 for W = 0.5 * orthogonal; Hutchinson with 64 probes.
    assert abs(float(layer.losses[0]) - 0.25) < 0.04
    assert abs(statistic(layer, "jac_loss") - float(layer.losses[0])) < 1e-6
    layer(x, training=False)
    assert layer.losses == []
    layer(x)
    assert layer.losses == []
    model = keras.Sequential([keras.Input((8,)), layer])
    model(x, training=True)
    assert len(model.losses) == 1 and float(model.losses[0]) > 0.1
    model(x, training=False)
    assert model.losses == []


def test_jacobian_estimate_is_reproducible_with_a_seed():
    x = data(features=8)
    first = DEQ(DenseCell(8, activation="relu"), jacobian_weight=1.0, seed=5)
    second = DEQ(DenseCell(8, activation="relu"), jacobian_weight=1.0, seed=5)
    third = DEQ(DenseCell(8, activation="relu"), jacobian_weight=1.0, seed=6)
    first(x)
    for layer in (second, third):
        layer(x)
        layer.set_weights(first.get_weights())
    values = []
    for layer in (first, second, third):
        layer(x, training=True)
        values.append(float(layer.losses[0]))
    assert values[0] == values[1]
    assert values[0] != values[2]


def penalty_gradients(layer, x, variables):
    """The gradients of the layer's losses in a training call (its Jacobian penalty)."""
    return layer_gradients(layer, x, lambda out, losses: sum(losses), variables, True)[1:]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_jacobian_loss_with_list_state(dtype):
    layer = DEQ(
        TwoStateCell(dtype=dtype),
        state_shape=[(3,), (4,)],
        dtype=dtype,
        jacobian_weight=1.0,
        jacobian_probes=8,
    )
    x = ops.convert_to_tensor(np.random.default_rng(0).normal(size=(4, 5)), dtype)
    layer(x, training=True)
    assert float(sum(layer.losses)) > 0
    grads = penalty_gradients(layer, x, layer.cell.trainable_variables)
    assert len(grads) == 3
    assert all(g is not None and float(np.max(np.abs(g))) > 0 for g in grads)


def test_jacobian_loss_is_differentiable_with_respect_to_the_cell():
    x = data(features=8)
    layer = orthogonal_linear_layer(jacobian_weight=1.0)
    layer.build(x.shape)
    (grad,) = penalty_gradients(layer, x, [layer.cell.kernel])
    assert grad is not None and float(np.max(np.abs(grad))) > 0


def test_jacobian_weight_zero_adds_nothing():
    layer = orthogonal_linear_layer()
    layer(data(features=8), training=True)
    assert sum(float(v) for v in layer.losses) == 0
    assert statistic(layer, "jac_loss") == 0


def jacobian_model(weight):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8,)), orthogonal_linear_layer(jacobian_weight=weight, jacobian_probes=4)]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=False)
    return model


def test_jacobian_loss_in_training_step_and_weight_change_after_build():
    x = data(batch=8, features=8)
    y = data(batch=8, features=8, seed=1)
    model = jacobian_model(0.1)
    layer = model.layers[0]
    base = np.mean(np.asarray(keras.losses.mean_squared_error(y, model.predict(x, verbose=0))))
    base = float(base)

    logs = model.train_on_batch(x, y, return_dict=True)
    jac = logged(layer, logs, "jac_loss")
    assert jac > 0
    assert logs["loss"] == pytest.approx(base + 0.1 * jac, rel=1e-4)

    layer.jacobian_weight = 0.5
    assert float(layer.jacobian_weight) == 0.5
    logs = model.train_on_batch(x, y, return_dict=True)
    jac = logged(layer, logs, "jac_loss")
    assert logs["loss"] == pytest.approx(base + 0.5 * jac, rel=1e-4)

    layer.jacobian_weight = 0.0
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["loss"] == pytest.approx(base, rel=1e-5)

    # Never in inference.
    layer.jacobian_weight = 0.5
    evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
    assert evaluated["loss"] == pytest.approx(base, rel=1e-5)
    # (On JAX the statistic is the last estimate applied: still the second step's.)
    assert logged(layer, evaluated, "jac_loss") == (0 if LAYER_METRICS else jac)


def test_jacobian_weight_enabled_after_build_from_zero():
    x = data(batch=8, features=8)
    y = data(batch=8, features=8, seed=1)
    model = jacobian_model(0.0)
    layer = model.layers[0]
    base = model.train_on_batch(x, y, return_dict=True)
    assert logged(layer, base, "jac_loss") == 0
    layer(x, training=True)
    assert sum(float(v) for v in layer.losses) == 0
    with pytest.warns(UserWarning, match="make_train_function"):
        layer.jacobian_weight = 0.5
    # Eagerly it applies at once.
    layer(x, training=True)
    assert float(sum(layer.losses)) > 0.05
    # A compiled model applies it once the train function is traced again.
    model.make_train_function(force=True)
    logs = model.train_on_batch(x, y, return_dict=True)
    jac = logged(layer, logs, "jac_loss")
    assert jac > 0.1
    assert logs["loss"] == pytest.approx(base["loss"] + 0.5 * jac, rel=1e-4)


def test_jacobian_loss_makes_fit_loss_larger():
    x = data(batch=8, features=8)
    y = data(batch=8, features=8, seed=1)
    plain_model, regularized_model = jacobian_model(0.0), jacobian_model(1.0)
    plain = plain_model.fit(x, y, epochs=1, verbose=0).history
    regularized = regularized_model.fit(x, y, epochs=1, verbose=0).history
    assert regularized["loss"][0] > plain["loss"][0] + 0.1
    assert np.min(logged(regularized_model.layers[0], regularized, "jac_loss")) > 0.1
    assert np.max(logged(plain_model.layers[0], plain, "jac_loss")) == 0


def test_jacobian_frequency_setter_after_build():
    layer = orthogonal_linear_layer(jacobian_weight=1.0)
    x = data(features=8)
    layer(x, training=True)
    layer.jacobian_frequency = 1e-9  # (0, 1]: almost never applied
    assert float(layer.jacobian_frequency) == pytest.approx(1e-9)
    for m in layer.metrics:
        m.reset_state()
    for _ in range(3):
        layer(x, training=True)
        assert sum(float(v) for v in layer.losses) == 0
    with pytest.raises(ValueError, match="jacobian_frequency"):
        layer.jacobian_frequency = 0.0
    with pytest.raises(ValueError, match="jacobian_weight"):
        layer.jacobian_weight = -1.0


# ---------------------------------------------------------------------- 7. config
FULL_OPTIONS = {
    "solver": "broyden",
    "max_iter": 17,
    "tol": 1e-5,
    "stop_mode": "abs",
    "solver_options": {"memory": 7},
    "backward": keras_deq.backward.serialize(keras_deq.backward.Phantom(steps=3, damping=0.8)),
    "backward_solver": "fixed_point",
    "backward_max_iter": 11,
    "backward_tol": 1e-3,
    "backward_solver_options": {"damping": 0.7},
    "jacobian_weight": 0.2,
    "jacobian_frequency": 0.5,
    "jacobian_probes": 2,
    "state_shape": (7,),
    "on_failure": "ignore",
    "seed": 4,
}


def test_get_config_has_every_argument():
    layer = DEQ(DenseCell(7, activation="relu"), name="full", **FULL_OPTIONS)
    config = layer.get_config()
    for key, value in FULL_OPTIONS.items():
        assert config[key] == value, key
    assert config["name"] == "full"


def test_config_round_trip_including_the_cell():
    layer = DEQ(DenseCell(7, activation="relu"), name="full", **FULL_OPTIONS)
    config = layer.get_config()
    clone = DEQ.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.cell, DenseCell)
    assert clone.cell is not layer.cell
    assert clone.cell.get_config() == layer.cell.get_config()

    # Through JSON, as in a `.keras` file: tuples come back as lists.
    as_json = json.loads(json.dumps(config))
    clone = DEQ.from_config(as_json)
    assert clone.state_shape == (7,)
    assert json.loads(json.dumps(clone.get_config())) == as_json


def test_config_round_trip_with_list_state_and_serializer():
    layer = DEQ(TwoStateCell(), state_shape=[(3,), (4,)], name="two")
    payload = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    clone = keras.saving.deserialize_keras_object(payload)
    assert isinstance(clone, DEQ)
    assert isinstance(clone.cell, TwoStateCell)
    assert clone.state_shape == [(3,), (4,)]
    x = data(features=5)
    out, clone_out = layer(x), clone(x)
    clone.set_weights(layer.get_weights())
    for a, b in zip(layer(x), clone(x), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert len(out) == len(clone_out) == 2


def test_config_reflects_weight_changed_after_build():
    layer = DEQ(DenseCell(5), jacobian_weight=0.1)
    layer(data())
    layer.jacobian_weight = 0.7
    assert layer.get_config()["jacobian_weight"] == pytest.approx(0.7)


# -------------------------------------------------------------------- 7. saving
def saving_model():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6),
            DEQ(
                DenseCell(7, activation="tanh"),
                state_shape=(7,),
                solver="anderson",
                solver_options={"window": 3},
                tol=1e-5,
                jacobian_weight=0.1,
                name="deq",
            ),
            keras.layers.Dense(2),
        ]
    )


def test_keras_file_round_trip(tmp_path):
    model = saving_model()
    x = data(batch=6, features=5)
    model.get_layer("deq").jacobian_weight = 0.3
    expected = model.predict(x, verbose=0)
    path = tmp_path / "deq.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6)
    layer = loaded.get_layer("deq")
    assert isinstance(layer, DEQ) and isinstance(layer.cell, DenseCell)
    assert layer.solver_options == {"window": 3}
    assert layer.tol == 1e-5 and layer.state_shape == (7,)
    assert float(layer.jacobian_weight) == pytest.approx(0.3)


def test_keras_file_round_trip_functional_list_state(tmp_path):
    inputs = keras.Input((5,))
    a, b = DEQ(TwoStateCell(), state_shape=[(3,), (4,)], name="two")(inputs)
    outputs = keras.layers.Concatenate()([a, b])
    model = keras.Model(inputs, outputs)
    x = data(batch=6, features=5)
    expected = model.predict(x, verbose=0)
    path = tmp_path / "two.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6)
    assert loaded.get_layer("two").state_shape == [(3,), (4,)]


def test_keras_file_round_trip_two_inputs(tmp_path):
    x1, x2 = keras.Input((5,)), keras.Input((5,))
    z = DEQ(TwoInputCell(), state_shape=(5,), name="two_in")([x1, x2])
    model = keras.Model([x1, x2], keras.layers.Dense(2)(z))
    inputs = [data(batch=6, features=5), data(batch=6, features=5, seed=1)]
    expected = model.predict(inputs, verbose=0)
    path = tmp_path / "two_in.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(inputs, verbose=0), expected, rtol=1e-6, atol=1e-6)


def test_save_weights_restores_into_a_fresh_model(tmp_path):
    model = saving_model()
    x = data(batch=6, features=5)
    model.get_layer("deq").jacobian_weight = 0.3
    expected = model.predict(x, verbose=0)
    path = tmp_path / "deq.weights.h5"
    model.save_weights(path)

    keras.utils.set_random_seed(99)
    fresh = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6),
            DEQ(DenseCell(7), state_shape=(7,), solver_options={"window": 3}, tol=1e-5, name="deq"),
            keras.layers.Dense(2),
        ]
    )
    assert not np.allclose(fresh.predict(x, verbose=0), expected, atol=1e-3)
    fresh.load_weights(path)
    np.testing.assert_allclose(fresh.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6)
    assert float(fresh.get_layer("deq").jacobian_weight) == pytest.approx(0.3)


def test_top_level_exports():
    assert keras_deq.DEQ is DEQ
    assert keras_deq.layers.DEQ is DEQ


# ------------------------------------------------------------ solver_batch_dims
def test_solver_batch_dims_solves_each_position_like_a_batch_of_positions():
    """A per-position cell (Dense on the last axis) solved with solver_batch_dims=2
    equals the same cell solved on the positions flattened into the batch."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(3, 5, 4)).astype("float32")
    cell = keras_deq.DenseCell(4)
    per_position = keras_deq.DEQ(cell, solver="anderson", tol=1e-6, solver_batch_dims=2)
    flat = keras_deq.DEQ(cell, solver="anderson", tol=1e-6)
    out = np.asarray(per_position(x))
    ref = np.asarray(flat(x.reshape(15, 4))).reshape(3, 5, 4)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    # Statistics are per position: 15 entries, all converged.
    assert statistic(per_position, "converged") == 1.0
    config = per_position.get_config()
    assert config["solver_batch_dims"] == 2
    assert keras_deq.DEQ.from_config(config).solver_batch_dims == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_solver_batch_dims_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="solver_batch_dims"):
        keras_deq.DEQ(keras_deq.DenseCell(4), solver_batch_dims=bad)


def test_solver_batch_dims_needs_a_single_tensor_state_with_enough_axes():
    layer = keras_deq.DEQ(keras_deq.DenseCell(4), solver_batch_dims=2)
    with pytest.raises(ValueError, match="solver_batch_dims"):
        layer(np.zeros((2, 4), "float32"))


# ------------------------------------------------ issue 12: shared cells, dict inputs
def test_two_deq_layers_sharing_one_cell_round_trip_through_keras_file(tmp_path):
    # Before: saved without complaint, and loading failed with "Layer 'dense_cell'
    # expected 3 variables, but received 0".
    cell = keras_deq.DenseCell(6)
    inputs = keras.Input((6,))
    hidden = keras_deq.DEQ(cell, name="deq_a")(inputs)
    outputs = keras_deq.DEQ(cell, name="deq_b")(keras.layers.Dense(6)(hidden))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    model.compile("adam", "mse")
    model.fit(x, x, epochs=1, verbose=0)  # weights away from their initial values
    path = tmp_path / "shared.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    deqs = [layer for layer in loaded.layers if isinstance(layer, keras_deq.DEQ)]
    assert deqs[0].cell is deqs[1].cell
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6, atol=1e-6)
    for got, want in zip(deqs[0].cell.weights, cell.weights, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


@keras.saving.register_keras_serializable(package="test_deq")
class DictInjectionCell(keras.layers.Layer):
    """`tanh(z W + x["a"] U_a + x["b"] U_b)`: a cell whose injection is a dict."""

    def build(self, z_shape, x_shape):
        width = z_shape[-1]
        self.w = self.add_weight(
            shape=(width, width), initializer=keras.initializers.Orthogonal(0.5, seed=0)
        )
        self.u_a = self.add_weight(shape=(x_shape["a"][-1], width), initializer="glorot_uniform")
        self.u_b = self.add_weight(shape=(x_shape["b"][-1], width), initializer="glorot_uniform")

    def call(self, z, x):
        return keras.ops.tanh(z @ self.w + x["a"] @ self.u_a + x["b"] @ self.u_b)


def _dict_batch(batch=8):
    rng = np.random.default_rng(3)
    return {
        "a": rng.normal(size=(batch, 6)).astype("float32"),
        "b": rng.normal(size=(batch, 3)).astype("float32"),
    }


def test_dict_inputs_need_a_state_shape():
    # Before: build failed with "Cannot convert '('a', 6)' to a shape".
    with pytest.raises(ValueError, match="pass `state_shape=`"):
        DEQ(DictInjectionCell())(_dict_batch())


def test_dict_inputs_solve_and_differentiate_like_the_unrolled_reference(tmp_path):
    x = _dict_batch()
    layer = DEQ(DictInjectionCell(), state_shape=(4,), tol=1e-7, max_iter=100)
    # Autodiff through plain fixed-point steps: a reference that shares no solver
    # bookkeeping with the implicit gradient (unrolled Anderson differentiates its mixing
    # weights too, which in float32 is noisier than this tolerance).
    reference = DEQ(
        layer.cell,
        state_shape=(4,),
        solver="fixed_point",
        tol=1e-7,
        max_iter=300,
        backward="unrolled",
    )
    layer(x), reference(x)  # built before the gradients
    grads = []
    for deq in (layer, reference):

        def loss(out):
            return ops.sum(ops.sin(out))

        grad_x, *grad_w = layer_gradients(deq, x, loss, layer.cell.trainable_variables)
        grads.append([grad_x["a"], grad_x["b"], *grad_w])
    z = np.asarray(layer(x))
    w, u_a, u_b = (v.numpy() for v in layer.cell.weights)
    np.testing.assert_allclose(z, np.tanh(z @ w + x["a"] @ u_a + x["b"] @ u_b), atol=1e-5)
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    inputs = {"a": keras.Input((6,), name="a"), "b": keras.Input((3,), name="b")}
    model = keras.Model(inputs, DEQ(DictInjectionCell(), state_shape=(4,))(inputs))
    model.save(tmp_path / "dict.keras")
    loaded = keras.models.load_model(tmp_path / "dict.keras")
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6, atol=1e-6)


# -------------------------------------------- core v2: solver objects in the layer
def test_solver_object_gives_the_same_equilibrium_and_gradient_as_the_name(tmp_path):
    x = ops.convert_to_tensor(np.random.default_rng(5).normal(size=(4, 6)), "float32")
    by_name = DEQ(
        DenseCell(6), solver="anderson", max_iter=40, tol=1e-6, solver_options={"window": 3}
    )
    by_object = DEQ(
        by_name.cell, solver=keras_deq.solvers.Anderson(max_iter=40, tol=1e-6, window=3)
    )
    results = []
    for layer in (by_name, by_object):
        out = layer(x)  # (and builds the layer)
        loss = lambda out: ops.sum(ops.sin(out))  # noqa: E731
        grads = layer_gradients(layer, x, loss, layer.cell.trainable_variables)[1:]
        results.append([out, *grads])
    for got, want in zip(*results, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert by_object.max_iter == 40 and by_object._adjoint.window == 3
    model = keras.Sequential([keras.Input((6,)), by_object])
    model.save(tmp_path / "object.keras")
    loaded = keras.models.load_model(tmp_path / "object.keras")
    restored = loaded.layers[-1]
    assert isinstance(restored._forward, keras_deq.solvers.Anderson)
    assert restored._forward.get_config() == by_object._forward.get_config()
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


def test_solver_object_with_options_or_a_bad_solver_is_refused():
    with pytest.raises(ValueError, match="solver_options` apply to a solver given by name"):
        DEQ(DenseCell(4), solver=keras_deq.solvers.Anderson(), solver_options={"window": 2})
    with pytest.raises(ValueError, match="Received: solver="):
        DEQ(DenseCell(4), solver={"class_name": "Newton", "config": {}})


def test_pcdeq_accepts_a_fixed_point_object_and_refuses_others():
    layer = keras_deq.PcDEQ(units=4, solver=keras_deq.solvers.FixedPoint(damping=0.5))
    assert layer(np.ones((2, 4), "float32")).shape == (2, 4)
    with pytest.raises(ValueError, match="solver='fixed_point'"):
        keras_deq.PcDEQ(units=4, solver=keras_deq.solvers.Broyden())
