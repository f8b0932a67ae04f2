"""Failure injection: cells that produce NaN or Inf in the middle of a solve.

Each test injects a failure for known samples and checks, against an independent
computation, what the solvers and the `DEQ` layer do with it:

- the solver returns, for a failed sample, the best *finite* iterate seen before the
  failure (recomputed here with numpy reference implementations of the three
  solvers, run on the finite map up to the failing evaluation), with its true
  residual, and `converged` is False for the failed samples only;
- the layer warns once (`on_failure="warn"`), raises (`"raise"`) eagerly and in
  `fit`, and its `{name}_converged` metric counts the failures;
- training does not write NaN into the weights;
- Anderson survives an exactly singular least-squares system with `ridge=0`.

Six bugs this file found were fixed in the library (each test here failed before):
NaN iterates fed back to the cell in unrolled mode and phantom steps walking into the
NaN region (the solvers now freeze a failed sample at its best finite iterate), a
sample with no finite iterate poisoning the implicit gradient (it is now left out),
`on_failure="raise"` in `fit` arriving after the step's update and as an UnknownError
(it is now an assertion the output depends on), and a warning that did not name a
mid-solve NaN.
"""

import warnings

import keras
import numpy as np
import pytest
from deq_statistics import EpochStatistic, logged, reset_statistics, statistic
from feature_references import FLOAT_DTYPES, layer_gradients
from keras import ops

from keras_deq import DEQ, DenseCell, solvers
from tests.solvers.helpers import anderson_np, compiled, relative_np

SOLVERS = ("anderson", "broyden", "fixed_point")


# ------------------------------------------------------ numpy reference solvers
def rel_residual(f_np, z):
    fz = f_np(z)
    return relative_np(np.linalg.norm(fz - z, axis=1), np.linalg.norm(fz, axis=1))


def picard_iterates(f_np, z0, count):
    zs = [np.asarray(z0, np.float64)]
    while len(zs) < count:
        zs.append(f_np(zs[-1]))
    return zs


def anderson_iterates(f_np, z0, count, window=5, ridge=1e-4):
    """Anderson type II, per sample, as documented (beta = 1); z_0 .. z_{count-1}."""
    return anderson_np(f_np, z0, count - 1, window, 1.0, ridge)


def broyden_iterates(f_np, z0, count):
    """Good Broyden from H = -I with explicit rank-one terms (memory not reached)."""

    def dot(a, b):
        return np.sum(a * b, axis=1, keepdims=True)

    def h(x):
        return -x + sum(u * dot(v, x) for u, v in zip(us, vs, strict=True))

    def h_t(x):
        return -x + sum(v * dot(u, x) for u, v in zip(us, vs, strict=True))

    z = np.asarray(z0, np.float64)
    g = f_np(z) - z
    us, vs, zs = [], [], [z]
    while len(zs) < count:
        s = -h(g)
        z = z + s
        g_new = f_np(z) - z
        v = h_t(s)
        denom = dot(v, g_new - g)
        ok = np.abs(denom) > 1e-20  # as documented: a zero secant denominator is skipped
        us.append(np.where(ok, (s - h(g_new - g)) / np.where(ok, denom, 1.0), 0.0))
        vs.append(v)
        g = g_new
        zs.append(z)
    return zs


ITERATES = {
    "fixed_point": picard_iterates,
    "anderson": anderson_iterates,
    "broyden": broyden_iterates,
}


def best_before(f_np, zs, first_bad):
    """Per sample, the lowest-absolute-residual iterate among zs[:first_bad[b]]: the
    ones whose evaluation was finite. Returns (states, rel residuals)."""
    zs = np.stack(zs)  # (iterates, batch, n)
    rel = np.stack([rel_residual(f_np, z) for z in zs])  # (iterates, batch)
    res = np.stack([np.linalg.norm(f_np(z) - z, axis=1) for z in zs])
    index = np.arange(len(zs))[:, None]
    res = np.where(index < np.asarray(first_bad)[None, :], res, np.inf)
    best = np.argmin(res, axis=0)
    batch = np.arange(zs.shape[1])
    return zs[best, batch], rel[best, batch]


def runtime_warnings(caught):
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


ON_JAX_RAISE_IS_REFUSED = (
    "on_failure='raise' is refused on JAX (no sound way to stop a compiled step); "
    "tests/jax checks the refusal"
)


# ====================================================== 1. solvers: NaN after k calls
BATCH, N, K = 4, 4, 4
BAD = np.array([False, True, False, True])


def _linear_problem(seed=5):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((N, N))
    a = 0.6 * m / np.linalg.norm(m, 2)
    c = rng.standard_normal((BATCH, N))
    exact = np.linalg.solve((np.eye(N) - a).T, c.T).T
    return a, c, exact


@pytest.mark.tensorflow_only(
    "the map counts its calls in a tf.Variable inside the solver loop, which a JAX loop "
    "traces once; the layer tests below inject the failure by value, on every backend"
)
@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("run_as", ["eager", "graph"])
def test_solver_returns_best_finite_iterate_when_cell_fails_after_k_calls(name, bad_value, run_as):
    import tensorflow as tf

    # f(z) = z A + c row by row (a contraction). Samples 1 and 3 get `bad_value` from
    # the (K+1)-th evaluation on; the others converge to the exact solution.
    a, c, exact = _linear_problem()
    calls = tf.Variable(0)
    bad = tf.constant(BAD[:, None])

    def f(z):
        calls.assign_add(1)
        fz = tf.matmul(z, tf.constant(a)) + tf.constant(c)
        broken = tf.logical_and(bad, calls > K)
        return tf.where(broken, tf.constant(bad_value, tf.float64), fz)

    def run(z0):
        return solvers.get(name)(f, z0, max_iter=80, tol=1e-10)

    if run_as == "graph":
        run = tf.function(run)
    result = run(tf.zeros([BATCH, N], tf.float64))
    state = result.state.numpy()

    def f_np(z):
        return z @ a + c

    # Evaluation j + 1 measures iterate z_j, so z_0 .. z_{K-1} are the finite ones.
    zs = ITERATES[name](f_np, np.zeros((BATCH, N)), K + 1)
    want, want_res = best_before(f_np, zs, [K] * BATCH)

    assert np.all(np.isfinite(state))
    np.testing.assert_array_equal(result.converged.numpy(), ~BAD)
    np.testing.assert_allclose(state[BAD], want[BAD], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.rel_residual.numpy()[BAD], want_res[BAD], rtol=1e-9)
    # Not vacuous: the failure came before convergence (reference residual > tol).
    assert np.all(want_res[BAD] > 1e-3)
    # The good samples are unaffected: the exact solution.
    np.testing.assert_allclose(state[~BAD], exact[~BAD], atol=1e-8)
    assert int(result.steps) == int(calls.numpy()) > K


# ============================================= 2. the DEQ layer: NaN beyond a threshold
class ThresholdCell(keras.layers.Layer):
    """`z W + x U + b` (W = 0.5 I, U = I, b = 0 initially), NaN for a sample as soon as
    some entry of its state exceeds `limit` in absolute value. With x = 0.3 the fixed
    point is 0.6 (reached); with x = 1 it is 2, beyond the limit 1.5."""

    def __init__(self, units=3, limit=1.5, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.limit = limit

    def build(self, z_shape, x_shape):
        self.w = self.add_weight(
            name="w", shape=(self.units, self.units), initializer=keras.initializers.Identity(0.5)
        )
        self.u = self.add_weight(
            name="u", shape=(x_shape[-1], self.units), initializer=keras.initializers.Identity()
        )
        self.b = self.add_weight(name="b", shape=(self.units,), initializer="zeros")

    def call(self, z, x):
        lin = keras.ops.matmul(z, self.w) + keras.ops.matmul(x, self.u) + self.b
        blown = keras.ops.any(keras.ops.abs(z) > self.limit, axis=-1, keepdims=True)
        return keras.ops.where(blown, float("nan"), lin)


LIMIT = 1.5
LAYER_BAD = np.array([False, True, False, False, True, False])


def layer_input(bad=LAYER_BAD):
    x = np.full((len(bad), 3), 0.3, "float32")
    x[bad] = 1.0
    return x


def threshold_reference(name, x):
    """Best finite iterate of the failed samples, by the numpy reference solvers on
    the finite map 0.5 z + x, cut at the first iterate beyond the limit."""

    def f_np(z):
        return 0.5 * z + x

    zs = ITERATES[name](f_np, np.zeros(x.shape), 12)
    beyond = [np.any(np.abs(z) > LIMIT, axis=1) for z in zs]
    first_bad = [next((j for j, b in enumerate(beyond) if b[s]), len(zs)) for s in range(len(x))]
    return best_before(f_np, zs, first_bad)


def threshold_layer(name, **kwargs):
    options = {"solver": name, "max_iter": 30, "tol": 1e-5, "name": "deq"}
    return DEQ(ThresholdCell(), **{**options, **kwargs})


@pytest.mark.parametrize("name", SOLVERS)
def test_layer_returns_best_finite_iterate_and_warns_once(name):
    x = layer_input()
    layer = threshold_layer(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = np.asarray(layer(x))
        z_again = np.asarray(layer(x, training=True))
    found = runtime_warnings(caught)
    assert len(found) == 1, [str(w.message) for w in found]
    assert "2 sample(s)" in str(found[0].message) and "'deq'" in str(found[0].message)

    want, want_res = threshold_reference(name, x.astype(np.float64))
    assert np.all(np.isfinite(z))
    np.testing.assert_allclose(z[LAYER_BAD], want[LAYER_BAD], rtol=1e-5)
    assert np.all(np.abs(z[LAYER_BAD]) <= LIMIT)  # a real, finite-valued iterate
    np.testing.assert_allclose(z[~LAYER_BAD], 0.6, atol=1e-5)  # the exact fixed point 2x
    np.testing.assert_array_equal(z_again, z)
    # Metrics over the two calls (JAX: the last call): 4 of 6 samples converged; the
    # residual averages the finite residuals (the failed samples' best iterates count).
    assert statistic(layer, "converged") == pytest.approx(4 / 6)
    expected_res = np.mean(np.where(LAYER_BAD, want_res, 0.0))
    assert statistic(layer, "fwd_residual") == pytest.approx(expected_res, rel=1e-3, abs=1e-5)


@pytest.mark.tensorflow_only(ON_JAX_RAISE_IS_REFUSED)
@pytest.mark.parametrize("name", SOLVERS)
def test_layer_raises_eagerly(name):
    with pytest.raises(FloatingPointError, match="2 sample"):
        threshold_layer(name, on_failure="raise")(layer_input())


def test_layer_ignore_is_silent_but_measured():
    layer = threshold_layer("anderson", on_failure="ignore")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(layer_input())
    assert not runtime_warnings(caught)
    assert statistic(layer, "converged") == pytest.approx(4 / 6)


def test_warning_names_the_nan_of_a_mid_solve_failure():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threshold_layer("fixed_point")(layer_input())
    assert "NaN" in str(runtime_warnings(caught)[0].message)


# --------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", SOLVERS)
def test_implicit_gradient_after_a_failure_is_finite_and_is_the_ift_gradient(name):
    # For the linear cell, J = W = 0.5 I, so the adjoint is u = (I - W^T)^{-1} dL/dz =
    # 2 dL/dz, and the implicit gradient at the returned state z is dW = z^T u,
    # dU = x^T u, db = sum u -- also for the failed samples (their best iterate
    # lies where the cell is finite).
    x = layer_input()
    layer = threshold_layer(name, on_failure="ignore", backward_tol=1e-7)
    z = layer(x, training=True)
    cell = layer.cell
    grads = layer_gradients(layer, x, lambda z: ops.sum(z**2), [cell.w, cell.u, cell.b])[1:]
    z = np.asarray(z, np.float64)
    u = 2.0 * (2.0 * z)
    want = [z.T @ u, x.T.astype(np.float64) @ u, u.sum(axis=0)]
    for got, ref in zip(grads, want, strict=True):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backward", ["implicit", "one_step", "phantom", "unrolled"])
@pytest.mark.parametrize("name", SOLVERS)
def test_training_output_and_gradients_are_finite_after_a_failure(name, backward):
    layer = threshold_layer(name, backward=backward, on_failure="ignore")
    z = layer(layer_input(), training=True)
    loss = lambda z: ops.sum(z**2)  # noqa: E731
    grads = layer_gradients(layer, layer_input(), loss, layer.trainable_variables)[1:]
    assert np.all(np.isfinite(np.asarray(z)))
    assert all(np.all(np.isfinite(g)) for g in grads)


# The head's initial kernel, the same on every backend (their random initializers
# differ), so that the training trajectory checked below is the same too.
INIT = keras.initializers.Constant(0.3)


def _fit_model(name, **deq_kwargs):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            threshold_layer(name, **deq_kwargs),
            keras.layers.Dense(1, kernel_initializer=INIT),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=False)
    return model


def _fit_data():
    bad = np.zeros(16, bool)
    bad[[1, 6, 9, 14]] = True
    x = layer_input(bad)
    y = np.random.default_rng(0).normal(size=(16, 1)).astype("float32")
    return x, y


@pytest.mark.parametrize("name", SOLVERS)
def test_fit_with_failing_samples_warns_once_reports_and_keeps_weights_finite(name):
    # With the Jacobian regularizer on, evaluated at the failed samples' best iterates.
    x, y = _fit_data()
    model = _fit_model(name, jacobian_weight=0.1)
    layer = model.get_layer("deq")
    cell = layer.cell
    before = cell.w.numpy().copy()
    converged, jac = EpochStatistic(layer, "converged"), EpochStatistic(layer, "jac_loss")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[converged, jac]
        ).history
    found = runtime_warnings(caught)
    assert len(found) == 1, [str(w.message) for w in found]
    assert "'deq'" in str(found[0].message)
    # 4 of 16 samples fail in the first epoch (2 per batch; the weights move little in
    # one step); training may bring a failed sample back later, never all of them.
    assert converged.values[0] == 0.75
    assert 0.75 <= converged.values[1] < 1.0
    assert all(np.isfinite(history["loss"]))
    assert all(np.isfinite(jac.values)) and jac.values[0] > 0
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert not np.allclose(cell.w.numpy(), before)  # the cell was trained


@pytest.fixture(scope="module")
def raised_in_fit():
    x, y = _fit_data()
    model = _fit_model("anderson", on_failure="raise")
    before = [v.numpy().copy() for v in model.trainable_variables]
    try:
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    except Exception as error:  # noqa: BLE001 - the type is what is tested
        return {"error": error, "model": model, "before": before}
    pytest.fail("fit did not raise")


@pytest.mark.tensorflow_only(ON_JAX_RAISE_IS_REFUSED)
def test_fit_raise_stops_training_with_the_layer_message(raised_in_fit):
    import tensorflow as tf

    error = raised_in_fit["error"]
    # Inside a compiled step the layer raises through a TensorFlow assertion.
    assert isinstance(error, tf.errors.InvalidArgumentError)
    message = error.message
    assert "DEQ layer deq (on_failure=raise)" in message, message
    assert "did not reach tol" in message and "NaN or Inf" in message


@pytest.mark.tensorflow_only(ON_JAX_RAISE_IS_REFUSED)
def test_fit_raise_leaves_the_weights_of_the_failing_step_unchanged(raised_in_fit):
    # No weight moves. (Keras increments `optimizer.iterations` without a data
    # dependency on the gradients, so the counter itself may have advanced.)
    model = raised_in_fit["model"]
    for got, want in zip(model.trainable_variables, raised_in_fit["before"], strict=True):
        np.testing.assert_array_equal(got.numpy(), want)


# ====================================== 3. samples that never produce a finite iterate
class SqrtCell(DenseCell):
    """A DenseCell scaled by sqrt(1 - x_0^2): NaN at every state when |x_0| > 1."""

    def call(self, z, x):
        return super().call(z, x) * keras.ops.sqrt(1.0 - keras.ops.square(x[:, :1]))


def _never_finite_case(cause):
    rng = np.random.default_rng(3)
    x = rng.uniform(-0.5, 0.5, size=(5, 3)).astype("float32")
    if cause == "nan_input":
        x[2, 1] = np.nan
    else:
        x[2, 0] = 2.0  # finite input, the cell is NaN for this sample
    cell_class = DenseCell if cause == "nan_input" else SqrtCell
    cell = cell_class(3, kernel_initializer=keras.initializers.Orthogonal(0.5, seed=1))
    layer = DEQ(cell, solver="anderson", tol=1e-6, max_iter=40, on_failure="ignore")
    layer(x[:1])  # build
    reset_statistics(layer)
    return layer, x


@pytest.mark.parametrize("cause", ["nan_input", "cell_nan_at_every_state"])
def test_never_finite_sample_returns_z0_and_is_reported(cause):
    layer, x = _never_finite_case(cause)
    z = np.asarray(layer(x))
    assert statistic(layer, "converged") == pytest.approx(4 / 5)
    np.testing.assert_array_equal(z[2], 0.0)  # z0
    good = [0, 1, 3, 4]
    np.testing.assert_allclose(z[good], np.asarray(layer(x[good])), atol=1e-6)
    if keras.backend.backend() != "jax":  # the metric's mean over both calls
        assert statistic(layer, "converged") == pytest.approx((4 + 4) / (5 + 4))


@pytest.mark.parametrize("cause", ["nan_input", "cell_nan_at_every_state"])
def test_never_finite_sample_does_not_poison_the_gradient(cause):
    # The failed sample's output is the constant z0: it contributes nothing to the
    # gradient, which must be the gradient of the other samples alone.
    layer, x = _never_finite_case(cause)
    good = [0, 1, 3, 4]

    def grads(inputs):
        loss = lambda z: ops.sum(z**2)  # noqa: E731
        return layer_gradients(layer, inputs, loss, layer.trainable_variables)[1:]

    for got, want in zip(grads(x), grads(x[good]), strict=True):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_fit_with_a_nan_input_sample_keeps_weights_finite():
    layer, x = _never_finite_case("nan_input")
    model = keras.Sequential([keras.Input((3,)), layer, keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=False)
    history = model.fit(x, np.zeros((5, 1)), batch_size=5, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])  # holds: the failed sample returns z0
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


@pytest.mark.parametrize("name", SOLVERS)
def test_inf_input_entries(name):
    # A linear cell passes Inf through: the sample never has a finite iterate, is not
    # converged and returns z0. A tanh cell saturates at +-1: a finite fixed point,
    # rightly converged (no false alarm). The other samples are unaffected.
    x = np.random.default_rng(4).uniform(-0.5, 0.5, size=(4, 3)).astype("float32")
    x[1, 2] = np.inf
    x[3, 0] = -np.inf
    ident = keras.initializers.Identity(0.5)
    linear = DEQ(
        DenseCell(3, "linear", use_injection=False, kernel_initializer=ident),
        solver=name,
        tol=1e-6,
        max_iter=60,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = np.asarray(linear(x))
    found = runtime_warnings(caught)
    assert len(found) == 1 and "NaN or Inf" in str(found[0].message)
    np.testing.assert_array_equal(z[[1, 3]], 0.0)
    np.testing.assert_allclose(z[[0, 2]], 2.0 * x[[0, 2]], rtol=1e-4, atol=1e-6)
    assert statistic(linear, "converged") == 0.5

    saturating = DEQ(
        DenseCell(3, use_injection=False, kernel_initializer=ident), solver=name, tol=1e-6
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = np.asarray(saturating(x))
    assert not runtime_warnings(caught)
    ref = np.zeros((4, 3))
    for _ in range(200):
        ref = np.tanh(0.5 * ref + x.astype(np.float64))
    np.testing.assert_allclose(z, ref, atol=1e-5)
    assert statistic(saturating, "converged") == 1.0


# ============================================== 4. Anderson: singular least squares
def _singular_batch(dtype):
    """Five samples, each a different degenerate map (n = 3):
    0: f(z) = z         (c = 0: every residual 0, an all-zero Gram matrix)
    1: f(z) = z + 1     (no fixed point, the same residual every step: rank one)
    2: f(z) = 0.5 z + 1 (all entries equal: rank-one history; fixed point 2)
    3: f(z) = tanh(z W + x), generic
    4: f(z) = b         (a constant map)
    """
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 3))
    w = 0.5 * w / np.linalg.norm(w, 2)
    xg = rng.standard_normal((1, 3))
    b = rng.standard_normal((1, 3))
    select = np.eye(5)[:, :, None]  # (map, sample, 1)

    def f(z):
        maps = [
            z,
            z + 1.0,
            0.5 * z + 1.0,
            ops.tanh(ops.matmul(z, ops.cast(w, dtype)) + ops.cast(xg, dtype)),
            ops.zeros_like(z) + ops.cast(b, dtype),
        ]
        return sum(ops.cast(s, dtype) * m for s, m in zip(select, maps, strict=True))

    ref = np.zeros((1, 3))
    for _ in range(300):
        ref = np.tanh(ref @ w + xg)
    return f, {0: 0.0, 2: 2.0, 3: ref[0], 4: b[0]}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("run_as", ["eager", "graph"])
def test_anderson_singular_least_squares_with_zero_ridge(dtype, run_as):
    f, expected = _singular_batch(dtype)
    tol = 1e-5 if dtype == "float32" else 1e-10

    def run(z0):
        return solvers.anderson(f, z0, max_iter=25, tol=tol, ridge=0.0, window=4)

    if run_as == "graph":
        run = compiled(run)
    result = run(ops.zeros([5, 3], dtype))
    state = np.asarray(result.state)
    assert np.all(np.isfinite(state))
    np.testing.assert_array_equal(np.asarray(result.converged), [True, False, True, True, True])
    atol = 1e-4 if dtype == "float32" else 1e-9
    for sample, value in expected.items():
        np.testing.assert_allclose(state[sample], np.broadcast_to(value, (3,)), atol=atol)
    # Sample 1 has residual exactly 1 in every entry, whatever the iterate.
    np.testing.assert_allclose(np.asarray(result.abs_residual)[1], np.sqrt(3.0), rtol=1e-6)
    assert int(result.steps) == 25


def test_anderson_zero_ridge_in_a_layer_with_degenerate_inputs():
    # f(z) = 0.5 z + x in a DEQ with ridge=0: x = 0 is a fixed point from the start (an
    # all-zero Gram matrix), a constant x gives a rank-one history, a random x is
    # generic. Compiled predict and evaluate: finite, exact (2x) and all converged.
    x = np.zeros((6, 4), "float32")
    x[1:3] = 0.7
    x[3:] = np.random.default_rng(2).normal(size=(3, 4))
    cell = DenseCell(
        4, "linear", use_injection=False, kernel_initializer=keras.initializers.Identity(0.5)
    )
    layer = DEQ(cell, solver_options={"ridge": 0.0}, tol=1e-6, name="deq")
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(loss="mse", jit_compile=False)
    z = model.predict(x, batch_size=6, verbose=0)
    np.testing.assert_allclose(z, 2.0 * x, rtol=1e-5, atol=1e-6)
    logs = model.evaluate(x, 2.0 * x, batch_size=6, verbose=0, return_dict=True)
    assert logged(layer, logs, "converged") == 1.0


# ============================================ issue 12: expansive cells, backward-only raise
@keras.saving.register_keras_serializable(package="test_divergence")
class ExpansiveCell(keras.layers.Layer):
    """`z W + x` with W orthogonal times `gain`: Picard diverges for gain > 1."""

    def __init__(self, gain=1.5, **kwargs):
        super().__init__(**kwargs)
        self.gain = gain

    def build(self, z_shape, x_shape):
        self.kernel = self.add_weight(
            shape=(z_shape[-1], z_shape[-1]),
            initializer=keras.initializers.Orthogonal(gain=self.gain, seed=0),
        )

    def call(self, z, x):
        return keras.ops.matmul(z, self.kernel) + x


@pytest.mark.parametrize("max_iter", [10, 60])
def test_expansive_cell_returns_the_lowest_residual_iterate_not_the_diverged_one(max_iter):
    # Before: with stop_mode="rel" the "best" iterate was the last, diverged one
    # (max |z*| 73 at max_iter=10, 9e7 at 60).
    n = 8
    x = np.random.default_rng(0).normal(size=(16, n)).astype("float32")
    layer = DEQ(ExpansiveCell(), solver="fixed_point", max_iter=max_iter, stop_mode="rel")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = np.asarray(layer(x))
    w = layer.cell.kernel.numpy().astype("float64")
    # Independent check: Picard from 0 in numpy; the abs residual ||z_k W + x - z_k|| of
    # every iterate, and the iterate the layer must return (the lowest one).
    zs = picard_iterates(lambda v: v @ w + x, np.zeros((16, n)), max_iter)
    res = np.stack([np.linalg.norm(v @ w + x - v, axis=1) for v in zs])
    want = np.stack(zs)[np.argmin(res, axis=0), np.arange(16)]
    np.testing.assert_allclose(z, want, atol=1e-5)
    assert np.abs(z).max() < 10.0
    assert statistic(layer, "converged") == 0.0
    message = str(runtime_warnings(caught)[0].message)
    assert "more iterations do not help" in message


@pytest.mark.parametrize("backward", ["implicit", "one_step"])
def test_expansive_cell_training_keeps_weights_finite(backward):
    # Before: SGD 0.01, the loss reached 1e36, the cell kernel's gradient was NaN at
    # step 2 and the kernel NaN from step 3 (issue 12). In this smaller setting the
    # loss reached 4e13 (implicit) and 5e33 (one-step), the weights 5e12 and 6e16.
    n = 8
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, n)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((n,)),
            DEQ(
                ExpansiveCell(),
                solver="fixed_point",
                max_iter=60,
                stop_mode="rel",
                on_failure="ignore",
                backward=backward,
            ),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(0.01), "mse")
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    # The target has unit variance: a loss of order 1 is what a sane model gives.
    assert np.all(np.array(history.history["loss"]) < 10.0), history.history["loss"]
    for v in model.trainable_variables:
        assert np.all(np.abs(v.numpy()) < 10.0), v.path


@pytest.mark.parametrize("backward", ["implicit", "one_step", "phantom", "unrolled"])
def test_non_finite_upstream_gradient_moves_no_weight_through_the_layer(backward):
    # A loss that overflows for some samples downstream of the layer: their rows of
    # the upstream gradient are NaN/Inf and must not reach the cell's weights.
    x = np.random.default_rng(2).normal(size=(4, 6)).astype("float32")
    layer = DEQ(DenseCell(6), backward=backward, solver="fixed_point", tol=1e-6)
    layer(x)
    scale = ops.convert_to_tensor(np.array([1.0, np.inf, 1.0, np.nan], "float32")[:, None])
    variables = layer.trainable_variables
    grads = layer_gradients(layer, x, lambda z: ops.sum(ops.square(z) * scale), variables)
    want = layer_gradients(layer, x[[0, 2]], lambda z: ops.sum(ops.square(z)), variables)
    for g, w in zip(grads[1:], want[1:], strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def _backward_raise_model(backward_max_iter, backward_tol):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8),
            DEQ(
                DenseCell(8),
                backward_max_iter=backward_max_iter,
                backward_tol=backward_tol,
                on_failure="raise",
            ),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        keras.optimizers.Adam(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    return model, rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, 32)


@pytest.mark.tensorflow_only(ON_JAX_RAISE_IS_REFUSED)
def test_fit_raise_on_a_backward_failure_moves_no_weight():
    import tensorflow as tf

    # Only the adjoint solve fails (one iteration to 1e-7). Before: fit raised, but the
    # output head's kernel and bias had moved by 0.1 and optimizer.iterations was 1.
    model, x, y = _backward_raise_model(backward_max_iter=1, backward_tol=1e-7)
    before = [v.numpy().copy() for v in model.trainable_variables]
    with pytest.raises(tf.errors.InvalidArgumentError, match="backward solver"):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    for v, want in zip(model.trainable_variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), want, err_msg=v.path)
    assert int(model.optimizer.iterations) == 0


@pytest.mark.tensorflow_only(ON_JAX_RAISE_IS_REFUSED)
def test_fit_raise_trains_when_every_solve_converges():
    # The gate on the updates waits for the assertion; it does not block a good step.
    model, x, y = _backward_raise_model(backward_max_iter=60, backward_tol=1e-3)
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert int(model.optimizer.iterations) == 2
    for v, want in zip(model.trainable_variables, before, strict=True):
        assert np.abs(v.numpy() - want).max() > 0, v.path


def test_a_step_with_no_finite_sample_reports_a_nan_residual_not_zero():
    # Before: fwd_residual was 0.0 when every sample was NaN, which reads as perfect
    # convergence.
    layer = DEQ(DenseCell(4), on_failure="ignore")
    layer(np.full((3, 4), np.nan, "float32"))
    assert np.isnan(statistic(layer, "fwd_residual"))
    assert statistic(layer, "converged") == 0.0
    # A later finite step gives the mean over the finite samples alone.
    layer(np.ones((3, 4), "float32"))
    assert 0.0 <= statistic(layer, "fwd_residual") <= layer.tol


def test_a_norm_that_overflows_is_not_a_relative_residual_of_zero():
    # ||f(z)|| overflows float32 before ||f(z) - z|| does: the ratio was 0, so a
    # diverged iterate "met" any relative tolerance.
    from keras_deq.solvers import result as res

    abs_res = ops.convert_to_tensor(np.array([1e19, 1.0, np.inf], "float32"))
    f_norm = ops.convert_to_tensor(np.array([np.inf, 2.0, np.inf], "float32"))
    rel = ops.convert_to_numpy(res.relative(abs_res, f_norm))
    assert rel[0] == np.inf and rel[1] == 0.5 and not np.isfinite(rel[2])


def test_a_diverging_adjoint_gives_a_bounded_gradient_not_a_huge_finite_one():
    # Before: an expansive cell (orthogonal W of gain 2) whose fixed-point adjoint grows
    # by about 2x per step: after 200 steps ||u|| overflowed float32 in the relative
    # residual's denominator while ||u|| itself was still finite (1e18-1e19), the ratio
    # was 0, the row counted as converged, and the layer returned gradients of 1e19
    # (Adam then wrote NaN into the weights). Now the diverging rows keep their best
    # iterate (the lowest absolute residual, an early one), as the forward solve does.
    keras.utils.set_random_seed(0)
    width = 64
    x = np.random.default_rng(2).uniform(0.0, 1.0, size=(32, width)).astype("float32")
    cell = DenseCell(width, kernel_initializer=keras.initializers.Orthogonal(2.0, seed=0))
    layer = DEQ(cell, solver="fixed_point", max_iter=200, on_failure="ignore")
    layer.build(x.shape)
    grads = layer_gradients(layer, x, lambda z: ops.sum(ops.sin(z)), cell.trainable_variables)
    for g in grads:
        g = np.asarray(ops.convert_to_numpy(g))
        assert np.all(np.isfinite(g)) and np.abs(g).max() < 1e3, np.abs(g).max()
