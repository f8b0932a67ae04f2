"""Jacobian diagnostics of a cell at a state: Frobenius norm and spectral radius."""

import tensorflow as tf


def _vjp(fn, z, v):
    """`v^T (df/dz)` for flat lists `z`, `v`; differentiable (second order)."""
    with tf.GradientTape() as tape:
        tape.watch(z)
        fz = tf.nest.flatten(fn(tf.nest.pack_sequence_as(z, z)))
    grads = tape.gradient(fz, z, output_gradients=v)
    return [tf.zeros_like(t) if g is None else g for g, t in zip(grads, z, strict=True)]


def _seed_generator(seed):
    """An int seed is stateless in `keras.random`: draws would all be equal."""
    import keras  # noqa: PLC0415

    return keras.random.SeedGenerator(seed) if isinstance(seed, int) else seed


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
        seed: A `keras.random.SeedGenerator`, an int or None.

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


def spectral_radius(fn, z, num_iters=100, seed=None):
    """Power-iteration estimate of the spectral radius of `df/dz` per sample.

    Iterates `v <- J^T v / ||J^T v||` with vector-Jacobian products; the growth
    factor `||J^T v||` tends to the largest eigenvalue modulus when it is unique
    and separated.

    Args:
        fn: The cell as a function of the state alone, `z -> f(z)`.
        z: The state: a tensor or a list of tensors with a leading batch dim.
        num_iters: Number of power iterations.
        seed: A `keras.random.SeedGenerator`, an int or None.

    Returns:
        A `(batch,)` tensor of estimates.
    """
    import keras  # noqa: PLC0415

    seed = _seed_generator(seed)
    flat = [tf.stop_gradient(t) for t in tf.nest.flatten(z)]

    def norms(vs):
        return tf.sqrt(
            tf.add_n(
                [tf.reduce_sum(tf.reshape(tf.square(v), [tf.shape(v)[0], -1]), axis=1) for v in vs]
            )
        )

    def normalize(vs):
        n = norms(vs)
        return [v / tf.reshape(n + 1e-30, [-1] + [1] * (v.shape.rank - 1)) for v in vs]

    v0 = normalize([keras.random.normal(tf.shape(t), dtype=t.dtype, seed=seed) for t in flat])

    def body(i, v, _):
        jv = _vjp(lambda s: fn(tf.nest.pack_sequence_as(z, tf.nest.flatten(s))), flat, v)
        return i + 1, normalize(jv), norms(jv)

    _, _, radius = tf.while_loop(
        lambda i, v, r: i < num_iters,
        body,
        (tf.constant(0), v0, tf.zeros([_batch_size(flat)], flat[0].dtype)),
        maximum_iterations=num_iters,
    )
    return radius
