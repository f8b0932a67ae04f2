"""The sequential averaging method (SAM, Xie et al., TPAMI 2023, Eq. 11) of OptEq.

The iteration is the solver `keras_deq.solvers.SAM`, on the loop every solver shares;
`OptEqBlock` runs it through its `DEQ`. `sam_iteration` is its function form on a
map and a start (`K` steps, differentiable), and `check_sam_schedule` checks the
schedule under the names of the OptEq layers' arguments (`sam_rho`, `sam_c`).
"""

from keras_deq.solvers.base import differentiable_loops
from keras_deq.solvers.common import check_positive_int
from keras_deq.solvers.fixed_point import FixedPoint
from keras_deq.solvers.sam import SAM, check_schedule


def check_sam_schedule(rho, c):
    """Refuses `(rho, c)` outside Theorem 5's `rho, c > 0`, `rho + 2c < 1`."""
    return check_schedule(rho, c, names=("sam_rho", "sam_c"))


def sam_iteration(fn, z0, steps, grad_r=None, rho=0.5, c=0.2, gamma=0.1):
    """`steps` iterations of the sequential averaging method (SAM, Eq. 11).

    `z^k = beta_k S_k(z^{k-1}) + (1 - beta_k) fn(z^{k-1})` for `k = 1..steps`,
    with `beta_k = rho / k^c` and `S_k(z) = (1 - gamma beta_k) z - gamma grad_r(z)`.
    For a nonexpansive `fn` with many fixed points it tends to the fixed point
    with the least `R` (Theorem 5, for `rho + 2c < 1` and `gamma = 1 / (2 L)`
    where `L` is the Lipschitz constant of `grad_r`). With `grad_r=None` it is
    plain iteration `z^k = fn(z^{k-1})` (Remark 2). The function form of
    `keras_deq.solvers.SAM(max_iter=steps, rho=rho, c=c, gamma=gamma)` (of
    `FixedPoint(max_iter=steps, fixed_steps=True)` without `grad_r`), run in
    `differentiable_loops`: differentiable by autodiff (the unrolled gradient
    of Eq. 12) on every backend, usable in graph mode and under XLA. A sample
    for which `fn` gives NaN or Inf is frozen at its last finite iterate.

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
    if grad_r is None:
        solver, maps = FixedPoint(max_iter=steps, fixed_steps=True), {}
    else:
        solver = SAM(max_iter=steps, rho=rho, c=c, gamma=gamma)
        maps = {"prior_gradient": grad_r}
    with differentiable_loops():
        return solver(fn, z0, **maps).state
