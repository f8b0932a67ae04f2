"""The SAM iteration (`sam_iteration`): the fixed point it selects, plain iteration, XLA."""

import numpy as np
import pytest
from keras import ops
from opteq_references import compiled

from keras_deq.layers.opteq_sam import check_sam_schedule, sam_iteration

F64 = "float64"


def _projector_problem(seed=0):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 3)))
    projector = basis @ basis.T  # nonexpansive, Fix = a 3-dim subspace
    anchor = rng.normal(size=6)
    return projector, anchor, projector @ anchor  # argmin_{z in Fix} 1/2 ||z - a||^2


@pytest.mark.float64
def test_sam_selects_the_least_prior_fixed_point_of_a_projector():
    projector, anchor, target = _projector_problem()
    p = ops.convert_to_tensor(projector, F64)
    a = ops.convert_to_tensor(anchor[None, :], F64)
    z0 = ops.convert_to_tensor(np.random.default_rng(1).normal(size=(1, 6)) * 2.0, F64)

    def run(steps, grad_r):
        solve = compiled(
            lambda z0: sam_iteration(
                lambda z: ops.matmul(z, p), z0, steps, grad_r=grad_r, rho=0.5, c=0.2, gamma=0.5
            )
        )
        return float(np.linalg.norm(np.asarray(solve(z0))[0] - target))

    errors = [run(k, lambda z: z - a) for k in (20, 100, 1_000, 10_000)]
    plain = run(1_000, None)  # plain iteration stops at P z0, another fixed point
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.2 and plain > 1.0
    assert errors[-1] < plain / 5


@pytest.mark.float64
def test_sam_without_prior_is_plain_iteration():
    w = np.random.default_rng(2).normal(size=(4, 4)) * 0.3
    z = np.ones((2, 4))
    out = sam_iteration(lambda v: ops.tanh(ops.matmul(v, w) + 1.0), ops.convert_to_tensor(z), 7)
    for _ in range(7):
        z = np.tanh(z @ w + 1.0)
    np.testing.assert_allclose(np.asarray(out), z, rtol=1e-12)


@pytest.mark.float64
@pytest.mark.tensorflow_only("tf.function and XLA")
def test_sam_runs_in_graph_mode_and_under_xla():
    import tensorflow as tf  # noqa: PLC0415

    projector, anchor, _ = _projector_problem(3)
    p, a = tf.constant(projector, F64), tf.constant(anchor[None, :], F64)

    def run(z0):
        return sam_iteration(lambda z: tf.matmul(z, p), z0, 50, grad_r=lambda z: z - a)

    z0 = tf.zeros((1, 6), F64)
    eager = run(z0).numpy()
    np.testing.assert_allclose(tf.function(run)(z0).numpy(), eager, rtol=1e-12)
    np.testing.assert_allclose(tf.function(run, jit_compile=True)(z0).numpy(), eager, rtol=1e-10)


def test_sam_schedule_and_steps_are_checked():
    with pytest.raises(ValueError, match="rho \\+ 2c < 1"):
        check_sam_schedule(0.5, 0.3)
    with pytest.raises(ValueError, match="sam_rho"):
        check_sam_schedule(0.0, 0.2)
    with pytest.raises(ValueError, match="sam_c"):
        check_sam_schedule(0.5, -0.1)
    with pytest.raises(ValueError, match="steps"):
        sam_iteration(lambda z: z, ops.zeros((1, 2)), 0)


@pytest.mark.float64
def test_float64_sam_uses_its_float64_hyper_parameters():
    """`gamma`, `rho`, `c` enter float64 computations unrounded (not through float32)."""
    z = np.random.default_rng(23).normal(size=(3, 4))
    w = np.random.default_rng(24).normal(size=(4, 4)) * 0.3
    out = sam_iteration(
        lambda v: ops.tanh(ops.matmul(v, w)),
        ops.convert_to_tensor(z),
        5,
        lambda v: v,
        rho=0.3,
        c=0.1,
        gamma=0.7,
    )
    for k in range(1, 6):
        beta = 0.3 / k**0.1
        z = beta * ((1 - 0.7 * beta) * z - 0.7 * z) + (1 - beta) * np.tanh(z @ w)
    np.testing.assert_allclose(np.asarray(out), z, rtol=1e-13, atol=0)
