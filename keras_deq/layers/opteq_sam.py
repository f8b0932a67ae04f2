"""The sequential averaging method (SAM, Xie et al., TPAMI 2023, Eq. 11) of OptEq.

`sam_iteration` runs `z^k = beta_k S(z^{k-1}) + (1 - beta_k) T(z^{k-1}, x)` with
`S(z) = (1 - gamma beta_k) z - gamma grad R(z)` and `beta_k = rho / k^c`: among the
fixed points of a nonexpansive `T` it selects the one with the least prior `R`
(Theorem 5, checked by `check_sam_schedule`). Without a prior it is plain iteration,
which `OptEqBlock` unrolls in training.
"""

from keras import ops

from keras_deq import backend
from keras_deq.layers._opteq_checks import scalar
from keras_deq.solvers.common import check_positive_float, check_positive_int


def check_sam_schedule(rho, c):
    """Refuses `(rho, c)` outside Theorem 5's `rho, c > 0`, `rho + 2c < 1`."""
    rho = check_positive_float("sam_rho", rho, finite=False)
    c = check_positive_float("sam_c", c, finite=False)
    if not rho + 2.0 * c < 1.0:
        raise ValueError(
            "The SAM schedule beta_k = rho / k^c needs rho + 2c < 1 (Theorem 5). "
            f"Received: sam_rho={rho}, sam_c={c}"
        )
    return rho, c


def sam_iteration(fn, z0, steps, grad_r=None, rho=0.5, c=0.2, gamma=0.1):
    """`steps` iterations of the sequential averaging method (SAM, Eq. 11).

    `z^k = beta_k S_k(z^{k-1}) + (1 - beta_k) fn(z^{k-1})` for `k = 1..steps`,
    with `beta_k = rho / k^c` and `S_k(z) = (1 - gamma beta_k) z - gamma grad_r(z)`.
    For a nonexpansive `fn` with many fixed points it tends to the fixed point
    with the least `R` (Theorem 5, for `rho + 2c < 1` and `gamma = 1 / (2 L)`
    where `L` is the Lipschitz constant of `grad_r`). With `grad_r=None` it is
    plain iteration `z^k = fn(z^{k-1})` (Remark 2). A loop with a static trip
    count (`keras_deq.backend.differentiable_loop`): differentiable by autodiff
    (the unrolled gradient of Eq. 12) on every backend, usable in graph mode and
    under XLA.

    Args:
        fn: The map `T`, a function of a tensor returning a tensor of its shape.
        z0: The start (the paper uses the injection `x`).
        steps: Number of iterations `K >= 1`.
        grad_r: The gradient of the prior, `z -> grad R(z)`, or None.
        rho: `rho` of the schedule (ignored when `grad_r` is None).
        c: `c` of the schedule.
        gamma: The step `gamma` of `S`.

    Returns:
        `z^K`, a tensor like `z0`.

    Examples:
        >>> import keras
        >>> z = sam_iteration(lambda z: 0.5 * z + 1.0, keras.ops.zeros((1, 2)), steps=60)
        >>> [round(v, 4) for v in keras.ops.convert_to_numpy(z)[0].tolist()]
        [2.0, 2.0]
    """
    steps = check_positive_int("steps", steps)
    z0 = ops.convert_to_tensor(z0)
    dtype = z0.dtype

    def plain(state):
        k, z = state
        return k + 1, fn(z)

    def averaged(state):
        k, z = state
        beta = scalar(rho, dtype) / ops.power(ops.cast(k, dtype), scalar(c, dtype))
        step = scalar(gamma, dtype)
        s = (1.0 - step * beta) * z - step * grad_r(z)
        return k + 1, beta * s + (1.0 - beta) * fn(z)

    start = (ops.convert_to_tensor(1, "int32"), z0)
    _, z = backend.differentiable_loop(plain if grad_r is None else averaged, start, steps)
    return z
