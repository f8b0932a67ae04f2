"""Gradients of the DEQ layer in every backward mode, against independent references.

Everything here runs in float64 on small problems, so the references (a dense
linear solve in NumPy, autodiff through a long plain-TensorFlow Picard loop, and
central finite differences) are accurate far below the tolerances used.
Row-vector convention of `DenseCell`: `z_next = act(z W + x U + b)`.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from keras_deq import backward as backward_lib
from keras_deq.solvers import fixed_point

BATCH, FEATURES, UNITS = 3, 3, 4
TIGHT = {"tol": 1e-13, "max_iter": 300, "on_failure": "raise"}

# Every test solves to 1e-13 and compares gradients to 1e-6..1e-10: float64 only (JAX
# computes float32; its gradients are checked against dense solves and hand-written
# loops in float32 in tests/jax/test_deq_on_jax.py).
pytestmark = pytest.mark.float64


# ----------------------------------------------------------------------------- helpers
def contraction(n, norm, seed):
    """A random (n, n) matrix with spectral norm `norm`."""
    w = np.random.default_rng(seed).normal(size=(n, n))
    return w * (norm / np.linalg.norm(w, 2))


def dense_deq(activation="tanh", seed=0, norm=0.5, **kwargs):
    """A float64 DEQ around a DenseCell, built, with weights set from `seed`."""
    cell = keras_deq.DenseCell(UNITS, activation=activation, dtype="float64")
    options = {**TIGHT, **kwargs}
    layer = keras_deq.DEQ(cell, state_shape=(UNITS,), dtype="float64", **options)
    layer.build((None, FEATURES))
    rng = np.random.default_rng(seed)
    cell.kernel.assign(contraction(UNITS, norm, seed))
    cell.injection_kernel.assign(rng.normal(size=(FEATURES, UNITS)))
    cell.bias.assign(rng.normal(size=(UNITS,)))
    return layer


def inputs(seed=1, batch=BATCH, features=FEATURES):
    return tf.constant(np.random.default_rng(seed).normal(size=(batch, features)))


def target(seed=2, shape=(BATCH, UNITS)):
    return tf.constant(np.random.default_rng(seed).normal(size=shape))


def half_sq_loss(z, t):
    return 0.5 * tf.add_n(
        [
            tf.reduce_sum(tf.square(a - b))
            for a, b in zip(tf.nest.flatten(z), tf.nest.flatten(t), strict=True)
        ]
    )


def layer_grads(layer, x, t, loss=half_sq_loss, training=True):
    """Gradients of `loss(layer(x), t)` w.r.t. `x` (first) and the cell's variables."""
    variables = layer.cell.trainable_variables
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss_value = loss(layer(x, training=training), t)
    grads = tape.gradient(loss_value, [*tf.nest.flatten(x), *variables])
    return grads


def unrolled_grads(step, z0, x, t, variables, steps=200, loss=half_sq_loss):
    """Reference: autodiff through `steps` plain Picard iterations `z <- step(z, x)`."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        z = z0
        for _ in range(steps):
            z = step(z, x)
        loss_value = loss(z, t)
    return z, tape.gradient(loss_value, [*tf.nest.flatten(x), *variables])


def dense_step(cell, activation):
    """The DenseCell map written directly with TensorFlow ops on its variables."""

    def step(z, x):
        pre = tf.matmul(z, cell.kernel) + tf.matmul(x, cell.injection_kernel) + cell.bias
        return activation(pre)

    return step


def metric(layer, key):
    """The value of the layer's metric `{name}_{key}` (found through `layer.metrics`)."""
    found = [m for m in layer.metrics if m.name == f"{layer.name}_{key}"]
    assert len(found) == 1, [m.name for m in layer.metrics]
    return float(found[0].result())


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def assert_grads_close(got, want, rtol, names=None):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        name = names[i] if names else i
        assert g is not None, f"gradient {name} is None"
        assert rel_err(g, w) < rtol, f"gradient {name}: relative error {rel_err(g, w):.3g}"


VAR_NAMES = ["x", "kernel", "injection_kernel", "bias"]


# ------------------------------------------------------------ 1. linear cell, exact
@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_implicit_gradient_of_linear_cell_matches_dense_solve(solver):
    layer = dense_deq("linear", seed=3, solver=solver)
    cell = layer.cell
    x, t = inputs(), target()
    grads = layer_grads(layer, x, t)

    w = cell.kernel.numpy()
    u_inj = cell.injection_kernel.numpy()
    b = cell.bias.numpy()
    xn, tn = x.numpy(), t.numpy()
    assert np.isclose(np.linalg.norm(w, 2), 0.5)
    eye = np.eye(UNITS)
    # z (I - W) = x U + b  <=>  (I - W)^T z^T = (x U + b)^T
    z_star = np.linalg.solve((eye - w).T, (xn @ u_inj + b).T).T
    np.testing.assert_allclose(layer(x).numpy(), z_star, rtol=1e-10, atol=1e-12)
    g = z_star - tn
    # Adjoint in the row convention: u = u W^T + g  <=>  (I - W) u^T = g^T.
    u = np.linalg.solve(eye - w, g.T).T
    exact = [u @ u_inj.T, z_star.T @ u, xn.T @ u, u.sum(axis=0)]
    assert_grads_close(grads, exact, rtol=1e-6, names=VAR_NAMES)
    for got, want in zip(grads, exact, strict=True):
        assert rel_err(got, want) < 1e-9  # float64: the solve is essentially exact


# --------------------------------------------------- 2. tanh cell, unrolled reference
@pytest.fixture(scope="module")
def tanh_reference():
    layer = dense_deq("tanh", seed=5)
    x, t = inputs(seed=6), target(seed=7)
    cell = layer.cell
    z0 = tf.zeros((BATCH, UNITS), "float64")
    z, grads = unrolled_grads(dense_step(cell, tf.tanh), z0, x, t, cell.trainable_variables)
    weights = [v.numpy() for v in cell.weights]
    return weights, x, t, z.numpy(), [g.numpy() for g in grads]


def tanh_layer_like(reference, **kwargs):
    weights = reference[0]
    layer = dense_deq("tanh", seed=5, **kwargs)
    layer.cell.set_weights(weights)
    return layer


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_implicit_gradient_of_tanh_cell_matches_long_unrolling(tanh_reference, solver):
    _, x, t, z_ref, grads_ref = tanh_reference
    layer = tanh_layer_like(tanh_reference, solver=solver)
    np.testing.assert_allclose(layer(x).numpy(), z_ref, rtol=1e-10, atol=1e-12)
    grads = layer_grads(layer, x, t)
    assert_grads_close(grads, grads_ref, rtol=1e-6, names=VAR_NAMES)
    assert metric(layer, "bwd_steps") > 0


@pytest.mark.parametrize("backward_solver", ["fixed_point", "anderson", "broyden"])
def test_backward_solver_choice_does_not_change_gradient(tanh_reference, backward_solver):
    _, x, t, _, grads_ref = tanh_reference
    layer = tanh_layer_like(tanh_reference, solver="anderson", backward_solver=backward_solver)
    assert_grads_close(layer_grads(layer, x, t), grads_ref, rtol=1e-6, names=VAR_NAMES)


@pytest.mark.tensorflow_only("the gradient inside a tf.function")
def test_implicit_gradient_in_tf_function_matches_eager(tanh_reference):
    _, x, t, _, grads_ref = tanh_reference
    layer = tanh_layer_like(tanh_reference)

    @tf.function
    def graph_grads(x):
        return layer_grads(layer, x, t)

    assert_grads_close(graph_grads(x), grads_ref, rtol=1e-6, names=VAR_NAMES)


def test_implicit_gradient_matches_finite_differences():
    # Solve to machine precision so that differences of two solves are meaningful.
    layer = dense_deq("tanh", seed=11, tol=1e-30, max_iter=40, on_failure="ignore")
    cell = layer.cell
    x, t = inputs(seed=12), target(seed=13)
    grads = layer_grads(layer, x, t)
    h = 1e-6
    forward = tf.function(lambda x_value: half_sq_loss(layer(x_value), t))

    def loss_at(x_value):
        return float(forward(x_value))

    checked = 0
    # A few entries of x.
    for idx in [(0, 0), (1, 2), (2, 1)]:
        e = np.zeros(x.shape)
        e[idx] = h
        fd = (loss_at(x + e) - loss_at(x - e)) / (2 * h)
        assert abs(fd - grads[0].numpy()[idx]) <= 1e-6 * max(1.0, abs(fd)), idx
        checked += 1
    # A few entries of every variable.
    for variable, grad in zip(cell.trainable_variables, grads[1:], strict=True):
        value = variable.numpy()
        for flat_index in [0, value.size // 2, value.size - 1]:
            idx = np.unravel_index(flat_index, value.shape)
            plus, minus = value.copy(), value.copy()
            plus[idx] += h
            minus[idx] -= h
            variable.assign(plus)
            lp = loss_at(x)
            variable.assign(minus)
            lm = loss_at(x)
            variable.assign(value)
            fd = (lp - lm) / (2 * h)
            assert abs(fd - grad.numpy()[idx]) <= 1e-6 * max(1.0, abs(fd)), (variable.path, idx)
            checked += 1
    assert checked == 3 + 3 * len(cell.trainable_variables)


# ------------------------------------------------------- 3. every variable, any state
class NestedCell(keras.layers.Layer):
    """Owns a Dense sub-layer (the injection) and its own recurrent weight."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.layers.Dense(units, dtype=self.dtype_policy)

    def build(self, z_shape, x_shape):
        self.recurrent = self.add_weight(
            name="recurrent",
            shape=(self.units, self.units),
            initializer=keras.initializers.Orthogonal(gain=0.4, seed=0),
        )
        self.inner.build(x_shape)

    def call(self, z, x):
        return keras.ops.tanh(keras.ops.matmul(z, self.recurrent) + self.inner(x))


class LazyNestedCell(keras.layers.Layer):
    """Like NestedCell, but the sub-layer is only built on its first call."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.layers.Dense(
            units,
            kernel_initializer=keras.initializers.Orthogonal(gain=0.4, seed=1),
            dtype=self.dtype_policy,
        )
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones")

    def call(self, z, x):
        return keras.ops.tanh(self.inner(z) + self.scale * x)


class TwoStateCell(keras.layers.Layer):
    """A cell whose state is a list `[a (3,), b (4,)]`, coupled both ways."""

    def build(self, z_shape, x_shape):
        orth = keras.initializers.Orthogonal
        self.w_aa = self.add_weight(name="w_aa", shape=(3, 3), initializer=orth(0.3, seed=2))
        self.w_ba = self.add_weight(name="w_ba", shape=(4, 3), initializer=orth(0.3, seed=3))
        self.w_ab = self.add_weight(name="w_ab", shape=(3, 4), initializer=orth(0.3, seed=4))
        self.w_bb = self.add_weight(name="w_bb", shape=(4, 4), initializer=orth(0.3, seed=5))
        self.u_a = self.add_weight(name="u_a", shape=(x_shape[-1], 3), initializer="ones")
        self.u_b = self.add_weight(name="u_b", shape=(x_shape[-1], 4), initializer="ones")

    def call(self, z, x):
        a, b = z
        mm = keras.ops.matmul
        a_next = keras.ops.tanh(mm(a, self.w_aa) + mm(b, self.w_ba) + mm(x, self.u_a))
        b_next = keras.ops.tanh(mm(a, self.w_ab) + mm(b, self.w_bb) + mm(x, self.u_b))
        return [a_next, b_next]


def perturb_weights(layer, seed):
    """Moves every weight a little, so that gradients are not at a special point."""
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        v.assign(v.numpy() + 0.05 * rng.normal(size=v.shape))


def check_cell_against_unrolled(cell, state_shape, run_in_graph=False):
    layer = keras_deq.DEQ(cell, state_shape=state_shape, dtype="float64", **TIGHT)
    x = inputs(seed=21)
    layer.build((None, FEATURES))
    perturb_weights(cell, seed=22)
    if state_shape is None:
        z0 = tf.zeros_like(x)
    elif isinstance(state_shape, list):
        z0 = [tf.zeros((BATCH, *s), "float64") for s in state_shape]
    else:
        z0 = tf.zeros((BATCH, *state_shape), "float64")
    t = tf.nest.map_structure(lambda z: target(seed=23, shape=z.shape), z0)
    variables = cell.trainable_variables
    assert len(variables) >= 2

    # cell.call skips the Keras __call__ overhead. These cells are contractions
    # with constant about 0.6 or less, so 80 steps are exact in float64.
    _, want = unrolled_grads(cell.call, z0, x, t, variables, steps=80)
    grads_fn = tf.function(layer_grads) if run_in_graph else layer_grads
    got = grads_fn(layer, x, t)
    names = ["x"] + [v.path for v in variables]
    assert_grads_close(got, want, rtol=1e-6, names=names)
    return variables


@pytest.mark.parametrize("run_in_graph", [False, True], ids=["eager", "graph"])
def test_nested_sub_layer_variables_get_implicit_gradients(run_in_graph):
    cell = NestedCell(UNITS, dtype="float64")
    variables = check_cell_against_unrolled(cell, (UNITS,), run_in_graph)
    paths = {v.path for v in variables}
    assert any("recurrent" in p for p in paths)
    assert sum("dense" in p for p in paths) == 2  # the sub-layer's kernel and bias


@pytest.mark.parametrize("run_in_graph", [False, True], ids=["eager", "graph"])
def test_lazily_built_sub_layer_variables_get_implicit_gradients(run_in_graph):
    cell = LazyNestedCell(FEATURES, dtype="float64")
    variables = check_cell_against_unrolled(cell, None, run_in_graph)
    assert len(variables) == 3  # scale, the sub-layer's kernel and bias


@pytest.mark.parametrize("run_in_graph", [False, True], ids=["eager", "graph"])
def test_list_state_gets_implicit_gradients(run_in_graph):
    variables = check_cell_against_unrolled(
        TwoStateCell(dtype="float64"), [(3,), (4,)], run_in_graph
    )
    assert len(variables) == 6


def test_list_state_loss_on_one_part_still_reaches_every_variable():
    cell = TwoStateCell(dtype="float64")
    layer = keras_deq.DEQ(cell, state_shape=[(3,), (4,)], dtype="float64", **TIGHT)
    x = inputs(seed=31)
    layer.build((None, FEATURES))
    z0 = [tf.zeros((BATCH, 3), "float64"), tf.zeros((BATCH, 4), "float64")]

    def loss(z, t):
        return tf.reduce_sum(tf.sin(z[0]))  # the second part gets no upstream gradient

    _, want = unrolled_grads(cell.call, z0, x, None, cell.trainable_variables, steps=80, loss=loss)
    got = layer_grads(layer, x, None, loss=loss)
    assert_grads_close(got, want, rtol=1e-6)
    assert all(np.max(np.abs(g)) > 0 for g in got)


def test_two_inputs_get_implicit_gradients():
    class TwoInputCell(keras.layers.Layer):
        def build(self, z_shape, x_shape):
            self.w = self.add_weight(
                shape=(5, 5), initializer=keras.initializers.Orthogonal(0.5, seed=7)
            )

        def call(self, z, x):
            x1, x2 = x
            return keras.ops.tanh(keras.ops.matmul(z, self.w) + x1 * x2)

    cell = TwoInputCell(dtype="float64")
    layer = keras_deq.DEQ(cell, state_shape=(5,), dtype="float64", **TIGHT)
    x = [inputs(seed=41, features=5), inputs(seed=42, features=5)]
    t = target(seed=43, shape=(BATCH, 5))
    layer.build([(None, 5), (None, 5)])
    with tf.GradientTape() as tape:
        tape.watch(x)
        z = layer(x)
        loss = half_sq_loss(z, t)
    got = tape.gradient(loss, [*x, cell.w])
    z0 = tf.zeros((BATCH, 5), "float64")
    with tf.GradientTape() as tape:
        tape.watch(x)
        z = z0
        for _ in range(80):
            z = cell.call(z, x)
        loss = half_sq_loss(z, t)
    want = tape.gradient(loss, [*x, cell.w])
    assert_grads_close(got, want, rtol=1e-6, names=["x1", "x2", "w"])


def test_image_state_gets_implicit_gradients():
    class ConvCell(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = keras.layers.Conv2D(
                2,
                3,
                padding="same",
                kernel_initializer=keras.initializers.RandomNormal(0.0, 0.05, seed=8),
                dtype=self.dtype_policy,
            )

        def call(self, z, x):
            return keras.ops.tanh(self.conv(z) + x)

    cell = ConvCell(dtype="float64")
    layer = keras_deq.DEQ(cell, dtype="float64", **TIGHT)
    x = tf.constant(np.random.default_rng(51).normal(size=(2, 4, 4, 2)))
    t = tf.constant(np.random.default_rng(52).normal(size=(2, 4, 4, 2)))
    layer.build((None, 4, 4, 2))
    _, want = unrolled_grads(cell.call, tf.zeros_like(x), x, t, cell.trainable_variables, steps=80)
    got = layer_grads(layer, x, t)
    assert_grads_close(got, want, rtol=1e-6, names=["x", "kernel", "bias"])


def test_layer_called_twice_in_one_tape(tanh_reference):
    _, x, t, _, _ = tanh_reference
    layer = tanh_layer_like(tanh_reference)
    x2 = x[::-1] * 0.5
    separate = [layer_grads(layer, x_i, t) for x_i in (x, x2)]

    variables = layer.cell.trainable_variables
    with tf.GradientTape() as tape:
        loss = half_sq_loss(layer(x), t) + half_sq_loss(layer(x2), t)
    got = tape.gradient(loss, variables)
    want = [a + b for a, b in zip(separate[0][1:], separate[1][1:], strict=True)]
    assert_grads_close(got, want, rtol=1e-9, names=VAR_NAMES[1:])


# ------------------------------------------------------------------- 4. other modes
def test_unrolled_mode_matches_reference_unrolling(tanh_reference):
    _, x, t, _, grads_ref = tanh_reference
    layer = tanh_layer_like(
        tanh_reference,
        solver="fixed_point",
        backward="unrolled",
        max_iter=200,
        tol=1e-300,
        on_failure="ignore",
    )
    got = layer_grads(layer, x, t)
    assert_grads_close(got, grads_ref, rtol=1e-6, names=VAR_NAMES)
    # Stops early only where the float64 iteration is exactly stationary.
    assert 10 < metric(layer, "fwd_steps") <= 200


def test_unrolled_mode_short_solve_differs_from_fixed_point_gradient(tanh_reference):
    # Few steps: autodiff through the loop is far from the converged gradient,
    # so the previous test is not passing by accident of a converged forward.
    _, x, t, _, grads_ref = tanh_reference
    layer = tanh_layer_like(
        tanh_reference,
        solver="fixed_point",
        backward="unrolled",
        max_iter=3,
        on_failure="ignore",
    )
    got = layer_grads(layer, x, t)
    assert max(rel_err(g, w) for g, w in zip(got, grads_ref, strict=True)) > 1e-3


def test_unrolled_mode_with_short_solve_is_autodiff_of_the_returned_iterate():
    layer = dense_deq(
        "tanh",
        seed=61,
        solver="fixed_point",
        backward="unrolled",
        max_iter=4,
        tol=1e-300,
        on_failure="ignore",
    )
    cell = layer.cell
    x, t = inputs(seed=62), target(seed=63)
    z_layer = layer(x).numpy()
    got = layer_grads(layer, x, t)
    assert metric(layer, "fwd_steps") == 4
    z0 = tf.zeros((BATCH, UNITS), "float64")
    step = dense_step(cell, tf.tanh)
    # max_iter=4 evaluates the cell 4 times; the solver returns the iterate whose
    # residual it measured (3 applications of f, see SolverResult.state). The
    # gradient must be exactly that of a plain unrolling to that same iterate.
    matches = []
    for steps in (3, 4):
        z_ref, want = unrolled_grads(step, z0, x, t, cell.trainable_variables, steps=steps)
        if np.allclose(z_ref.numpy(), z_layer, rtol=0, atol=1e-14):
            matches.append(steps)
            assert_grads_close(got, want, rtol=1e-10, names=VAR_NAMES)
    assert len(matches) == 1, matches


def test_unrolled_mode_through_anderson_approaches_implicit(tanh_reference):
    _, x, t, _, grads_ref = tanh_reference
    layer = tanh_layer_like(tanh_reference, solver="anderson", backward="unrolled")
    assert_grads_close(layer_grads(layer, x, t), grads_ref, rtol=1e-6, names=VAR_NAMES)


class InjectionOnlyCell(keras.layers.Layer):
    """`f(z, x) = tanh(x U + b)`: ignores the state, so `J = 0`."""

    def build(self, z_shape, x_shape):
        self.u = self.add_weight(
            name="u", shape=(x_shape[-1], z_shape[-1]), initializer="glorot_uniform"
        )
        self.b = self.add_weight(name="b", shape=(z_shape[-1],), initializer="ones")

    def call(self, z, x):
        return keras.ops.tanh(keras.ops.matmul(x, self.u) + self.b)


@pytest.mark.parametrize("backward", ["implicit", "one_step", "phantom", "unrolled"])
def test_every_mode_is_exact_when_cell_ignores_state(backward):
    # (Phantom with damping tau < 1 scales this gradient by 1 - (1 - tau)^k by design.)
    cell = InjectionOnlyCell(dtype="float64")
    x, t = inputs(seed=71), target(seed=72)
    layer = keras_deq.DEQ(
        cell,
        state_shape=(UNITS,),
        dtype="float64",
        backward=backward_lib.Phantom(3, damping=1.0) if backward == "phantom" else backward,
        **TIGHT,
    )
    layer.build(x.shape)
    got = layer_grads(layer, x, t)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = half_sq_loss(tf.tanh(tf.matmul(x, cell.u) + cell.b), t)
    want = tape.gradient(loss, [x, cell.u, cell.b])
    assert_grads_close(got, want, rtol=1e-10, names=["x", "u", "b"])


def test_one_step_differs_from_implicit_when_jacobian_is_not_zero(tanh_reference):
    _, x, t, _, grads_ref = tanh_reference
    layer = tanh_layer_like(tanh_reference, backward="one_step")
    got = layer_grads(layer, x, t)
    assert all(g is not None for g in got)
    assert max(rel_err(g, w) for g, w in zip(got, grads_ref, strict=True)) > 1e-2
    # It is exactly the gradient of one application of f at z*.
    cell = layer.cell
    z_star = tf.constant(tanh_reference[3])
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = half_sq_loss(dense_step(cell, tf.tanh)(z_star, x), t)
    want = tape.gradient(loss, [x, *cell.trainable_variables])
    assert_grads_close(got, want, rtol=1e-9, names=VAR_NAMES)


def test_phantom_gradient_approaches_implicit_as_steps_grow(tanh_reference):
    _, x, t, _, grads_ref = tanh_reference
    errors = []
    for k in (1, 4, 16, 64):
        layer = tanh_layer_like(tanh_reference, backward=backward_lib.Phantom(steps=k))
        got = layer_grads(layer, x, t)
        errors.append(max(rel_err(g, w) for g, w in zip(got, grads_ref, strict=True)))
    assert all(a > b for a, b in zip(errors[:-1], errors[1:], strict=True)), errors
    assert errors[0] > 1e-2, errors
    assert errors[-1] < 1e-6, errors


def test_phantom_damping_one_with_many_steps_is_the_unrolled_gradient(tanh_reference):
    _, x, t, _, grads_ref = tanh_reference
    layer = tanh_layer_like(tanh_reference, backward=backward_lib.Phantom(steps=60, damping=1.0))
    assert_grads_close(layer_grads(layer, x, t), grads_ref, rtol=1e-6, names=VAR_NAMES)


@pytest.mark.parametrize("run_in_graph", [False, True], ids=["eager", "graph"])
def test_every_mode_gives_the_same_forward_output(tanh_reference, run_in_graph):
    _, x, _, z_ref, _ = tanh_reference
    for backward in backward_lib.MODES:
        layer = tanh_layer_like(tanh_reference, backward=backward)
        call = tf.function(layer.__call__) if run_in_graph else layer.__call__
        np.testing.assert_allclose(
            call(x, training=True).numpy(), z_ref, rtol=0, atol=1e-11, err_msg=backward
        )


# ----------------------------------------------------------- 5. adjoint statistics
def test_adjoint_solves_the_transposed_fixed_point():
    rng = np.random.default_rng(81)
    w = tf.constant(contraction(UNITS, 0.5, 82))
    u_inj = tf.constant(rng.normal(size=(FEATURES, UNITS)))
    x, t = inputs(seed=83), target(seed=84)
    captured = []

    def fn(z, x):
        return tf.matmul(z, w) + tf.matmul(x, u_inj)

    def solve(f, z0):
        return fixed_point(f, z0, max_iter=300, tol=1e-13)

    with tf.GradientTape() as tape:
        tape.watch(x)
        problem = backward_lib.Equilibrium(
            fn,
            x,
            tf.zeros((BATCH, UNITS), "float64"),
            forward=solve,
            adjoint=solve,
            on_backward=captured.append,
        )
        z, result = backward_lib.Implicit()(problem)
        loss = half_sq_loss(z, t)
    gx = tape.gradient(loss, x)
    assert bool(tf.reduce_all(result.converged))
    assert len(captured) == 1
    adjoint = captured[0]
    assert bool(tf.reduce_all(adjoint.converged))
    assert int(adjoint.steps) > 1
    u = adjoint.state.numpy()
    g = z.numpy() - t.numpy()
    # u = J^T u + g, with J^T u = u W^T in the row convention.
    np.testing.assert_allclose(u, u @ w.numpy().T + g, rtol=0, atol=1e-11)
    np.testing.assert_allclose(gx.numpy(), u @ u_inj.numpy().T, rtol=1e-10, atol=1e-12)


def test_backward_statistics_are_reported_by_the_layer(tanh_reference):
    _, x, t, _, _ = tanh_reference
    layer = tanh_layer_like(tanh_reference, backward_tol=1e-9)
    layer_grads(layer, x, t)
    assert metric(layer, "bwd_steps") > 0
    assert 0 <= metric(layer, "bwd_residual") <= 1e-9
    other = tanh_layer_like(tanh_reference, backward="phantom")
    layer_grads(other, x, t)
    assert metric(other, "bwd_steps") == 0


def test_unconverged_backward_is_reported(tanh_reference):
    _, x, t, _, grads_ref = tanh_reference
    layer = tanh_layer_like(
        tanh_reference, solver="fixed_point", backward_max_iter=2, on_failure="warn"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = layer_grads(layer, x, t)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "backward" in messages[0], messages
    assert metric(layer, "bwd_steps") == 2
    assert metric(layer, "bwd_residual") > 1e-13
    assert max(rel_err(g, w) for g, w in zip(got, grads_ref, strict=True)) > 1e-4

    raising = tanh_layer_like(tanh_reference, solver="fixed_point", backward_max_iter=2)
    with pytest.raises(FloatingPointError, match="backward"):
        layer_grads(raising, x, t)
