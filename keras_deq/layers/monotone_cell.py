"""`MonotoneCell`: one splitting step of a monotone operator DEQ (Winston & Kolter, 2020).

The monDEQ's equilibrium is `z* = relu(W z* + U x + b)` with

    W = (1 - m) I - A^T A + B - B^T,

`A` and `B` free `n x n` matrices and `m > 0`. The symmetric part of `I - W` is
`m I + A^T A`, so `I - W` is strongly monotone (`I - W >= m I`) for every `A` and `B`:
the equilibrium is the unique zero of the monotone inclusion
`0 in (I - W) z - (U x + b) + N(z)`, `N` the normal cone of the nonnegative orthant
(whose resolvent is `relu`), and it exists for every input. Operator splitting
reaches it; plain iteration of `z -> relu(W z + U x + b)` need not (`W` may have
any norm).
"""

import keras
from keras import ops

from keras_deq import linalg
from keras_deq.layers.cell import Cell
from keras_deq.solvers.common import (
    check_positive_float,
    check_positive_int,
    get_keras_object,
)

# The splittings, each a map of the solver's state (see `MonotoneCell`).
SPLITTINGS = ("peaceman_rachford", "forward_backward")

# The squarings of `linalg.dense_spectral_norm_upper` behind the step sizes: the bound
# on `L = ||I - W||_2` is then at most `n^(1/64)` above it (1.07 for n = 64).
_NORM_SQUARINGS = 5


def check_splitting(splitting):
    if splitting not in SPLITTINGS:
        raise ValueError(
            f"`splitting` must be one of {SPLITTINGS}. Received: splitting={splitting!r}"
        )
    return splitting


def check_alpha(alpha, splitting):
    """None, or (Peaceman-Rachford only) a finite positive float."""
    if alpha is None:
        return None
    if splitting == "forward_backward":
        raise ValueError(
            "Forward-backward splitting converges only for a step alpha < 2 m / L^2, "
            "L = ||I - W||_2, which changes with the weights: the cell computes it at every "
            "call (alpha = m / L^2). Leave `alpha` as None, or use "
            "splitting='peaceman_rachford', which converges for every alpha > 0. "
            f"Received: alpha={alpha!r}"
        )
    return check_positive_float("alpha", alpha)


@keras.saving.register_keras_serializable(package="keras_deq")
class MonotoneCell(Cell):
    """One step of an operator splitting for `z = relu(W z + U x + b)`, `I - W >= m I`.

    `W = (1 - m) I - A^T A + B - B^T` (column-vector convention; the cell applies
    its transpose to the rows of the `(batch, units)` state). `I - W` is strongly
    monotone with parameter `m` whatever `A` and `B` are, so the equilibrium exists
    and is unique, and each splitting below is a contraction of its state (in the
    Euclidean norm), so plain fixed-point iteration of the cell converges to it from
    any start, at every weight norm. With `L = ||I - W||_2` and `u = U x + b`:

    - `"peaceman_rachford"` (default): the state is `v`, with `z = relu(v)`; one step is
      `r = 2 relu(v) - v`, `v <- 2 (I + alpha (I - W))^{-1} (r + alpha u) - r`, a
      contraction for every `alpha > 0` (factor `(1 - 4 alpha m / (1 + alpha L)^2)^(1/2)`
      at worst). It needs the inverse of an `n x n` matrix, shared by the batch;
      inside a compiled solve (XLA: JAX, and TensorFlow's default solves) it is
      computed once per solve, outside the loop, since it does not depend on the
      state. `alpha` is fixed, or by default `1 / sqrt(m L_up)`, with `L_up` the
      upper bound on `L` below.
    - `"forward_backward"`: the state is `z` itself; one step is
      `z <- relu(z - alpha ((I - W) z - u))` with `alpha = m / L_up^2`, where `L_up`
      is `keras_deq.linalg.dense_spectral_norm_upper(I - W)`, a certified upper bound
      on `L` (within `n^(1/64)` of it) recomputed from the weights at every call: a
      contraction by `(1 - m^2 / L_up^2)^(1/2)`, which is slow when `L / m` is large.

    Both steps are plain iterations of the cell (a `keras_deq.solvers.FixedPoint`
    with `damping=1`; a damping `t` in (0, 1] keeps the contraction).
    `FixedPoint(damping=alpha)` on the cell `relu(W z + u)` is not
    forward-backward splitting: it averages outside the `relu`,
    `z + alpha (relu(W z + u) - z)`, and has no such guarantee.

    The step size is computed without gradient: the equilibrium `z*` does not depend
    on it, so its gradient is exact. Use `readout(state)` to get `z*` from the
    state a solver returns (`keras_deq.MonDEQ` does).

    Args:
        units: Size of the state (`n`).
        monotonicity: `m > 0`, the strong monotonicity of `I - W`. Larger `m` makes
            the splittings converge faster and restricts `W` more (its symmetric
            part is at most `(1 - m) I`). The paper's code uses 0.1 for its fully connected model.
        splitting: `"peaceman_rachford"` or `"forward_backward"`.
        alpha: Peaceman-Rachford's step, a positive float, or None for
            `1 / sqrt(m L_up)` at every call. Must be None for forward-backward,
            whose step is derived from the weights.
        kernel_initializer: Initializer of `A` and `B` (None: uniform in
            `(-1/sqrt(n), 1/sqrt(n))`, as PyTorch's `nn.Linear` in the paper's code).
        injection_initializer: Initializer of `U` (None: `"glorot_uniform"`).
        **kwargs: Base layer arguments.

    Example:

    ```python
    cell = keras_deq.layers.MonotoneCell(64, monotonicity=0.1)
    v_next = cell(v, x)  # v: (batch, 64), x: (batch, features)
    z = cell.readout(v_next)
    ```
    """

    def __init__(
        self,
        units,
        monotonicity=0.1,
        splitting="peaceman_rachford",
        alpha=None,
        kernel_initializer=None,
        injection_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = check_positive_int("units", units)
        self.monotonicity = check_positive_float("monotonicity", monotonicity)
        self.splitting = check_splitting(splitting)
        self.alpha = check_alpha(alpha, self.splitting)
        self.kernel_initializer = get_keras_object(
            "initializer",
            "kernel_initializer",
            kernel_initializer,
            default=keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
        )
        self.injection_initializer = get_keras_object(
            "initializer", "injection_initializer", injection_initializer, default="glorot_uniform"
        )

    def state_shape(self, input_shape):
        return (self.units,)

    def build(self, z_shape, x_shape):
        if isinstance(x_shape, dict) or (x_shape and isinstance(x_shape[0], (list, tuple))):
            raise ValueError(
                f"MonotoneCell takes one input tensor (batch, features). Received: x_shape={x_shape}"
            )
        if len(z_shape) != 2 or z_shape[-1] != self.units:
            raise ValueError(
                f"The state must have shape (batch, {self.units}). Received: z_shape={z_shape}"
            )
        n = self.units
        self.kernel_a = self.add_weight(
            name="kernel_a", shape=(n, n), initializer=self.kernel_initializer
        )
        self.kernel_b = self.add_weight(
            name="kernel_b", shape=(n, n), initializer=self.kernel_initializer
        )
        self.injection_kernel = self.add_weight(
            name="injection_kernel", shape=(x_shape[-1], n), initializer=self.injection_initializer
        )
        self.bias = self.add_weight(name="bias", shape=(n,), initializer="zeros")

    # ------------------------------------------------------------ the operator
    def _kernels(self, dtype=None):
        a, b = self.kernel_a, self.kernel_b
        if dtype is not None:
            a, b = ops.cast(a, dtype), ops.cast(b, dtype)
        return a, b, ops.eye(self.units, dtype=a.dtype)

    def weight_matrix(self, dtype=None):
        """`W = (1 - m) I - A^T A + B - B^T`, column-vector convention (`n x n`).

        Args:
            dtype: Computed in this dtype (default: the weights').
        """
        a, b, eye = self._kernels(dtype)
        a_t_a = ops.matmul(ops.transpose(a), a)
        return (1.0 - self.monotonicity) * eye - a_t_a + b - ops.transpose(b)

    def operator(self, dtype=None):
        """`I - W = m I + A^T A - B + B^T`: its symmetric part is `m I + A^T A >= m I`.

        Args:
            dtype: Computed in this dtype (default: the weights').
        """
        a, b, eye = self._kernels(dtype)
        return self.monotonicity * eye + ops.matmul(ops.transpose(a), a) - b + ops.transpose(b)

    def lipschitz_upper(self, operator=None):
        """A certified upper bound on `L = ||I - W||_2`, within `n^(1/64)` of it.

        See `keras_deq.linalg.dense_spectral_norm_upper`. Without gradient.

        Args:
            operator: `I - W` if already computed (default: `self.operator()`).
        """
        operator = self.operator() if operator is None else operator
        return ops.stop_gradient(linalg.dense_spectral_norm_upper(operator, _NORM_SQUARINGS))

    def step_size(self, operator=None):
        """The splitting's step `alpha` for the current weights (a scalar, no gradient).

        Forward-backward: `m / L_up^2 < 2 m / L^2`. Peaceman-Rachford: the `alpha`
        given, or `1 / sqrt(m L_up)`.

        Args:
            operator: `I - W` if already computed (default: `self.operator()`).
        """
        operator = self.operator() if operator is None else operator
        m = self.monotonicity
        if self.splitting == "peaceman_rachford" and self.alpha is not None:
            return ops.convert_to_tensor(self.alpha, operator.dtype)
        bound = self.lipschitz_upper(operator)
        if self.splitting == "forward_backward":
            return m / ops.square(bound)
        return 1.0 / ops.sqrt(m * bound)

    def readout(self, state):
        """The equilibrium `z` of a state: `relu(state)` for Peaceman-Rachford, the
        state itself for forward-backward.

        Args:
            state: The solver's state, `(batch, units)`.
        """
        return ops.relu(state) if self.splitting == "peaceman_rachford" else state

    def call(self, z, x):
        dtype = keras.backend.standardize_dtype(z.dtype)
        # The n x n matrices in float32 at least (no half-precision inverse on every
        # backend); they do not depend on the state, so a compiled solve computes them
        # once, outside its loop.
        work = "float32" if dtype in ("float16", "bfloat16") else dtype
        operator = self.operator(work)
        alpha = self.step_size(operator)
        eye = ops.eye(self.units, dtype=work)
        u = alpha * ops.cast(ops.matmul(x, self.injection_kernel) + self.bias, work)
        u = ops.cast(u, dtype)
        # On rows: (M z)^T = z^T M^T.
        if self.splitting == "forward_backward":
            step = ops.cast(ops.transpose(eye - alpha * operator), dtype)
            return ops.relu(ops.matmul(z, step) + u)
        resolvent = ops.cast(ops.transpose(ops.inv(eye + alpha * operator)), dtype)
        reflected = 2.0 * ops.relu(z) - z
        return 2.0 * ops.matmul(reflected + u, resolvent) - reflected

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "monotonicity": self.monotonicity,
                "splitting": self.splitting,
                "alpha": self.alpha,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "injection_initializer": keras.initializers.serialize(self.injection_initializer),
            }
        )
        return config
