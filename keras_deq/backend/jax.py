"""The JAX side of the backend seam (imported on first use by `keras_deq.backend`)."""

import jax
import jax.numpy as jnp
import keras


def compiled_on_cpu():
    return jax.default_backend() == "cpu"


def host_call(fn, *args):
    jax.debug.callback(fn, *args)


def host_call_if(condition, fn, *args):
    # Under `cond`, a step whose condition is False makes no host round trip.
    jax.lax.cond(condition, lambda *a: host_call(fn, *a), lambda *a: None, *args)


def vjp(fn, *primals):
    return jax.vjp(fn, *primals)


def compiled(fn, static_argnums=()):
    return jax.jit(fn, static_argnums=static_argnums)


def eigvalsh(real, imag=None):
    matrices = real if imag is None else real + 1j * imag
    return jnp.linalg.eigvalsh(matrices).astype(real.dtype)


def eigenvalue_moduli(matrices):
    return jnp.abs(jnp.linalg.eigvals(matrices)).astype(matrices.dtype)


def has_values(tensor):
    return not isinstance(tensor, jax.core.Tracer)


def stateless_uniform(shape, seed, dtype):
    key = keras.ops.cast(seed, "uint32")
    return jax.random.uniform(key, tuple(shape), dtype=dtype)
