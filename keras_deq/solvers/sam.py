"""The sequential averaging method (SAM) of OptEq (Xie et al., TPAMI 2023, Eq. 11)."""

import keras
from keras import ops

from keras_deq.solvers import common
from keras_deq.solvers.base import Solver


def check_schedule(rho, c, names=("rho", "c")):
    """`(rho, c)` as floats, refused outside Theorem 5's `rho, c > 0`, `rho + 2c < 1`.

    Args:
        rho: `rho` of the schedule `beta_k = rho / k^c`.
        c: Its `c`.
        names: The arguments' names, for the messages.

    Returns:
        `(rho, c)`.
    """
    rho = common.check_positive_float(names[0], rho, finite=False)
    c = common.check_positive_float(names[1], c, finite=False)
    if not rho + 2.0 * c < 1.0:
        raise ValueError(
            "The SAM schedule beta_k = rho / k^c needs rho + 2c < 1 (Theorem 5). "
            f"Received: {names[0]}={rho}, {names[1]}={c}"
        )
    return rho, c


class _WithPrior:
    """The map `f` with the prior's gradient beside it: the shared loop evaluates `f`
    and hands this object to `SAM.step`, which reads `prior_gradient`."""

    def __init__(self, f, prior_gradient):
        self.f, self.prior_gradient = f, prior_gradient

    def __call__(self, z):
        return self.f(z)


@keras.saving.register_keras_serializable(package="keras_deq")
class SAM(Solver):
    """The sequential averaging method: among the fixed points of `f`, the least prior's.

    Iterates Eq. 11 of OptEq (Xie et al., TPAMI 2023) for `k = 1, 2, ...`:

    ```
    z_k = beta_k S_k(z_{k-1}) + (1 - beta_k) f(z_{k-1}),
    S_k(z) = (1 - gamma beta_k) z - gamma grad R(z),   beta_k = rho / k^c.
    ```

    For a nonexpansive `f` whose fixed points are many, `z_k` tends to the fixed
    point with the least prior `R` (Theorem 5, for a convex `R` with `grad R`
    `L`-Lipschitz, `rho, c > 0`, `rho + 2c < 1` and `gamma = 1 / (2 L)`); without
    `beta_k` (Remark 2) it is plain iteration. By default it runs exactly
    `max_iter` steps and returns `z_{max_iter}` (`fixed_steps`, the paper's
    unrolled SAM); its residuals are `||f(z) - z||` at the iterate before, so
    they say how far from a fixed point of `f` the iteration has come.

    The prior's gradient is a map of the state, not a setting: it is passed with
    the problem, `solver(f, z0, prior_gradient=grad_r)` (a structure-to-structure
    map like `f`), and a `keras_deq.DEQ` passes its cell's method
    `prior_gradient(z)` when the cell has one (as `OptEqBlock`'s does). A prior
    is a property of the problem, like `f`, while the solver keeps plain
    settings (`rho`, `c`, `gamma`) that serialize; without `prior_gradient`,
    `R = 0`.

    Args:
        max_iter: Number of iterations (each evaluates `f` once), `K`.
        tol: Tolerance on the residual named by `stop_mode`; with `fixed_steps`
            it only decides `converged`.
        stop_mode: `"rel"` for `||f(z) - z|| / ||f(z)||`, `"abs"` for `||f(z) - z||`.
        rho: `rho` of the schedule, > 0.
        c: `c` of the schedule, > 0, with `rho + 2c < 1`.
        gamma: The prior's step `gamma >= 0`.
        fixed_steps: If True (default), run exactly `max_iter` iterations and
            return the last iterate; if False, stop at `tol` and return the best
            iterate, as the other solvers do (see `Solver`).

    Examples:
        >>> from keras import ops
        >>> # f projects onto the line z_0 = z_1, so every (t, t) is a fixed point and
        >>> # plain iteration stays at the start (0, 0). The prior 1/2 ||z - (2, 0)||^2
        >>> # selects (1, 1), which SAM approaches (slowly, as beta_k vanishes).
        >>> f = lambda z: ops.repeat(ops.mean(z, axis=1, keepdims=True), 2, axis=1)
        >>> grad_r = lambda z: z - ops.convert_to_tensor([[2.0, 0.0]])
        >>> result = SAM(max_iter=1000, gamma=0.5)(f, ops.zeros((1, 2)), prior_gradient=grad_r)
        >>> [round(v, 2) for v in ops.convert_to_numpy(result.state)[0].tolist()]
        [0.95, 0.82]
    """

    extra_maps = ("prior_gradient",)
    cheap_step = True

    def __init__(
        self,
        max_iter=50,
        tol=1e-4,
        stop_mode="rel",
        rho=0.5,
        c=0.2,
        gamma=0.1,
        fixed_steps=True,
    ):
        super().__init__(max_iter, tol, stop_mode)
        self.rho, self.c = check_schedule(rho, c)
        self.gamma = common.check_nonnegative_float("gamma", gamma)
        self.fixed_steps = common.check_bool("fixed_steps", fixed_steps)

    def solve_flat(self, f, z0, unpack=None, prior_gradient=None, trace=False):
        return super().solve_flat(_WithPrior(f, prior_gradient), z0, unpack, trace)

    def step(self, f, z, fz, state, k):
        # Python floats take the iterate's dtype exactly (no float32 rounding in float64).
        dtype = z.dtype
        step = ops.cast(k + 1, dtype)  # the loop's k is 0 for z0: this is Eq. 11's k
        beta = ops.convert_to_tensor(self.rho, dtype) / ops.power(
            step, ops.convert_to_tensor(self.c, dtype)
        )
        gamma = ops.convert_to_tensor(self.gamma, dtype)
        s = (1.0 - gamma * beta) * z
        if f.prior_gradient is not None:
            s = s - gamma * f.prior_gradient(z)
        return beta * s + (1.0 - beta) * fz, state
