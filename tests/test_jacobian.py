"""Jacobian diagnostics and the DEQ layer's Jacobian regularizer (spec section 2).

Reference values are computed independently of `keras_deq.jacobian`: closed-form
Jacobians in numpy, Jacobians by the backend's own autodiff, `numpy.linalg.eigvals`
and central finite differences.

The statistical tests run in float64 where the backend has it and in float32 elsewhere
(`DTYPE`: their tolerances are sampling errors, far above float32 rounding); the tests
with rounding-level tolerances are marked `float64`.
"""

import keras
import numpy as np
import pytest
from conftest import float64_available
from feature_references import float64_param, gradient
from keras import ops

import keras_deq
from keras_deq import jacobian

D, BATCH = 5, 3
BACKEND = keras.backend.backend()
DTYPE = "float64" if float64_available() else "float32"


# ----------------------------------------------------------------- helpers
def tensor(value, dtype=None):
    return ops.convert_to_tensor(value, dtype or DTYPE)


def numpy(t):
    return ops.convert_to_numpy(t)


def dtype_of(t):
    return keras.backend.standardize_dtype(t.dtype)


def _tiny_problem(seed=0, scale=0.8):
    """A cell `f(z) = tanh(z W + x)` with d = 5 and batch 3 (numpy float64)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(D, D)) * scale
    x = rng.normal(size=(BATCH, D))
    z = rng.normal(size=(BATCH, D))
    return w, x, z


def _tanh_cell(w, x):
    return lambda s: ops.tanh(ops.matmul(s, w) + x)


def _exact_np(w, x, z):
    """mean_b ||J_b||_F^2 / d for f(z) = tanh(z W + x), in closed form.

    f_j = tanh(sum_i z_i W_ij + x_j), so J[j, i] = s_j W_ij with s = 1 - f^2.
    """
    s = 1.0 - np.tanh(z @ w + x) ** 2  # (batch, d)
    per_sample = np.einsum("bj,ij->b", s**2, w**2)
    return per_sample.mean() / z.shape[1]


def _batch_jacobian(fn, z):
    """`(batch, d_out, d_in)`: each sample's Jacobian of `fn` (acting on each sample
    separately) at the `(batch, d)` tensor `z`, one row per backend gradient."""
    rows = [gradient(lambda s, i=i: ops.sum(fn(s)[:, i]), z)[0] for i in range(z.shape[1])]
    return np.stack([numpy(row) for row in rows], axis=1)


def _exact_autodiff(fn, z):
    """mean_b ||J_b||_F^2 / d from the backend's autodiff."""
    jac = _batch_jacobian(fn, z)
    return float(np.mean(np.sum(jac.astype("float64") ** 2, axis=(1, 2)))) / int(z.shape[1])


def _repeated_mean(step, calls, generator, shape=()):
    """The mean of `calls` values of `step()` (a tensor of `shape`), which draws from
    `generator`, in one compiled function: a `tf.function` loop, or one `jax.jit` of
    `step` called `calls` times with the generator's state passed through."""
    if BACKEND == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        @tf.function
        def run():
            total = tf.zeros(shape, tf.float64)
            for _ in tf.range(calls):
                total += tf.cast(step(), tf.float64)
            return total / calls

        return run().numpy()
    if BACKEND == "torch":  # eager
        total = np.zeros(shape)
        for _ in range(calls):
            total += numpy(step()).astype("float64")
        return total / calls
    import jax  # noqa: PLC0415

    @jax.jit
    def once(state):
        with keras.StatelessScope(state_mapping=[(generator.state, state)]) as scope:
            value = step()
        return value, scope.get_current_value(generator.state)

    state, total = generator.state.value, np.zeros(shape)
    for _ in range(calls):
        value, state = once(state)
        total += np.asarray(value, "float64")
    generator.state.assign(state)
    return total / calls


def _many_probe_average(fn, z, calls, probes_per_call, seed):
    """Average of `calls` estimates of `probes_per_call` probes each, compiled."""
    gen = keras.random.SeedGenerator(seed)
    return float(
        _repeated_mean(
            lambda: jacobian.hutchinson_frobenius(fn, z, num_probes=probes_per_call, seed=gen),
            calls,
            gen,
        )
    )


# ------------------------------------------------------ hutchinson_frobenius
def test_closed_form_reference_agrees_with_autodiff():
    # Guards the reference used below: closed form == the backend's autodiff Jacobians.
    w, x, z = _tiny_problem()
    got = _exact_autodiff(_tanh_cell(tensor(w), tensor(x)), tensor(z))
    np.testing.assert_allclose(got, _exact_np(w, x, z), rtol=1e-12 if DTYPE == "float64" else 1e-5)


def test_hutchinson_matches_exact_with_many_probes():
    seed = 0
    w, x, z = _tiny_problem(seed)
    cell, z_t = _tanh_cell(tensor(w), tensor(x)), tensor(z)
    exact = _exact_autodiff(cell, z_t)
    calls, per_call = 200, 50
    m = calls * per_call
    est = _many_probe_average(cell, z_t, calls, per_call, seed + 10)
    assert abs(est - exact) / exact < 5 * np.sqrt(2 / m)


@pytest.mark.float64
def test_hutchinson_single_call_many_probes_float64():
    # One eager call with num_probes = 500 (no outer averaging).
    w, x, z = _tiny_problem(2)
    exact = _exact_np(w, x, z)
    est = jacobian.hutchinson_frobenius(
        _tanh_cell(tensor(w), tensor(x)),
        tensor(z),
        num_probes=500,
        seed=keras.random.SeedGenerator(3),
    )
    assert dtype_of(est) == "float64"
    assert est.shape == ()
    assert abs(float(est) - exact) / exact < 5 * np.sqrt(2 / 500)


@pytest.mark.parametrize("shape", [(1, 2), (8, 50), (4, 3, 5)])
def test_normalization_by_batch_times_d(shape):
    # J = c I for every sample: ||J_b||_F^2 / d = c^2 whatever the batch and d.
    # Dividing by d only (not batch * d) would give batch * c^2; not at all, c^2 d.
    c = 3.0
    z = tensor(np.random.default_rng(0).normal(size=shape))
    est = _many_probe_average(lambda s: c * s, z, 20, 20, seed=4)
    n = 20 * 20 * int(np.prod(shape))
    assert abs(est - c**2) / c**2 < max(5 * np.sqrt(2 / n), 1e-3)


def test_normalization_ratio_is_exact_with_identical_probes():
    # Same SeedGenerator seed -> same probes, so est(c z) / est(z) = c^2 exactly.
    z = tensor(np.random.default_rng(1).normal(size=(3, 7)))
    a = jacobian.hutchinson_frobenius(lambda s: 2.5 * s, z, 4, seed=keras.random.SeedGenerator(9))
    b = jacobian.hutchinson_frobenius(lambda s: s, z, 4, seed=keras.random.SeedGenerator(9))
    np.testing.assert_allclose(
        float(a) / float(b), 6.25, rtol=1e-12 if DTYPE == "float64" else 1e-6
    )


def test_batch_mean_of_per_sample_norms():
    # f(z)_b = c_b z_b: mean_b ||J_b||_F^2 / d = mean_b c_b^2 (a batch mean, not a sum).
    scales = tensor([[1.0], [2.0], [3.0]])
    z = tensor(np.random.default_rng(2).normal(size=(3, D)))
    est = _many_probe_average(lambda s: scales * s, z, 100, 20, seed=5)
    assert abs(est - 14.0 / 3.0) / (14.0 / 3.0) < 5 * np.sqrt(2 / 2000)


def test_multi_tensor_state():
    # State [a (B, 2), b (B, 3, 2)], f = [2 a, 3 b]: ||J||_F^2 = 4*2 + 9*6 = 62, d = 8.
    rng = np.random.default_rng(3)
    a = tensor(rng.normal(size=(4, 2)))
    b = tensor(rng.normal(size=(4, 3, 2)))
    gen = keras.random.SeedGenerator(6)
    est = _repeated_mean(
        lambda: jacobian.hutchinson_frobenius(
            lambda s: [2.0 * s[0], 3.0 * s[1]], [a, b], num_probes=20, seed=gen
        ),
        100,
        gen,
    )
    assert abs(float(est) - 62.0 / 8.0) / (62.0 / 8.0) < 5 * np.sqrt(2 / 2000)


def test_float32_state_gives_float32_estimate():
    z = ops.ones([2, 3], "float32")
    est = jacobian.hutchinson_frobenius(lambda s: 2.0 * s, z, 3, seed=keras.random.SeedGenerator(0))
    assert dtype_of(est) == "float32"


def test_int_seed_draws_distinct_probes():
    # `seed` may be an int (documented). With an int seed the probes must still be
    # distinct: averaging num_probes copies of the same probe is no average at all.
    z = ops.ones([4, 3])
    one = float(jacobian.hutchinson_frobenius(lambda s: 2.0 * s, z, num_probes=1, seed=1))
    two = float(jacobian.hutchinson_frobenius(lambda s: 2.0 * s, z, num_probes=2, seed=1))
    assert one != two


def test_int_seed_many_probes_converge():
    # J = 2 I: the estimate is 4 * mean(v^2); with 400 distinct probes of 12
    # elements its relative std is sqrt(2 / 4800) = 0.02, so 10% is 5 sigma.
    for seed in (0, 1, 2):
        est = float(
            jacobian.hutchinson_frobenius(lambda s: 2.0 * s, ops.ones([4, 3]), 400, seed=seed)
        )
        assert abs(est - 4.0) / 4.0 < 0.1, (seed, est)


# ------------------------------------------------------------ differentiability
def _fd_grad(fun, w, h=1e-5):
    grad = np.zeros_like(w)
    for idx in np.ndindex(*w.shape):
        e = np.zeros_like(w)
        e[idx] = h
        grad[idx] = (fun(w + e) - fun(w - e)) / (2 * h)
    return grad


@pytest.mark.float64
def test_gradient_with_fixed_probes_matches_finite_differences_of_estimate():
    # Fixed probes (fresh SeedGenerator, same seed): the estimate is a smooth
    # function of W, and its second-order gradient must match its own FD exactly.
    w, x, z = _tiny_problem(4)
    x_t, z_t = tensor(x), tensor(z)

    def est(w_t):
        return jacobian.hutchinson_frobenius(
            _tanh_cell(w_t, x_t), z_t, num_probes=3, seed=keras.random.SeedGenerator(5)
        )

    grad = numpy(gradient(est, tensor(w))[0])
    fd = _fd_grad(lambda wn: float(est(tensor(wn))), w)
    assert np.abs(grad).max() > 1e-3
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


def test_gradient_of_many_probe_average_matches_finite_differences_of_exact():
    w, x, z = _tiny_problem(5)
    w_t, x_t, z_t = tensor(w), tensor(x), tensor(z)
    fd_exact = _fd_grad(lambda wn: _exact_np(wn, x, z), w)
    gen = keras.random.SeedGenerator(12)
    calls, per_call = 100, 50

    def grad_once():
        def est(w_var):
            return jacobian.hutchinson_frobenius(
                _tanh_cell(w_var, x_t), z_t, num_probes=per_call, seed=gen
            )

        return gradient(est, w_t)[0]

    grad = _repeated_mean(grad_once, calls, gen, shape=w.shape)
    assert np.linalg.norm(fd_exact) > 1e-2
    rel = np.linalg.norm(grad - fd_exact) / np.linalg.norm(fd_exact)
    assert rel < 5 * np.sqrt(2 / (calls * per_call))


def test_estimate_is_differentiable_in_the_input():
    w, x, z = _tiny_problem(6)
    w_t, z_t = tensor(w), tensor(z)

    def est(x_var):
        return jacobian.hutchinson_frobenius(
            _tanh_cell(w_t, x_var), z_t, 2, seed=keras.random.SeedGenerator(1)
        )

    grad = gradient(est, tensor(x))[0]
    assert grad is not None
    assert float(np.max(np.abs(numpy(grad)))) > 1e-4


# ------------------------------------------------------------- spectral_radius
def _linear_maps(eigs_per_sample, seed=0):
    """Per-sample matrices A_b = Q_b diag(eigs_b) Q_b^{-1} (non-symmetric)."""
    rng = np.random.default_rng(seed)
    mats = []
    for eigs in eigs_per_sample:
        q = rng.normal(size=(len(eigs), len(eigs))) + 2 * np.eye(len(eigs))
        mats.append(q @ np.diag(eigs) @ np.linalg.inv(q))
    return np.stack(mats)


def _batched_linear(mats):
    return lambda s: ops.einsum("bi,bij->bj", s, mats)


def test_spectral_radius_of_linear_maps_with_known_spectrum():
    eigs = [
        [0.9, 0.4, -0.3, 0.2, 0.1],
        [-0.7, 0.3, 0.25, -0.1, 0.05],  # negative dominant eigenvalue
        [1.5, 0.6, -0.5, 0.2, 0.0],  # > 1: not a contraction
    ]
    mats = _linear_maps(eigs)
    # Reference from numpy, not from the construction alone.
    expected = np.abs(np.linalg.eigvals(mats)).max(axis=1)
    np.testing.assert_allclose(expected, [0.9, 0.7, 1.5], rtol=1e-10)
    z = tensor(np.random.default_rng(1).normal(size=(3, 5)))
    radius = jacobian.spectral_radius(_batched_linear(tensor(mats)), z, num_iters=200, seed=0)
    assert radius.shape == (3,)
    np.testing.assert_allclose(numpy(radius), expected, atol=1e-3)


def test_spectral_radius_of_a_nonlinear_cell_at_a_state():
    # f(z) = tanh(z W + x) with W symmetric positive definite: J_b = diag(s_b) W^T
    # is similar to a symmetric PD matrix, so its spectrum is real and positive.
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    w = q @ np.diag([1.2, 0.4, 0.3, 0.2, 0.1]) @ q.T
    x = rng.normal(size=(4, D)) * 0.5
    z = rng.normal(size=(4, D)) * 0.5
    fn, z_t = _tanh_cell(tensor(w), tensor(x)), tensor(z)
    jac = _batch_jacobian(fn, z_t)
    moduli = np.sort(np.abs(np.linalg.eigvals(jac)), axis=1)
    assert (moduli[:, -1] > 1.5 * moduli[:, -2]).all()  # a clear spectral gap
    radius = jacobian.spectral_radius(fn, z_t, num_iters=200, seed=keras.random.SeedGenerator(0))
    np.testing.assert_allclose(numpy(radius), moduli[:, -1], atol=1e-3)


def test_spectral_radius_multi_tensor_state():
    # f([a, b]) = [0.5 a, -0.8 b]: J = blockdiag(0.5 I, -0.8 I), rho = 0.8.
    rng = np.random.default_rng(8)
    a = tensor(rng.normal(size=(2, 3)))
    b = tensor(rng.normal(size=(2, 2, 2)))
    radius = jacobian.spectral_radius(lambda s: [0.5 * s[0], -0.8 * s[1]], [a, b], 200, seed=1)
    np.testing.assert_allclose(numpy(radius), [0.8, 0.8], atol=1e-3)


def _conjugated(block, seed):
    """`Q block Q^-1` with a random, well-conditioned but non-orthogonal `Q`."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=block.shape) + 2 * np.eye(len(block))
    return q @ block @ np.linalg.inv(q)


def _complex_pair_map(seed, radius=0.556, d=6):
    """Dense `J` (d x d) whose largest eigenvalues are the pair `radius * e^(+-i theta)`."""
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0.5, 2.5)
    block = np.zeros((d, d))
    block[:2, :2] = radius * np.array(
        [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    )
    block[2:, 2:] = np.diag(rng.uniform(-0.3, 0.3, d - 2))
    return _conjugated(block, seed + 100)


def _real_top_map(seed, d=6):
    """Dense `J` with a dominant real eigenvalue (0.9, or -0.9 for odd seeds) and,
    for seeds divisible by 3, a complex pair of modulus 0.78 next to it."""
    block = np.diag([0.9 * (-1) ** seed, 0.5, 0.3, -0.2, 0.1, 0.05][:d])
    if seed % 3 == 0:
        block[1:3, 1:3] = [[0.6, -0.5], [0.5, 0.6]]
    return _conjugated(block, seed + 200)


def _radii(maps, dtype, seed, num_iters=100, **kwargs):
    a = tensor(np.stack(maps), dtype)
    z = ops.ones([len(maps), a.shape[1]], dtype)
    return numpy(
        jacobian.spectral_radius(_batched_linear(a), z, num_iters=num_iters, seed=seed, **kwargs)
    )


@pytest.mark.parametrize("dtype, rtol", [float64_param("float64", 1e-9), ("float32", 1e-4)])
def test_spectral_radius_of_a_dominant_complex_pair(dtype, rtol):
    # Plain power iteration's growth factor ||J^T v|| never settles when the top
    # eigenvalues are a complex pair: on these maps it read from about 0.3 to 1.1
    # (true 0.556), depending on the map and the seed. The Krylov (Arnoldi) estimate
    # is exact to rounding.
    maps = [_complex_pair_map(seed) for seed in range(5)]
    moduli = np.sort(np.abs(np.linalg.eigvals(np.stack(maps))), axis=1)
    np.testing.assert_allclose(moduli[:, -2:], 0.556, rtol=1e-10)  # the pair
    assert (moduli[:, -3] <= 0.3).all()  # then a gap
    for seed in range(5):
        np.testing.assert_allclose(_radii(maps, dtype, seed), moduli[:, -1], rtol=rtol)


@pytest.mark.parametrize("dtype, rtol", [float64_param("float64", 1e-9), ("float32", 1e-4)])
def test_spectral_radius_of_a_dominant_real_eigenvalue(dtype, rtol):
    maps = [_real_top_map(seed) for seed in range(6)]
    expected = np.abs(np.linalg.eigvals(np.stack(maps))).max(axis=1)
    np.testing.assert_allclose(expected, 0.9, rtol=1e-10)
    for seed in range(5):
        np.testing.assert_allclose(_radii(maps, dtype, seed), expected, rtol=rtol)


@pytest.mark.float64
def test_spectral_radius_of_opposite_real_eigenvalues():
    # +0.8 and -0.8: the power iterate flips between two directions, and its
    # growth factor between two values; the two-dimensional Krylov space holds both.
    maps = [_conjugated(np.diag([0.8, -0.8, 0.3, 0.2, -0.1]), seed) for seed in range(4)]
    for seed in range(3):
        np.testing.assert_allclose(_radii(maps, "float64", seed), 0.8, rtol=1e-9)


@pytest.mark.float64
def test_spectral_radius_of_random_maps_with_crowded_spectra():
    # Gaussian 32 x 32 matrices: many eigenvalues near the largest modulus, real
    # or complex, so power iteration alone is off by up to 20% after 100 steps.
    rng = np.random.default_rng(0)
    maps = list(rng.normal(size=(20, 32, 32)) / np.sqrt(32))
    expected = np.abs(np.linalg.eigvals(np.stack(maps))).max(axis=1)
    np.testing.assert_allclose(_radii(maps, "float64", 0), expected, rtol=1e-6)


@pytest.mark.float64
def test_spectral_radius_of_a_zero_jacobian_and_small_krylov_sizes():
    z = tensor(np.random.default_rng(9).normal(size=(2, 4)), "float64")
    np.testing.assert_array_equal(jacobian.spectral_radius(lambda s: 0.0 * s, z, seed=0), 0.0)
    # krylov_size 2 resolves a pair; numpy integers are accepted for the counts.
    maps = [_complex_pair_map(seed) for seed in range(3)]
    expected = np.abs(np.linalg.eigvals(np.stack(maps))).max(axis=1)
    got = _radii(maps, "float64", 0, num_iters=np.int64(100), krylov_size=np.int64(2))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_iters": -1}, "num_iters"),
        ({"num_iters": 2.5}, "num_iters"),
        ({"krylov_size": 0}, "krylov_size"),
        ({"krylov_size": True}, "krylov_size"),
    ],
)
def test_spectral_radius_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        jacobian.spectral_radius(lambda s: s, ops.ones([1, 2]), **kwargs)


def test_numpy_integer_seed_is_an_int_seed():
    # keras.random refuses a numpy integer seed; the diagnostics take it as an int.
    z = ops.ones([4, 3])
    for fn in (
        lambda seed: jacobian.hutchinson_frobenius(lambda s: 2.0 * s, z, 3, seed=seed),
        lambda seed: jacobian.spectral_radius(lambda s: 2.0 * s, z, 5, seed=seed),
    ):
        np.testing.assert_array_equal(fn(np.int64(4)), fn(4))


# ----------------------------------------------------- DEQ Jacobian regularizer
def _deq(seed=3, weight=1.0, frequency=0.25, probes=1, units=4, max_iter=3):
    return keras_deq.DEQ(
        keras_deq.DenseCell(
            units,
            kernel_initializer=keras.initializers.Orthogonal(0.5, seed=1),
            injection_initializer=keras.initializers.GlorotUniform(seed=2),
        ),
        jacobian_weight=weight,
        jacobian_frequency=frequency,
        jacobian_probes=probes,
        solver="fixed_point",
        max_iter=max_iter,
        on_failure="ignore",
        seed=seed,
    )


_X = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")


def _added_losses(layer, n, training=True):
    """The layer's summed `add_loss` term over `n` calls, in one compiled function (a
    `tf.function` loop, or a `jax.lax.scan` of `stateless_call` that carries the layer's
    state, its random generator included), and that function (numpy values)."""
    layer(_X)  # build
    if BACKEND == "torch":  # eager calls

        def run_eagerly():
            totals = []
            for _ in range(n):
                layer(_X, training=training)
                totals.append(float(sum(layer.losses)) if layer.losses else 0.0)
            return np.asarray(totals, "float32")

        return run_eagerly(), run_eagerly
    if BACKEND == "jax":
        import jax  # noqa: PLC0415

        @jax.jit
        def scan(trainable, non_trainable):
            def step(state, _):
                _, state, losses = layer.stateless_call(
                    trainable, state, _X, training=training, return_losses=True
                )
                total = sum(losses) if losses else ops.zeros(())
                return state, ops.cast(total, "float32")

            return jax.lax.scan(step, non_trainable, length=n)

        def run():
            state, totals = scan(
                [v.value for v in layer.trainable_variables],
                [v.value for v in layer.non_trainable_variables],
            )
            for variable, value in zip(layer.non_trainable_variables, state, strict=True):
                variable.assign(value)  # the generator moves on, as on TensorFlow
            return np.asarray(totals)

        return run(), run
    import tensorflow as tf  # noqa: PLC0415

    @tf.function
    def run():
        out = tf.TensorArray(tf.float32, size=n)
        for i in tf.range(n):
            layer(_X, training=training)
            total = tf.add_n(layer.losses) if layer.losses else tf.constant(0.0)
            out = out.write(i, tf.cast(total, tf.float32))
        return out.stack()

    return run().numpy(), lambda: run().numpy()


def test_regularizer_frequency():
    values, _ = _added_losses(_deq(frequency=0.25), 2000)
    assert (values >= 0).all()
    fraction = float(np.mean(values != 0))
    assert abs(fraction - 0.25) < 0.05


def test_regularizer_frequency_is_read_from_the_variable():
    # Changing the frequency after tracing must take effect (a variable, not a constant).
    layer = _deq(frequency=0.25)
    values, run = _added_losses(layer, 1000)
    assert abs(np.mean(values != 0) - 0.25) < 0.06
    layer.jacobian_frequency = 0.75
    values = run()
    assert abs(np.mean(values != 0) - 0.75) < 0.06
    layer.jacobian_weight = 0.0
    assert (run() == 0).all()


def test_regularizer_always_applied_with_frequency_one():
    values, _ = _added_losses(_deq(frequency=1.0), 200)
    assert (values > 0).all()


def test_regularizer_never_added_in_inference():
    layer = _deq(frequency=1.0)
    values, _ = _added_losses(layer, 50, training=False)
    assert (values == 0).all()
    layer(_X, training=False)
    assert all(float(loss) == 0.0 for loss in layer.losses)
    # The metric (TensorFlow) or the statistics variable (JAX) records no application.
    if BACKEND != "jax":
        assert float(layer._jac_loss_metric.count) == 0.0
    else:
        assert layer.solver_statistics()["jac_loss"] == 0.0
    layer(_X)  # training=None
    assert all(float(loss) == 0.0 for loss in layer.losses)


def test_regularizer_zero_weight_adds_nothing():
    values, _ = _added_losses(_deq(weight=0.0, frequency=1.0), 50)
    assert (values == 0).all()


def test_regularizer_enabled_by_setting_a_positive_weight_before_tracing():
    layer = _deq(weight=0.0, frequency=1.0)
    layer.jacobian_weight = 1.0
    values, _ = _added_losses(layer, 20)
    assert (values > 0).all()


def test_regularizer_weight_set_between_fits_takes_effect():
    # `jacobian_weight` is documented as changeable during training. A user who
    # trains without the regularizer and then sets a positive weight must get it
    # in the next `fit`, not a silent no-op with the variable reading 1.0.
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    deq = keras_deq.DEQ(
        keras_deq.DenseCell(4), solver="fixed_point", max_iter=5, on_failure="ignore", name="deq"
    )
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), deq, keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, x[:, :1], epochs=1, verbose=0)
    before = deq.solver_statistics()
    # The regularizer was not traced into the training function: the setter says
    # so and how to retrace, rather than silently doing nothing.
    with pytest.warns(UserWarning, match="make_train_function"):
        deq.jacobian_weight = 1.0
    model.make_train_function(force=True)
    history = model.fit(x, x[:, :1], epochs=1, verbose=0)
    assert float(deq.jacobian_weight.numpy()) == 1.0
    if BACKEND != "jax":
        assert history.history["deq_jac_loss"][0] > 0.0
    else:  # JAX `fit` logs lack the DEQ's metrics: its statistics variables
        assert before["jac_loss"] == 0.0 < deq.solver_statistics()["jac_loss"]


def test_regularizer_draw_is_reproducible_with_a_seed():
    a, _ = _added_losses(_deq(seed=3), 100)
    b, _ = _added_losses(_deq(seed=3), 100)
    c, _ = _added_losses(_deq(seed=4), 100)
    np.testing.assert_array_equal(a, b)
    assert ((a != 0) != (c != 0)).any()


def test_regularizer_value_is_weighted_frobenius_estimate_at_equilibrium():
    # When applied, the added loss is weight * ||J(z*)||_F^2 / d; averaged over
    # many calls it matches the closed form at the layer's output z*.
    weight = 2.5
    layer = _deq(weight=weight, frequency=1.0, probes=10, max_iter=50)
    values, _ = _added_losses(layer, 300)
    z_star = numpy(layer(_X)).astype(np.float64)
    cell = layer.cell
    w = numpy(cell.kernel).astype(np.float64)
    pre_x = _X @ numpy(cell.injection_kernel) + numpy(cell.bias)
    exact = _exact_np(w, pre_x.astype(np.float64), z_star)
    m = 300 * 10
    assert abs(values.mean() / weight - exact) / exact < 5 * np.sqrt(2 / m)
    # The metric holds the mean unweighted estimate (TensorFlow); the statistics
    # variable, the last one applied (JAX).
    if BACKEND != "jax":
        np.testing.assert_allclose(
            float(layer._jac_loss_metric.result()), values.mean() / weight, rtol=1e-4
        )
    else:
        np.testing.assert_allclose(
            layer.solver_statistics()["jac_loss"], values[-1] / weight, rtol=1e-4
        )


def test_regularizer_gradient_reaches_the_cell():
    layer = _deq(weight=1.0, frequency=1.0)
    layer(_X)
    variables = layer.cell.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        with tf.GradientTape() as tape:
            layer(_X, training=True)
            loss = tf.add_n(layer.losses)
        grads = tape.gradient(loss, variables)
    elif BACKEND == "torch":
        import torch  # noqa: PLC0415

        layer(_X, training=True)
        loss = sum(layer.losses)
        grads = torch.autograd.grad(loss, [v.value for v in variables], allow_unused=True)
    else:
        import jax  # noqa: PLC0415

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(values):
            _, _, losses = layer.stateless_call(
                values, non_trainable, _X, training=True, return_losses=True
            )
            return sum(losses)

        trainable = layer.trainable_variables
        by_id = dict(
            zip(
                (id(v) for v in trainable),
                jax.grad(loss)([v.value for v in trainable]),
                strict=True,
            )
        )
        grads = [by_id[id(v)] for v in variables]
    kernel_grad = grads[0]
    assert kernel_grad is not None
    assert float(np.max(np.abs(numpy(kernel_grad)))) > 0


# ------------------------------------------------------------------- effect
def _h(x):
    return 1.5 * x**3 + x**2 - 5 * x + 2 * np.sin(x) - 3


def _train_regression(weight, seed=0, epochs=19):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=(1024, 1)).astype("float32")
    y = (_h(x) + 0.05 * rng.normal(size=x.shape)).astype("float32")
    deq = keras_deq.DEQ(
        keras_deq.DenseCell(32),
        jacobian_weight=weight,
        tol=1e-4,
        max_iter=50,
        on_failure="ignore",
        seed=seed,
        name="deq",
    )
    model = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(32), deq, keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    # 16 steps per epoch: 19 epochs = 304 steps.
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    x_val = np.linspace(-2, 2, 256, dtype="float32")[:, None]
    injection = model.layers[0](x_val)
    z_star = deq(injection)
    jac = _batch_jacobian(lambda z: deq.cell(z, injection), z_star)
    frobenius = float(np.mean(np.sqrt(np.sum(jac.astype("float64") ** 2, axis=(1, 2)))))
    rho = float(
        np.mean(
            numpy(jacobian.spectral_radius(lambda z: deq.cell(z, injection), z_star, 200, seed=0))
        )
    )
    # One evaluation batch: the statistics are its solve's (the metrics on TensorFlow,
    # the variables on JAX, whose `evaluate` logs lack them).
    model.evaluate(x_val, _h(x_val), batch_size=256, verbose=0)
    return frobenius, rho, deq.solver_statistics()["fwd_steps"]


@pytest.mark.slow
def test_regularizer_makes_the_equilibrium_better_conditioned():
    fro0, rho0, steps0 = _train_regression(0.0)
    fro1, rho1, steps1 = _train_regression(1.0)
    assert fro1 < fro0
    assert rho1 < rho0
    assert steps1 < steps0
