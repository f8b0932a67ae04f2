"""Jacobian diagnostics of a cell at a state: Frobenius norm and spectral radius."""

import numbers

import keras
from keras import ops

from keras_deq import backend
from keras_deq.backend import eigen
from keras_deq.solvers.common import check_nonnegative_int, check_positive_int

# Machine epsilon of the float dtypes a state may have.
_EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def _dtype(t):
    return keras.backend.standardize_dtype(t.dtype)


def _vjp(fn, z, v):
    """`v^T (df/dz)` for flat lists `z`, `v`; differentiable (second order)."""
    _, pullback = backend.vjp(lambda flat: keras.tree.flatten(fn(flat)), list(z))
    return list(pullback(list(v))[0])


def _seed_generator(seed):
    """An int seed is stateless in `keras.random`: draws would all be equal.

    A numpy integer is an int seed too (`keras.random` refuses it as such).
    """
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return keras.random.SeedGenerator(int(seed))
    return seed


def _batch_size(flat):
    return ops.shape(flat[0])[0]


def _sample_size(flat):
    """The number of state elements per sample (an int where the shapes are static)."""
    total = 0
    for t in flat:
        size = 1
        for d in ops.shape(t)[1:]:
            size = size * d
        total = total + size
    return total


def hutchinson_frobenius(fn, z, num_probes=1, seed=None):
    """Hutchinson estimate of `||df/dz||_F^2 / d`, averaged over the batch.

    Uses `E_v ||v^T J||^2 = ||J||_F^2` with Gaussian probes `v`, one
    vector-Jacobian product each. The result is divided by the total number of
    state elements (batch times `d`), as in the Jacobian-regularization paper,
    so it is the batch mean of `||J_b||_F^2 / d`. It is differentiable with
    respect to the cell's variables and inputs (a second-order gradient).

    Args:
        fn: The cell as a function of the state alone, `z -> f(z)`.
        z: The state: a tensor or a list of tensors with a leading batch dim.
        num_probes: Number of Gaussian probe vectors averaged.
        seed: A `keras.random.SeedGenerator`, an int (numpy integers too) or None.

    Returns:
        A scalar tensor (float32 or wider).

    Examples:
        >>> from keras import ops
        >>> est = hutchinson_frobenius(lambda z: 2.0 * z, ops.ones([4, 3]), 100, seed=0)
        >>> abs(float(est) - 4.0) < 1.0
        True
    """
    seed = _seed_generator(seed)
    flat = keras.tree.flatten(z)

    def cell(s):
        return fn(keras.tree.pack_sequence_as(z, keras.tree.flatten(s)))

    total = 0.0
    for _ in range(num_probes):  # a few probes, each drawn from the generator in turn
        probes = [keras.random.normal(ops.shape(t), dtype=t.dtype, seed=seed) for t in flat]
        squares = [
            ops.sum(ops.square(ops.cast(g, "float64" if _dtype(g) == "float64" else "float32")))
            for g in _vjp(cell, flat, probes)
        ]
        total += sum(squares[1:], squares[0])
    count = ops.cast(_batch_size(flat) * _sample_size(flat), total.dtype)
    return total / (num_probes * count)


def spectral_radius(fn, z, num_iters=100, seed=None, krylov_size=16):
    """Estimate of the spectral radius of `df/dz` per sample (power iteration + Arnoldi).

    Each sample's Jacobian `J` is probed with vector-Jacobian products (so the
    iteration runs on `J^T`, which has the same eigenvalues). First `num_iters`
    normalized power iterations `v <- J^T v / ||J^T v||` from a Gaussian vector
    turn `v` towards the dominant eigenvectors. Then `krylov_size` Arnoldi steps
    from `v` build an orthonormal basis of the Krylov subspace
    `span(v, J^T v, J^T^2 v, ...)`, and the estimate is the largest modulus of
    the eigenvalues of `J^T` projected on it (the Ritz values, from
    `keras_deq.backend.eigen.eigenvalue_moduli` of the small Hessenberg matrix).

    Unlike the growth factor `||J^T v||` of plain power iteration, which
    oscillates forever when the largest eigenvalues are a complex-conjugate pair
    (or `+r` and `-r`), this is exact as soon as the subspace contains their
    eigenvectors: in particular for a dominant real eigenvalue, a dominant
    complex pair, or several eigenvalues of nearly equal modulus, up to
    `krylov_size` of them. Where the leading eigenvalues are not separated
    within the budget (e.g. a large random `J`, whose eigenvalues crowd near
    the edge of a disc), the Ritz values are still eigenvalues of a projection
    of `J`, so they lie in its numerical range: the estimate is then at most
    the numerical radius `max |u^T J u|` over unit `u` (at most `||J||_2`), and
    may be a little off `rho(J)` either way (above it only for non-normal `J`).
    If `J` is exactly zero on a sample, the estimate is 0.

    Args:
        fn: The cell as a function of the state alone, `z -> f(z)`. It must act
            on each sample separately.
        z: The state: a tensor or a list of tensors with a leading batch dim.
        num_iters: Number of power iterations before the Arnoldi steps, >= 0.
        seed: A `keras.random.SeedGenerator`, an int (numpy integers too) or None.
        krylov_size: Dimension of the Krylov subspace, >= 1 (one more
            vector-Jacobian product each). 1 is the power iteration's Rayleigh
            quotient; 2 already resolves a dominant complex pair.

    Returns:
        A `(batch,)` tensor of estimates, in the state's dtype. The cost is
        `num_iters + krylov_size` vector-Jacobian products.

    Examples:
        >>> import numpy as np
        >>> from keras import ops
        >>> a = np.array([[0.3, -0.5], [0.5, 0.3]])  # eigenvalues 0.3 +- 0.5i
        >>> z = ops.ones([1, 2], "float64")  # float32 where Keras has no float64
        >>> radius = spectral_radius(lambda s: ops.matmul(s, a), z, num_iters=10, seed=0)
        >>> round(float(radius[0]), 6), round(float(np.hypot(0.3, 0.5)), 6)
        (0.583095, 0.583095)
    """
    num_iters = check_nonnegative_int("num_iters", num_iters)
    krylov_size = check_positive_int("krylov_size", krylov_size)
    seed = _seed_generator(seed)
    flat = [ops.stop_gradient(ops.convert_to_tensor(t)) for t in keras.tree.flatten(z)]
    # The vectors are kept as one (batch, n) matrix, n the state size per sample,
    # in float32 at least (float64 if the state has a float64 part).
    work = "float64" if any(_dtype(t) == "float64" for t in flat) else "float32"
    batch = _batch_size(flat)
    sizes = [_sample_size([t]) for t in flat]

    def to_matrix(ts):
        return ops.concatenate([ops.reshape(ops.cast(t, work), (batch, -1)) for t in ts], axis=1)

    def to_state(m):
        parts, start = [], 0
        for size, t in zip(sizes, flat, strict=True):
            part = m[:, start : start + size]
            parts.append(ops.cast(ops.reshape(part, ops.shape(t)), t.dtype))
            start = start + size
        return parts

    def cell(s):
        return fn(keras.tree.pack_sequence_as(z, keras.tree.flatten(s)))

    def jt(m):
        """`J_b^T m_b` for each sample `b`: one vector-Jacobian product."""
        return to_matrix(_vjp(cell, flat, to_state(m)))

    def normalize(m):
        n = ops.norm(m, axis=1, keepdims=True)
        return ops.divide_no_nan(m, n), n[:, 0]

    v0 = [keras.random.normal(ops.shape(t), dtype=t.dtype, seed=seed) for t in flat]
    v, _ = normalize(to_matrix(v0))
    _, v = ops.while_loop(
        lambda i, v: i < num_iters,
        lambda i, v: (i + 1, normalize(jt(v))[0]),
        (0, v),
        maximum_iterations=num_iters,
    )

    # Arnoldi with two classical Gram-Schmidt passes, on a basis of krylov_size + 1
    # rows that starts at zero (a zero row adds nothing to the projections). A
    # remainder at rounding level means an invariant subspace is found: the next
    # basis vector is 0 (so are those after it, as J^T 0 = 0), and the Hessenberg
    # matrix has the exact eigenvalues of the invariant block, plus zeros.
    deflate = max(_EPS.get(_dtype(t), _EPS["float32"]) for t in flat) ** 0.5
    rows = ops.arange(krylov_size + 1)

    def arnoldi_step(j, state):
        basis, hessenberg = state  # (batch, k + 1, n) orthonormal rows; (batch, k + 1, k)
        w = jt(ops.take(basis, j, axis=1))
        w_norm = ops.norm(w, axis=1)
        coefficients = 0.0
        for _ in range(2):
            c = ops.einsum("bkn,bn->bk", basis, w)
            w -= ops.einsum("bk,bkn->bn", c, basis)
            coefficients += c
        q, h = normalize(w)
        keep = h > deflate * w_norm
        h = ops.where(keep, h, ops.zeros_like(h))
        q = ops.where(keep[:, None], q, ops.zeros_like(q))
        next_row = ops.cast(ops.equal(rows, j + 1), work)[None, :, None]
        basis = basis + next_row * q[:, None, :]  # row j + 1 was zero
        column = coefficients + next_row[:, :, 0] * h[:, None]  # H[:, :, j], rows 0..k
        hessenberg = ops.slice_update(hessenberg, (0, 0, j), column[:, :, None])
        return basis, hessenberg

    n = ops.shape(v)[1]
    basis = ops.concatenate([v[:, None, :], ops.zeros((batch, krylov_size, n), work)], axis=1)
    hessenberg = ops.zeros((batch, krylov_size + 1, krylov_size), work)
    _, hessenberg = ops.fori_loop(0, krylov_size, arnoldi_step, (basis, hessenberg))
    moduli = eigen.eigenvalue_moduli(hessenberg[:, :krylov_size])
    return ops.cast(ops.max(moduli, axis=1), flat[0].dtype)
