"""The Lipschitz multiscale cell: the Lipschitz bound against measurements, refusals, solving.

The Lipschitz checks run on "saturated" cells: every conv pushed to its
operator-norm cap and every `|gamma|` to its cap, with random offsets, so that
the bound is as large as the constraints allow. The measurements (Jacobian norms
by power iteration on `J^T J`, difference quotients over random pairs) are lower
estimates of the true Lipschitz constant, so each must stay below the bound.
"""

import math
import re

import keras
import numpy as np
import pytest
from conv_references import exact_norm
from keras import ops
from multiscale_references import SMALL, built_cell, random_injection, random_state, saturate

import keras_deq
from keras_deq.layers.lipschitz_multiscale_cell import LipschitzMultiscaleCell
from keras_deq.layers.multiscale_blocks import MeanGroupNormalization, ScaledReLU, fusion_weights
from keras_deq.layers.multiscale_cell import MultiscaleCell
from keras_deq.layers.multiscale_deq import LipschitzMultiscale
from keras_deq.solvers import anderson, fixed_point


# ------------------------------------------------------------------ helpers
def sample_norms(tensors):
    return ops.sqrt(sum(ops.sum(ops.square(t), axis=[1, 2, 3]) for t in tensors))


def per_sample(vector):
    return vector[:, None, None, None]


def normal_product(cell, z, x):
    """`v -> J^T J v` for `J = df/dz` of `f = cell(., x)` at `z` (a JVP, then a VJP), by the
    backend's autodiff, compiled."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        @tf.function
        def step(v):
            with tf.autodiff.ForwardAccumulator(z, v) as acc:
                out = cell(z, x)
            jv = acc.jvp(out)
            with tf.GradientTape() as tape:
                tape.watch(z)
                out = cell(z, x)
            return tape.gradient(out, z, output_gradients=jv)

        return step
    if keras.backend.backend() == "torch":
        from torch.func import jvp, vjp  # noqa: PLC0415

        def f_torch(*s):
            return tuple(cell(list(s), x))

        def step_torch(v):
            _, jv = jvp(f_torch, tuple(z), tuple(v))
            return vjp(f_torch, *z)[1](jv)

        return step_torch
    import jax  # noqa: PLC0415

    def f(s):
        return cell(s, x)

    @jax.jit
    def step(v):
        _, jv = jax.jvp(f, (z,), (v,))
        return jax.vjp(f, z)[1](jv)[0]

    return step


def jacobian_norms(cell, z, x, iterations=30, seed=0):
    """Per-sample `||df/dz||_2` by power iteration on `J^T J` (a JVP, then a VJP)."""
    normal_step = normal_product(cell, z, x)
    rng = np.random.default_rng(seed)
    v = [ops.convert_to_tensor(rng.normal(size=t.shape), t.dtype) for t in z]
    for _ in range(iterations):
        unit = [t / per_sample(sample_norms(v)) for t in v]
        v = list(normal_step(unit))
    # For a unit vector u, ||J^T J u|| <= ||J||^2, so this is a lower estimate.
    return ops.sqrt(sample_norms(v))


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
            worst = max(worst, float(ops.max(sample_norms(diff) / sample_norms(d))))
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
            total *= exact_norm(step.kernel.numpy(), size, step.strides)
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


# ------------------------------------------------------------------ the bound
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
    norms = np.asarray(jacobian_norms(cell, z, x))
    assert norms.max() <= bound
    assert norms.min() > 0.05 * bound  # the measurement is not vacuous
    radius = keras_deq.jacobian.spectral_radius(lambda s: cell(s, x), z, num_iters=50, seed=0)
    assert float(ops.max(radius)) <= norms.max() * (1 + 1e-3)


def test_difference_quotients_stay_below_the_bound():
    cell = saturate(built_cell(), seed=1)
    assert max_difference_quotient(cell) <= float(cell.lipschitz_bound())


@pytest.mark.float64
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


# ------------------------------------------------------------------ convergence
@pytest.mark.float64
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
        assert bool(ops.all(result.converged))
        solutions.append(result.state)
    for other in solutions[1:]:
        for a, b in zip(solutions[0], other, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-10)

    # Each step shrinks the residual by at least the bound: ||f(f(z)) - f(z)|| <= L ||f(z) - z||.
    z = random_state(4, 7, dtype="float64", scale=5.0)
    fz = f(z)
    residual = sample_norms([a - b for a, b in zip(fz, z, strict=True)])
    for _ in range(15):
        z, fz = fz, f(fz)
        new = sample_norms([a - b for a, b in zip(fz, z, strict=True)])
        assert bool(ops.all(new <= bound * residual + 1e-12))
        residual = new


def test_anderson_reaches_the_papers_tolerance_within_18_steps():
    cell = saturate(built_cell(), seed=3)
    x = random_injection(32, 8)
    result = anderson(lambda z: cell(z, x), random_state(32, 9, scale=0.0), max_iter=18, tol=1e-3)
    assert bool(ops.all(result.converged))


# ------------------------------------------------------------------ the plain MDEQ special case
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
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ argument checks
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
