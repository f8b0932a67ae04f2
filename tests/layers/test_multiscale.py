"""Multiscale DEQ cells: the Lipschitz bound against measurements, and the layers.

The Lipschitz checks run on "saturated" cells: every conv pushed to its
operator-norm cap and every `|gamma|` to its cap, with random offsets, so that
the bound is as large as the constraints allow. The measurements (Jacobian norms
by power iteration on `J^T J`, difference quotients over random pairs) are lower
estimates of the true Lipschitz constant, so each must stay below the bound.
"""

import importlib.util
import math
import pathlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from keras_deq import constraints
from keras_deq.layers.multiscale import (
    LipschitzMultiscale,
    LipschitzMultiscaleCell,
    MeanGroupNormalization,
    MultiscaleCell,
    MultiscaleDEQ,
    ScaledReLU,
    fusion_weights,
)
from keras_deq.solvers import anderson, fixed_point

SMALL = {"channels": (4, 8), "groups": 2}
SIZE = 8
EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "vision" / "multiscale.py"


# ----------------------------------------------------------------------------- helpers
def random_state(batch, seed, channels=SMALL["channels"], dtype="float32", scale=1.0):
    rng = np.random.default_rng(seed)
    return [
        tf.constant(scale * rng.normal(size=(batch, SIZE // 2**i, SIZE // 2**i, c)), dtype)
        for i, c in enumerate(channels)
    ]


def random_injection(batch, seed, channels=SMALL["channels"], dtype="float32"):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.normal(size=(batch, SIZE, SIZE, channels[0])), dtype)


def built_cell(cls=LipschitzMultiscaleCell, dtype="float32", size=SIZE, **kwargs):
    keras.utils.set_random_seed(0)
    cell = cls(**{**SMALL, **kwargs}, dtype=dtype)
    channels = cell.channels
    rng = np.random.default_rng(0)
    z = [
        tf.constant(rng.normal(size=(1, size // 2**i, size // 2**i, c)), dtype)
        for i, c in enumerate(channels)
    ]
    cell(z, tf.constant(rng.normal(size=(1, size, size, channels[0])), dtype))
    return cell


def saturate(cell, seed=0):
    """Every capped conv at its cap, every capped `|gamma|` at its cap, random offsets.

    Large random kernels go through the cell's own constraints, which scale each one down
    to its cap (whatever norm the constraint measures).
    """
    rng = np.random.default_rng(seed)
    for variable in cell.weights:
        cap = variable.constraint
        if isinstance(cap, constraints.ConvOperatorNorm):
            variable.assign(100.0 * rng.normal(size=variable.shape))
        elif cap is not None:
            variable.assign(rng.choice([-5.0, 5.0], size=variable.shape))
        elif "beta" in variable.path:
            variable.assign(rng.normal(size=variable.shape))
    cell.apply_constraints()
    return cell


def conv_layers(cell):
    """Every conv of the cell, with the input size it sees."""
    chains = [*cell.block_inner, *cell.fusions, *cell.post_fusion]
    return [s for chain in chains for s in chain.steps if isinstance(s, keras.layers.Conv2D)]


def exact_conv_norm(kernel, input_size, strides):
    height, width = input_size
    n = height * width * kernel.shape[2]
    basis = np.eye(n).reshape(n, height, width, kernel.shape[2])
    out = tf.nn.conv2d(basis, tf.constant(kernel, tf.float64), strides, "SAME").numpy()
    return np.linalg.svd(out.reshape(n, -1).T, compute_uv=False)[0]


def sample_norms(tensors):
    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(t), axis=[1, 2, 3]) for t in tensors]))


def per_sample(vector):
    return vector[:, None, None, None]


def jacobian_norms(cell, z, x, iterations=30, seed=0):
    """Per-sample `||df/dz||_2` by power iteration on `J^T J` (a JVP, then a VJP)."""

    @tf.function
    def normal_step(v):
        with tf.autodiff.ForwardAccumulator(z, v) as acc:
            out = cell(z, x)
        jv = acc.jvp(out)
        with tf.GradientTape() as tape:
            tape.watch(z)
            out = cell(z, x)
        return tape.gradient(out, z, output_gradients=jv)

    rng = np.random.default_rng(seed)
    v = [tf.constant(rng.normal(size=t.shape), t.dtype) for t in z]
    for _ in range(iterations):
        unit = [t / per_sample(sample_norms(v)) for t in v]
        v = normal_step(unit)
    # For a unit vector u, ||J^T J u|| <= ||J||^2, so this is a lower estimate.
    return tf.sqrt(sample_norms(v))


def max_difference_quotient(cell, batch=500, draws=5, seed=0):
    """Largest `||f(a) - f(b)|| / ||a - b||` over `4 * draws * batch` random pairs."""
    worst = 0.0
    for k in range(draws):
        x = random_injection(batch, seed + 100 * k, cell.channels)
        a = random_state(batch, seed + 100 * k + 1, cell.channels, scale=2.0)
        for distance in (1e-3, 1e-1, 1.0, 10.0):
            d = random_state(batch, seed + 100 * k + 2, cell.channels, scale=distance)
            b = [s + t for s, t in zip(a, d, strict=True)]
            fa, fb = cell(a, x), cell(b, x)
            diff = [s - t for s, t in zip(fa, fb, strict=True)]
            worst = max(worst, float(tf.reduce_max(sample_norms(diff) / sample_norms(d))))
    return worst


def assemble_bound(slope, alpha, beta, softmax, inner, paths, posts):
    """`||diag(L_P) C diag(L_B)||_2` of `lipschitz_bound`'s docstring (NumPy), from the
    inner-path constant of each block, each fusion path's constant and each post-fusion's."""
    n = len(inner)
    weights = np.array(fusion_weights(n, softmax))
    blocks = [slope * ((1 - alpha) + alpha * c if alpha > 0 else 1 + c) for c in inner]
    matrix = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j:
                mix = 1 - beta if beta > 0 and n > 1 else 1.0
                matrix[i, j] = posts[i] * mix * blocks[j]
            else:
                mix = beta * weights[i, j] if beta > 0 else 1.0
                matrix[i, j] = posts[i] * mix * paths[(i, j)] * blocks[j]
    return np.linalg.norm(matrix, 2)


def bound_from_caps(
    cell=None, branches=2, slope=0.4, alpha=0.5, beta=0.3, softmax_weights=True, lc=2.0, lg=1.0
):
    """The bound with every conv norm at `L_c` and every `|gamma|` at `L_g` (of `cell`, or of
    the hyper-parameters given)."""
    if cell is not None:
        branches, slope, alpha, beta = cell.num_branches, cell.slope, cell.alpha, cell.beta
        softmax_weights, lc, lg = cell.softmax_weights, cell.conv_norm_cap, cell.gamma_cap
    n, s = branches, slope
    paths = {
        (i, j): lc * lg * 2 ** (j - i) if j > i else (lc * lg) ** (i - j) * s ** (i - j - 1)
        for i in range(n)
        for j in range(n)
        if i != j
    }
    inner = [s * (lc * lg) ** 2] * n
    return assemble_bound(s, alpha, beta, softmax_weights, inner, paths, [s * lc * lg] * n)


def exact_chain_constant(steps, size):
    """The product of the layers' constants, each conv's its exact operator norm (SVD)."""
    total = 1.0
    for step in steps:
        if isinstance(step, keras.layers.Conv2D):
            total *= exact_conv_norm(step.kernel.numpy(), size, step.strides)
            size = tuple(-(-d // s) for d, s in zip(size, step.strides, strict=True))
        elif isinstance(step, MeanGroupNormalization):
            total *= np.abs(step.gamma.numpy()).max()
        elif isinstance(step, ScaledReLU):
            total *= step.slope
        else:  # nearest upsampling: each pixel copied sy * sx times
            total *= math.sqrt(step.size[0] * step.size[1])
            size = tuple(d * s for d, s in zip(size, step.size, strict=True))
    return total


def bound_from_exact_norms(cell, size):
    """The cell's bound recomputed in NumPy with every conv's exact operator norm."""
    sizes = [(size // 2**i, size // 2**i) for i in range(cell.num_branches)]
    inner = [
        exact_chain_constant([*chain.steps, norm], sizes[i])
        for i, (chain, norm) in enumerate(zip(cell.block_inner, cell.block_norms, strict=True))
    ]
    paths = {
        (i, j): exact_chain_constant(path.steps, sizes[j])
        for (i, j), path in zip(cell._pairs(), cell.fusions, strict=True)
    }
    posts = [exact_chain_constant(p.steps, sizes[i]) for i, p in enumerate(cell.post_fusion)]
    return assemble_bound(
        cell.slope, cell.alpha, cell.beta, cell.softmax_weights, inner, paths, posts
    )


# ------------------------------------------------------------------- (a) the bound
def test_default_bound_is_below_one():
    cell = built_cell(channels=(8, 16), groups=4)
    bound = float(cell.lipschitz_bound())
    assert bound < 1.0
    saturate(cell)
    saturated = float(cell.lipschitz_bound())
    assert saturated == pytest.approx(bound_from_caps(cell), rel=1e-4)
    assert 0.6 < saturated < 0.7  # 0.8 * 0.52 * ||C||_2 = 0.69 for two branches


def test_bound_is_below_one_for_three_branches():
    cell = saturate(built_cell(channels=(4, 8, 8)))
    assert float(cell.lipschitz_bound()) == pytest.approx(bound_from_caps(cell), rel=1e-4)
    assert float(cell.lipschitz_bound()) < 1.0


def test_measured_jacobian_norm_stays_below_the_bound():
    cell = saturate(built_cell())
    bound = float(cell.lipschitz_bound())
    z = random_state(12, 1, scale=2.0)
    x = random_injection(12, 2)
    norms = jacobian_norms(cell, z, x).numpy()
    assert norms.max() <= bound
    assert norms.min() > 0.05 * bound  # the measurement is not vacuous
    radius = keras_deq.jacobian.spectral_radius(lambda s: cell(s, x), z, num_iters=50, seed=0)
    assert float(tf.reduce_max(radius)) <= norms.max() * (1 + 1e-3)


def test_difference_quotients_stay_below_the_bound():
    cell = saturate(built_cell(), seed=1)
    assert max_difference_quotient(cell) <= float(cell.lipschitz_bound())


def test_plain_multiscale_cell_has_no_finite_bound():
    assert math.isinf(float(built_cell(MultiscaleCell).lipschitz_bound()))
    standard = built_cell(normalization="standard", conv_norm_cap=None, gamma_cap=None)
    assert math.isinf(float(standard.lipschitz_bound()))


def test_bound_is_at_least_the_bound_from_exact_conv_norms():
    """The bound's conv factors are upper bounds: with every conv's exact operator norm (the
    largest singular value of its matrix) in their place the bound can only be lower. A
    Krylov estimate from below fails this on 16x16 maps."""
    cell = saturate(built_cell(dtype="float64", size=16, channels=(4, 4), groups=2))
    bound = float(cell.lipschitz_bound())
    exact = bound_from_exact_norms(cell, 16)
    assert bound >= exact * (1 - 1e-12), (bound, exact)
    assert bound <= 1.1 * exact  # and not far above
    assert bound <= bound_from_caps(cell) * (1 + 1e-9)


# Hyper-parameters swept with every branch count and both fusion weightings; some give a
# bound >= 1 at the caps for some branch counts (the constructor must refuse those).
SWEEP = [
    {},
    {"slope": 1.0, "alpha": 0.0, "beta": 0.0, "conv_norm_cap": 0.5},
    {"slope": 0.6, "alpha": 1.0, "beta": 1.0, "gamma_cap": 0.9},
    {"beta": 0.0, "conv_norm_cap": 1.5},
]


@pytest.mark.parametrize("softmax_weights", [True, False])
@pytest.mark.parametrize("branches", [1, 2, 3, 4])
def test_every_accepted_configuration_is_a_contraction_at_its_caps(branches, softmax_weights):
    """Each configuration is refused exactly when its bound at the caps (computed here
    independently) is >= 1; an accepted one, with every conv and `|gamma|` pushed to its cap,
    has `lipschitz_bound() < 1` equal to that bound. Four branches with uniform weights at the
    default caps reach 1.021 and used to be accepted."""
    channels = (4,) * branches
    for extra in SWEEP:
        expected = bound_from_caps(
            branches=branches,
            softmax_weights=softmax_weights,
            lc=extra.get("conv_norm_cap", 2.0),
            lg=extra.get("gamma_cap", 1.0),
            **{k: v for k, v in extra.items() if k in ("slope", "alpha", "beta")},
        )
        kwargs = {"channels": channels, "softmax_weights": softmax_weights, **extra}
        if expected >= 1:
            with pytest.raises(ValueError, match=r"Received: conv_norm_cap="):
                LipschitzMultiscaleCell(groups=2, **kwargs)
            continue
        cell = saturate(built_cell(**kwargs))
        bound = float(cell.lipschitz_bound())
        assert bound < 1.0, (kwargs, bound)
        assert bound == pytest.approx(expected, rel=1e-5), kwargs


@pytest.mark.parametrize(
    "kwargs, received",
    [
        ({"channels": (4, 4, 4, 4), "softmax_weights": False}, "conv_norm_cap=2.0"),
        ({"channels": (4,), "slope": 1.0}, "conv_norm_cap=2.0, gamma_cap=1.0, slope=1.0"),
        ({"conv_norm_cap": math.inf}, "conv_norm_cap=inf"),
        ({"gamma_cap": 3.0}, "conv_norm_cap=2.0, gamma_cap=3.0"),
        ({"normalization": "standard"}, "normalization='standard'"),
        ({"gamma_cap": None}, "gamma_cap=None"),
    ],
)
def test_configurations_that_are_not_contractions_are_refused(kwargs, received):
    for cls in (LipschitzMultiscaleCell, LipschitzMultiscale):
        with pytest.raises(ValueError, match="Received: " + re.escape(received)):
            cls(**{**SMALL, **kwargs})


def test_the_refusal_suggests_a_cap_that_is_accepted():
    kwargs = {"channels": (4, 4, 4, 4), "groups": 2, "softmax_weights": False}
    with pytest.raises(ValueError, match="can reach 1.021") as info:
        LipschitzMultiscaleCell(**kwargs)
    cap = float(re.search(r"e\.g\. conv_norm_cap=([0-9.]+)", str(info.value)).group(1))
    cell = LipschitzMultiscaleCell(**kwargs, conv_norm_cap=cap)
    assert 0.99 < bound_from_caps(cell) < 1.0
    # Without caps the cell makes no claim and is accepted (the plain MDEQ ablation).
    LipschitzMultiscaleCell(**kwargs, normalization="standard", conv_norm_cap=None, gamma_cap=None)


# --------------------------------------------------------------- (c) mean-only GN
def test_mean_group_norm_lipschitz_is_at_most_max_abs_gamma():
    norm = MeanGroupNormalization(2, dtype="float64")
    norm.build((None, 4, 4, 6))
    gamma = np.array([0.3, -1.7, 0.9, 1.2, -0.4, 0.1])
    norm.gamma.assign(gamma)
    norm.beta.assign(np.arange(6.0))
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 4, 4, 6))
    d = rng.normal(size=(2000, 4, 4, 6)) * rng.choice([1e-3, 1.0, 10.0], size=(2000, 1, 1, 1))
    diff = norm(a) - norm(a + d)
    ratio = tf.sqrt(tf.reduce_sum(diff**2, [1, 2, 3])) / tf.sqrt(tf.reduce_sum(d**2, [1, 2, 3]))
    assert float(tf.reduce_max(ratio)) <= np.abs(gamma).max() + 1e-6
    assert float(norm.lipschitz_constant()) == pytest.approx(1.7)
    # It is the group centering (an orthogonal projection), then the affine map.
    groups = a.reshape(2000, 16, 2, 3)  # (batch, pixels, group, channel in group)
    centered = (groups - groups.mean(axis=(1, 3), keepdims=True)).reshape(a.shape)
    np.testing.assert_allclose(norm(a).numpy(), centered * gamma + np.arange(6.0), atol=1e-12)


def test_standard_group_norm_is_not_lipschitz_near_constant_inputs():
    norm = keras.layers.GroupNormalization(2, epsilon=1e-5, dtype="float64")
    norm.build((None, 4, 4, 6))
    rng = np.random.default_rng(0)
    a = 1.0 + 1e-4 * rng.normal(size=(100, 4, 4, 6))
    d = 1e-5 * rng.normal(size=(100, 4, 4, 6))
    diff = norm(a) - norm(a + d)
    ratio = tf.sqrt(tf.reduce_sum(diff**2, [1, 2, 3])) / tf.sqrt(tf.reduce_sum(d**2, [1, 2, 3]))
    assert float(tf.reduce_max(ratio)) > 10.0


# -------------------------------------------------------------- (d) convergence
def test_fixed_point_iteration_reaches_one_fixed_point_from_any_start():
    cell = saturate(built_cell(dtype="float64"), seed=2)
    bound = float(cell.lipschitz_bound())
    x = random_injection(4, 3, dtype="float64")

    def f(z):
        return cell(z, x)

    solutions = []
    for seed, scale in ((4, 0.1), (5, 1.0), (6, 10.0)):
        z0 = random_state(4, seed, dtype="float64", scale=scale)
        result = fixed_point(f, z0, max_iter=300, tol=1e-13, stop_mode="abs")
        assert bool(tf.reduce_all(result.converged))
        solutions.append(result.state)
    for other in solutions[1:]:
        for a, b in zip(solutions[0], other, strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-10)

    # Each step shrinks the residual by at least the bound: ||f(f(z)) - f(z)|| <= L ||f(z) - z||.
    z = random_state(4, 7, dtype="float64", scale=5.0)
    fz = f(z)
    residual = sample_norms([a - b for a, b in zip(fz, z, strict=True)])
    for _ in range(15):
        z, fz = fz, f(fz)
        new = sample_norms([a - b for a, b in zip(fz, z, strict=True)])
        assert bool(tf.reduce_all(new <= bound * residual + 1e-12))
        residual = new


def test_anderson_reaches_the_papers_tolerance_within_18_steps():
    cell = saturate(built_cell(), seed=3)
    x = random_injection(32, 8)
    result = anderson(lambda z: cell(z, x), random_state(32, 9, scale=0.0), max_iter=18, tol=1e-3)
    assert bool(tf.reduce_all(result.converged))


# ------------------------------------------------------ (e) caps survive training
def classifier(deq_layer, stem_channels):
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Conv2D(stem_channels, 3, padding="same", activation="relu")(inputs)
    branches = deq_layer(x)
    pooled = [keras.layers.GlobalAveragePooling2D()(z) for z in branches]
    logits = keras.layers.Dense(3)(keras.layers.Concatenate()(pooled))
    return keras.Model(inputs, logits)


def test_caps_hold_after_training_with_a_large_learning_rate():
    keras.utils.set_random_seed(0)
    layer = LipschitzMultiscale(**SMALL, solver="fixed_point", max_iter=30, tol=1e-4, name="deq")
    model = classifier(layer, SMALL["channels"][0])
    model.compile(
        keras.optimizers.Adam(1e-1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(320, SIZE, SIZE, 1)).astype("float32")
    y = rng.integers(0, 3, size=320)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert len(history.history["loss"]) == 1 and np.isfinite(history.history["loss"][0])

    cell = layer.cell
    norms, bounds = [], []
    for conv in conv_layers(cell):
        cap = conv.kernel_constraint
        norms.append(exact_conv_norm(conv.kernel.numpy(), cap.input_shape[:2], cap.strides))
        bounds.append(float(cap.norm(conv.kernel)))
    assert max(norms) <= cell.conv_norm_cap * (1 + 1e-6)  # a guarantee, not an estimate
    assert max(bounds) >= 0.99 * cell.conv_norm_cap  # the cap was active
    gammas = [v.numpy() for v in cell.weights if v.path.endswith("gamma")]
    assert max(np.abs(g).max() for g in gammas) <= cell.gamma_cap
    assert float(cell.lipschitz_bound()) < 1.0


# ---------------------------------------------------- (f) the plain MDEQ special case
def reference_mdeq(cell, z, x):
    """MDEQ's equations written out with `tf.nn` ops and the cell's weights."""

    def apply(step, v):
        if isinstance(step, keras.layers.Conv2D):
            return tf.nn.conv2d(v, step.kernel, step.strides, "SAME")
        if isinstance(step, keras.layers.GroupNormalization):
            batch, height, width, channels = v.shape
            g = tf.reshape(v, (batch, height, width, step.groups, channels // step.groups))
            mean, var = tf.nn.moments(g, axes=[1, 2, 4], keepdims=True)
            g = (g - mean) / tf.sqrt(var + 1e-5)
            return tf.reshape(g, v.shape) * step.gamma + step.beta
        if isinstance(step, ScaledReLU):
            return tf.nn.relu(v)
        factor = step.size[0]
        return tf.repeat(tf.repeat(v, factor, axis=1), factor, axis=2)

    def chain(steps, v):
        for step in steps:
            v = apply(step, v)
        return v

    n = len(z)
    blocks = []
    for i in range(n):
        inner = chain(cell.block_inner[i].steps, z[i]) + (x if i == 0 else 0.0)
        blocks.append(tf.nn.relu(z[i] + apply(cell.block_norms[i], inner)))
    paths = dict(zip(cell._pairs(), cell.fusions, strict=True))
    fused = [
        blocks[i] + sum(chain(paths[(i, j)].steps, blocks[j]) for j in range(n) if j != i)
        for i in range(n)
    ]
    return [chain(cell.post_fusion[i].steps, fused[i]) for i in range(n)]


def test_multiscale_cell_follows_the_mdeq_equations():
    cell = built_cell(MultiscaleCell, channels=(4, 8, 8))
    for variable in cell.weights:
        if "beta" in variable.path or "gamma" in variable.path:
            variable.assign(np.random.default_rng(0).normal(size=variable.shape))
    z = random_state(3, 1, cell.channels)
    x = random_injection(3, 2, cell.channels)
    for got, want in zip(cell(z, x), reference_mdeq(cell, z, x), strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


def test_unit_slope_zero_mixes_and_standard_norm_give_the_mdeq_cell():
    plain = built_cell(MultiscaleCell, channels=(4, 8, 8))
    lipschitz = built_cell(
        channels=(4, 8, 8),
        slope=1.0,
        alpha=0.0,
        beta=0.0,
        normalization="standard",
        conv_norm_cap=None,
        gamma_cap=None,
    )
    rng = np.random.default_rng(0)
    lipschitz.set_weights([rng.normal(size=w.shape) for w in lipschitz.get_weights()])
    plain.set_weights(lipschitz.get_weights())
    z = random_state(3, 1, plain.channels)
    x = random_injection(3, 2, plain.channels)
    for a, b in zip(plain(z, x), lipschitz(z, x), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_fusion_weights_rows_sum_to_one_and_penalize_upsampling():
    for n in (2, 3, 4):
        for softmax in (False, True):
            weights = np.array(fusion_weights(n, softmax))
            np.testing.assert_allclose(weights.sum(axis=1), 1.0)
            assert np.all(np.diag(weights) == 0)
    weights = fusion_weights(4, softmax=True)
    # Branch 0 receives only upsampled paths, by 1, 2, 3 levels: softmax(-1, -2, -3).
    scores = np.exp(-np.arange(1.0, 4.0))
    np.testing.assert_allclose(weights[0][1:], scores / scores.sum())
    # The coarsest branch receives only downsampled paths: uniform.
    np.testing.assert_allclose(weights[3][:3], 1 / 3)


# --------------------------------------------------- (g) implicit gradient = unrolled
def test_implicit_gradient_equals_autodiff_through_a_long_unrolled_iteration():
    layer = LipschitzMultiscale(
        **SMALL,
        solver="anderson",
        max_iter=100,
        tol=1e-13,
        backward_tol=1e-13,
        backward_max_iter=100,
        stop_mode="abs",
        on_failure="raise",
        dtype="float64",
    )
    x = random_injection(2, 1, dtype="float64")
    layer.build(x.shape)
    saturate(layer.cell, seed=4)
    rng = np.random.default_rng(5)
    weights = [tf.constant(rng.normal(size=(2, *shape))) for shape in layer.state_shape]

    def loss(z):
        return tf.add_n([tf.reduce_sum(w * t) for w, t in zip(weights, z, strict=True)])

    variables = layer.cell.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        implicit = loss(layer(x, training=True))
        z = [tf.zeros_like(w) for w in weights]
        for _ in range(80):  # a contraction by at most the bound (< 0.7): error < 1e-13
            z = layer.cell(z, x)
        unrolled = loss(z)
    np.testing.assert_allclose(implicit.numpy(), unrolled.numpy(), rtol=1e-12)
    got = tape.gradient(implicit, [x, *variables])
    want = tape.gradient(unrolled, [x, *variables])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------- (h) config and saving
@pytest.mark.parametrize("cls", [MultiscaleCell, LipschitzMultiscaleCell])
def test_cell_config_round_trip(cls):
    cell = cls(channels=[4, 8, 8], groups=2, expansion=2)
    config = keras.saving.serialize_keras_object(cell)
    assert config["registered_name"] == f"keras_deq>{cls.__name__}"
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is cls
    assert restored.get_config() == cell.get_config()


@pytest.mark.parametrize("cls", [MultiscaleDEQ, LipschitzMultiscale])
def test_layer_config_round_trip(cls):
    layer = cls(channels=(4, 8), groups=2, max_iter=12, tol=1e-3, solver="fixed_point")
    restored = cls.from_config(layer.get_config())
    assert restored.get_config() == layer.get_config()
    assert type(restored.cell) is type(layer.cell)
    assert restored.cell.get_config()["channels"] == [4, 8]


def test_lipschitz_layer_passes_its_hyper_parameters_to_the_cell():
    layer = LipschitzMultiscale(**SMALL, slope=0.3, alpha=0.25, beta=0.5, conv_norm_cap=1.5)
    assert (layer.cell.slope, layer.cell.alpha, layer.cell.beta) == (0.3, 0.25, 0.5)
    assert layer.get_config()["conv_norm_cap"] == 1.5


@pytest.mark.parametrize("cls", [MultiscaleDEQ, LipschitzMultiscale])
def test_keras_file_save_and_load(cls, tmp_path):
    keras.utils.set_random_seed(1)
    layer = cls(**SMALL, max_iter=20, tol=1e-4, on_failure="ignore", name="deq")
    model = classifier(layer, SMALL["channels"][0])
    x = np.random.default_rng(0).normal(size=(4, SIZE, SIZE, 1)).astype("float32")
    before = model.predict(x, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), before, rtol=1e-5, atol=1e-6)
    layer = loaded.get_layer("deq")
    assert type(layer) is cls
    assert layer.state_shape == [(8, 8, 4), (4, 4, 8)]
    if cls is LipschitzMultiscale:
        assert all(
            isinstance(c.kernel_constraint, constraints.ConvOperatorNorm)
            for c in conv_layers(layer.cell)
        )


def test_layer_output_is_the_list_of_branch_states():
    layer = MultiscaleDEQ(channels=(4, 8, 8), groups=2, max_iter=5, on_failure="ignore")
    out = layer(random_injection(2, 0))
    assert [tuple(t.shape) for t in out] == [(2, 8, 8, 4), (2, 4, 4, 8), (2, 2, 2, 8)]
    assert layer.compute_output_shape((None, 8, 8, 4)) == [
        (None, 8, 8, 4),
        (None, 4, 4, 8),
        (None, 2, 2, 8),
    ]


# ------------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"slope": 0.0}, "slope=0.0"),
        ({"slope": 1.5}, "slope=1.5"),
        ({"alpha": -0.1}, "alpha=-0.1"),
        ({"alpha": 1.2}, "alpha=1.2"),
        ({"beta": 2}, "beta=2"),
        ({"normalization": "batch"}, "normalization='batch'"),
        ({"conv_norm_cap": 0.0}, "conv_norm_cap=0.0"),
        ({"gamma_cap": -1.0}, "gamma_cap=-1.0"),
        ({"norm_iterations": 0}, "norm_iterations=0"),
        ({"channels": ()}, r"channels=\(\)"),
        ({"channels": (4, 5)}, r"channels=\(4, 5\)"),
        ({"expansion": 0}, "expansion=0"),
    ],
)
def test_bad_hyper_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match="Received: " + message):
        LipschitzMultiscaleCell(**{**SMALL, **kwargs})


def test_bad_shapes_are_refused():
    cell = MultiscaleCell(channels=(4, 8, 8), groups=2)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*\\(branches - 1\\) = 4"):
        cell.state_shapes((None, 6, 6, 4))
    with pytest.raises(ValueError, match="channels\\[0\\]=4"):
        cell.state_shapes((None, 8, 8, 3))
    with pytest.raises(ValueError, match="The state must be a list of 3 maps"):
        cell(random_state(1, 0, (4, 8)), random_injection(1, 0, (4, 8)))


# ------------------------------------------------------------------------ the example
def load_example():
    spec = importlib.util.spec_from_file_location("vision_multiscale_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["lipschitz", pytest.param("mdeq", marks=pytest.mark.slow)])
def test_vision_example_runs_on_digits(model, capsys):
    accuracy = load_example().main(
        ["--model", model, "--epochs", "1", "--limit", "256", "--channels", "4,8"]
    )
    out = capsys.readouterr().out
    for column in ("test acc", "fwd steps", "bwd steps", "epoch s"):
        assert column in out
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.slow
def test_vision_example_runs_on_mocked_cifar10(capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        accuracy = load_example().main(["--dataset", "cifar10", "--epochs", "1", "--limit", "10"])
    assert "(32, 32, 3)" in capsys.readouterr().out
    assert 0.0 <= accuracy <= 1.0
