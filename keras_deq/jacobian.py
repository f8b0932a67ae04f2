"""Jacobian diagnostics of a cell at a state: Frobenius norm and spectral radius."""

import numbers

import tensorflow as tf

from keras_deq.solvers.common import check_nonnegative_int, check_positive_int

# Machine epsilon of the float dtypes a state may have.
_EPS = {tf.float64: 2.0**-52, tf.float32: 2.0**-23, tf.float16: 2.0**-10, tf.bfloat16: 2.0**-7}


def _vjp(fn, z, v):
    """`v^T (df/dz)` for flat lists `z`, `v`; differentiable (second order)."""
    with tf.GradientTape() as tape:
        tape.watch(z)
        fz = tf.nest.flatten(fn(tf.nest.pack_sequence_as(z, z)))
    grads = tape.gradient(fz, z, output_gradients=v)
    return [tf.zeros_like(t) if g is None else g for g, t in zip(grads, z, strict=True)]


def _seed_generator(seed):
    """An int seed is stateless in `keras.random`: draws would all be equal.

    A numpy integer is an int seed too (`keras.random` refuses it as such).
    """
    import keras  # noqa: PLC0415

    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return keras.random.SeedGenerator(int(seed))
    return seed


def _batch_size(flat):
    return tf.shape(flat[0])[0]


def _sample_size(flat):
    return tf.add_n([tf.reduce_prod(tf.shape(t)[1:]) for t in flat])


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
        >>> import tensorflow as tf
        >>> est = hutchinson_frobenius(lambda z: 2.0 * z, tf.ones([4, 3]), 100, seed=0)
        >>> abs(float(est) - 4.0) < 1.0
        True
    """
    import keras  # noqa: PLC0415

    seed = _seed_generator(seed)
    flat = tf.nest.flatten(z)
    total = 0.0
    for _ in range(num_probes):
        probes = [keras.random.normal(tf.shape(t), dtype=t.dtype, seed=seed) for t in flat]
        vjp = _vjp(lambda s: fn(tf.nest.pack_sequence_as(z, tf.nest.flatten(s))), flat, probes)
        total += tf.add_n(
            [
                tf.reduce_sum(
                    tf.square(tf.cast(g, tf.float32 if g.dtype != tf.float64 else g.dtype))
                )
                for g in vjp
            ]
        )
    count = tf.cast(_batch_size(flat) * _sample_size(flat), total.dtype)
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
    `tf.linalg.eigvals` of the small Hessenberg matrix).

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
        >>> import numpy as np, tensorflow as tf
        >>> a = np.array([[0.3, -0.5], [0.5, 0.3]])  # eigenvalues 0.3 +- 0.5i
        >>> z = tf.ones([1, 2], tf.float64)
        >>> radius = spectral_radius(lambda s: s @ a, z, num_iters=10, seed=0)
        >>> round(float(radius[0]), 6), round(float(np.hypot(0.3, 0.5)), 6)
        (0.583095, 0.583095)
    """
    import keras  # noqa: PLC0415

    num_iters = check_nonnegative_int("num_iters", num_iters)
    krylov_size = check_positive_int("krylov_size", krylov_size)
    seed = _seed_generator(seed)
    flat = [tf.stop_gradient(t) for t in tf.nest.flatten(z)]
    # The vectors are kept as one (batch, n) matrix, n the state size per sample,
    # in float32 at least (float64 if the state has a float64 part).
    work = tf.float64 if any(t.dtype == tf.float64 for t in flat) else tf.float32
    batch = _batch_size(flat)
    sizes = [tf.reduce_prod(tf.shape(t)[1:]) for t in flat]

    def to_matrix(ts):
        return tf.concat([tf.reshape(tf.cast(t, work), [batch, -1]) for t in ts], axis=1)

    def to_state(m):
        parts = tf.split(m, tf.stack(sizes), axis=1, num=len(flat))
        return [
            tf.cast(tf.reshape(p, tf.shape(t)), t.dtype) for p, t in zip(parts, flat, strict=True)
        ]

    def jt(m):
        """`J_b^T m_b` for each sample `b`: one vector-Jacobian product."""
        cell = lambda s: fn(tf.nest.pack_sequence_as(z, tf.nest.flatten(s)))  # noqa: E731
        return to_matrix(_vjp(cell, flat, to_state(m)))

    def normalize(m):
        n = tf.norm(m, axis=1, keepdims=True)
        return tf.math.divide_no_nan(m, n), n[:, 0]

    v0 = [keras.random.normal(tf.shape(t), dtype=t.dtype, seed=seed) for t in flat]
    v, _ = normalize(to_matrix(v0))
    _, v = tf.while_loop(
        lambda i, v: i < num_iters,
        lambda i, v: (i + 1, normalize(jt(v))[0]),
        (tf.constant(0), v),
        maximum_iterations=num_iters,
    )

    # Arnoldi with two classical Gram-Schmidt passes. A remainder at rounding
    # level means an invariant subspace is found: the next basis vector is 0 (so
    # are those after it, as J^T 0 = 0), and the Hessenberg matrix has the exact
    # eigenvalues of the invariant block, plus zeros.
    deflate = max(_EPS.get(t.dtype, _EPS[tf.float32]) for t in flat) ** 0.5
    basis = v[:, None, :]  # (batch, j + 1, n), orthonormal rows
    columns = []
    for j in range(krylov_size):
        w = jt(basis[:, j])
        w_norm = tf.norm(w, axis=1)
        coefficients = 0.0
        for _ in range(2):
            c = tf.einsum("bkn,bn->bk", basis, w)
            w -= tf.einsum("bk,bkn->bn", c, basis)
            coefficients += c
        q, h = normalize(w)
        keep = h > deflate * w_norm
        h = tf.where(keep, h, tf.zeros_like(h))
        q = tf.where(keep[:, None], q, tf.zeros_like(q))
        basis = tf.concat([basis, q[:, None, :]], axis=1)
        pad = tf.zeros([batch, krylov_size - j - 1], work)
        columns.append(tf.concat([coefficients, h[:, None], pad], axis=1)[:, :krylov_size])
    hessenberg = tf.stack(columns, axis=2)  # H[b, i, j] = columns[j][b, i]
    ritz = tf.linalg.eigvals(hessenberg)
    return tf.cast(tf.reduce_max(tf.abs(ritz), axis=1), flat[0].dtype)
