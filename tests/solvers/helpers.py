"""Maps, independent reference computations and recorders for the solver tests.

Nothing here uses `keras_deq`: the references are plain numpy (or plain eager
loops over the map), so the tests compare the solvers against code that shares
none of their machinery. The maps are written with `keras.ops`, so the tests run
on every Keras backend; the few backend-specific lines (compiling a function,
recording inside a compiled loop) are here, behind `BACKEND`.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_deq import solvers

# The fixed-point solvers (forward and adjoint), and those for affine maps only (the
# adjoint), which the tests run on affine maps (tests/solvers/test_gmres.py).
SOLVER_NAMES = ("fixed_point", "anderson", "broyden")
AFFINE_SOLVER_NAMES = ("gmres",)
BACKEND = keras.backend.backend()
# For tests that hold in both precisions, with a tolerance per dtype: the float64 case
# (skipped where the backend has no float64, see tests/conftest.py) keeps the tight
# tolerance; the float32 case runs on every backend.
FLOAT_DTYPES = (pytest.param("float64", marks=pytest.mark.float64), "float32")


def const(value, like):
    """`value` as a tensor with the dtype of the tensor `like`."""
    return ops.convert_to_tensor(value, like.dtype)


def dtype_of(t):
    """The dtype name of a tensor or array (`"float32"`)."""
    return keras.backend.standardize_dtype(t.dtype)


def numpy(structure):
    """A nest of tensors as the same nest of numpy arrays."""
    return keras.tree.map_structure(ops.convert_to_numpy, structure)


def compiled(fn, xla=False):
    """`fn` compiled by the backend: `tf.function` (with XLA if `xla`) or `jax.jit`
    (always XLA). Arguments that are Python numbers become tensors under `jax.jit`."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True if xla else None)
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    # PyTorch: Keras runs it eagerly; `torch.compile` takes ~20 s per solver loop to
    # compile (measured), too long for the test suite.
    pytest.skip("no compiled mode on the torch backend in the fast tests")


def rng(seed=0):
    return np.random.default_rng(seed)


def solver(name):
    return solvers.get(name)


def matrix_with_norm(n, norm, seed=0):
    """A random (n, n) matrix with spectral norm exactly `norm`."""
    w = rng(seed).standard_normal((n, n))
    return norm * w / np.linalg.norm(w, 2)


def symmetric_with_spectrum(eigenvalues, seed=0):
    """A symmetric matrix with the given eigenvalues and a random eigenbasis."""
    n = len(eigenvalues)
    q, _ = np.linalg.qr(rng(seed).standard_normal((n, n)))
    return q @ np.diag(eigenvalues) @ q.T


def matrix_with_spectral_radius(n, radius, seed=0):
    """A random non-symmetric matrix whose largest |eigenvalue| is `radius`."""
    m = rng(seed).standard_normal((n, n))
    a = radius * m / np.max(np.abs(np.linalg.eigvals(m)))
    assert np.min(np.abs(np.linalg.eigvals(a) - 1.0)) > 1e-2  # 1 is not an eigenvalue
    return a


class TanhMap:
    """f(z) = tanh(z W + x), a contraction when ||W||_2 < 1; in keras.ops and in numpy."""

    def __init__(self, n, batch, norm=0.5, seed=0, dtype=np.float64):
        self.w = matrix_with_norm(n, norm, seed).astype(dtype)
        self.x = rng(seed + 1).standard_normal((batch, n)).astype(dtype)

    def __call__(self, z):
        return ops.tanh(ops.matmul(z, const(self.w, z)) + const(self.x, z))

    def np(self, z):
        return np.tanh(z @ self.w + self.x)

    def reference(self, iters=400):
        """The fixed point by a long numpy Picard iteration (contraction 0.5: exact)."""
        z = np.zeros_like(self.x, dtype=np.float64)
        for _ in range(iters):
            z = np.tanh(z @ self.w.astype(np.float64) + self.x.astype(np.float64))
        return z


class LinearMap:
    """f(z) = z A + c (row vectors); its fixed point solves z (I - A) = c."""

    def __init__(self, a, c):
        self.a = np.asarray(a, np.float64)
        self.c = np.asarray(c, np.float64)

    def __call__(self, z):
        return ops.matmul(z, const(self.a, z)) + const(self.c, z)

    def np(self, z):
        return z @ self.a + self.c

    def reference(self):
        n = self.a.shape[0]
        return np.linalg.solve((np.eye(n) - self.a).T, self.c.T).T


def flat(structure):
    """A nest of (batch, ...) arrays as one (batch, n) float64 numpy matrix."""
    leaves = [
        np.asarray(ops.convert_to_numpy(t), np.float64) for t in keras.tree.flatten(structure)
    ]
    return np.concatenate([t.reshape(t.shape[0], -1) for t in leaves], axis=1)


def relative_np(abs_res, f_norm):
    """The documented relative residual `||f(z) - z|| / ||f(z)||` (0 where both are 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(abs_res == 0, 0.0, abs_res / np.maximum(f_norm, np.finfo(np.float64).tiny))


def residuals_np(fz, z):
    """Per-sample (abs, rel) residuals, computed in float64 numpy."""
    fz, z = flat(fz), flat(z)
    abs_res = np.linalg.norm(fz - z, axis=1)
    return abs_res, relative_np(abs_res, np.linalg.norm(fz, axis=1))


def true_residuals(f, state):
    """Residuals of `state` recomputed by evaluating `f` outside any solver."""
    return residuals_np(f(state), state)


class Recorder:
    """Wraps a map and records every state it is evaluated at, in order.

    On TensorFlow it records in eager mode (the solver loop then runs in Python).
    On JAX, where the loop is always compiled, it records through an ordered
    `jax.debug.callback`, which runs at every evaluation, also under `jax.jit`.
    """

    def __init__(self, f):
        self.f = f
        self._inputs = []
        self._outputs = []

    def __call__(self, z):
        fz = self.f(z)
        if BACKEND == "jax":
            import jax

            jax.debug.callback(self._record, z, fz, ordered=True)
        else:
            self._record(z, fz)
        return fz

    def _record(self, z, fz):
        self._inputs.append(flat(z))
        self._outputs.append(flat(fz))

    @staticmethod
    def _sync():
        if BACKEND == "jax":
            import jax

            jax.effects_barrier()

    @property
    def inputs(self):
        self._sync()
        return self._inputs

    @property
    def outputs(self):
        self._sync()
        return self._outputs

    @property
    def calls(self):
        return len(self.inputs)

    def residual_history(self, stop_mode):
        """(calls, batch) residuals of every evaluated iterate, by `stop_mode`."""
        pairs = [residuals_np(fz, z) for fz, z in zip(self.outputs, self.inputs, strict=True)]
        index = 1 if stop_mode == "rel" else 0
        return np.stack([p[index] for p in pairs])


def picard_np(f_np, z0, iters, damping=1.0):
    """Iterates z <- z + damping (f(z) - z); returns the list z_0 .. z_iters."""
    zs = [np.asarray(z0, np.float64)]
    for _ in range(iters):
        z = zs[-1]
        zs.append(z + damping * (f_np(z) - z))
    return zs


def anderson_np(f_np, z0, iters, window, beta, ridge, drop=1e-3):
    """Anderson type II as documented, per sample, dense numpy; returns z_0 .. z_iters.

    With y_i = z_i + beta g_i and the last `window - 1` differences dg_i, dy_i of g and
    y, newest first: gamma minimizes ||g_k - sum_i gamma_i dg_i||^2 + sum_i lam_i
    gamma_i^2 with lam_i = max(ridge ||g_k||^2, 100 eps ||dg_i||^2), over the
    differences kept newest first: one is dropped when, in the system scaled to unit
    diagonal, its pivot less its own ridge is at most `drop`. z_next = y_k - sum_i
    gamma_i dy_i.
    """
    eps = np.finfo(np.float64).eps
    z = np.asarray(z0, np.float64)
    zs, ys, gs = [z], [], []
    for _ in range(iters):
        g = f_np(z) - z
        ys = [z + beta * g, *ys][:window]
        gs = [g, *gs][:window]
        z = ys[0].copy()
        for b in range(z.shape[0]):
            dg = np.array([gs[i][b] - gs[i + 1][b] for i in range(len(gs) - 1)])
            dy = np.array([ys[i][b] - ys[i + 1][b] for i in range(len(ys) - 1)])
            if not len(dg):
                continue
            norms = np.linalg.norm(dg, axis=1)
            d = 1.0 / np.where(norms > 0, norms, 1.0)
            lam = np.maximum(ridge * (g[b] @ g[b]) * d**2, 100 * eps)
            system = (dg @ dg.T) * np.outer(d, d) + np.diag(lam)
            rhs = (dg @ g[b]) * d
            keep = []
            for j in range(len(rhs)):
                v = system[keep, j]
                schur = v @ np.linalg.solve(system[np.ix_(keep, keep)], v) if keep else 0.0
                if system[j, j] - schur - lam[j] > drop:
                    keep.append(j)
            gamma = np.zeros(len(rhs))
            gamma[keep] = np.linalg.solve(system[np.ix_(keep, keep)], rhs[keep]) * d[keep]
            z[b] = ys[0][b] - gamma @ dy
        zs.append(z)
    return zs


def broyden_np(f_np, z0, iters, memory):
    """Good Broyden on g = f(z) - z, per sample, with explicit rank-one terms.

    H_0 = -I; z_{k+1} = z_k - H_k g_k; H_{k+1} = H_k + (s - H y) s^T H / (s^T H y) with
    s = z_{k+1} - z_k, y = g_{k+1} - g_k. As documented, when `memory` terms are
    stored the model restarts from -I and takes the newest secant update computed
    against -I. Returns z_0 .. z_iters.
    """

    def dot(a, b):
        return np.sum(a * b, axis=1, keepdims=True)

    def h(x):
        return -x + sum(u * dot(v, x) for u, v in zip(us, vs, strict=True))

    def h_t(x):
        return -x + sum(v * dot(u, x) for u, v in zip(us, vs, strict=True))

    z = np.asarray(z0, np.float64)
    g = f_np(z) - z
    us, vs, zs = [], [], [z]
    for _ in range(iters):
        s = -h(g)
        z = z + s
        g_new = f_np(z) - z
        y = g_new - g
        if len(us) == memory:
            us.clear()
            vs.clear()
        v = h_t(s)
        u = (s - h(y)) / dot(v, y)
        us.append(u)
        vs.append(v)
        g = g_new
        zs.append(z)
    return zs


class Counter:
    """Wraps a map and counts its evaluations at run time, also inside a compiled
    function (where Python code runs only while tracing)."""

    def __init__(self, f):
        self.f = f
        if BACKEND == "tensorflow":
            import tensorflow as tf

            self._variable = tf.Variable(0, dtype=tf.int32)
        self._count = 0

    def __call__(self, z):
        if BACKEND == "tensorflow":
            self._variable.assign_add(1)
        elif BACKEND == "jax":
            import jax

            jax.debug.callback(self._increment, ordered=True)
        else:
            self._increment()
        return self.f(z)

    def _increment(self):
        self._count += 1

    @property
    def count(self):
        if BACKEND == "tensorflow":
            return int(self._variable.numpy())
        if BACKEND == "jax":
            import jax

            jax.effects_barrier()
        return self._count

    def reset(self):
        if BACKEND == "tensorflow":
            self._variable.assign(0)
        self._count = 0


def assert_result_shapes(result, batch):
    assert tuple(result.steps.shape) == ()
    assert dtype_of(result.steps) == "int32"
    for t in (result.abs_residual, result.rel_residual, result.converged):
        assert tuple(t.shape) == (batch,)
    assert dtype_of(result.converged) == "bool"
