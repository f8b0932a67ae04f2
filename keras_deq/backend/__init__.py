"""The backend seam: what must differ between Keras backends lives here and nowhere else.

Everything else in keras_deq is written with `keras.ops` and `keras.tree`. This
package holds the few operations that each backend spells differently (loops that
reverse-mode autodiff can go through, and, in `keras_deq.backend.tensorflow`, the
TensorFlow-specific wiring of the DEQ layer).
"""

import keras


def differentiable_loop(step, state, steps):
    """`step` applied `steps` times from `state`, so that autodiff can go through it.

    JAX cannot reverse-differentiate a while loop, so there the loop is a `fori_loop`
    with static bounds (a scan); TensorFlow's while loop needs `maximum_iterations`
    to be differentiated under XLA.

    Args:
        step: A function `state -> next state` on nests.
        state: The starting nest.
        steps: A positive Python int.

    Returns:
        The nest after `steps` applications of `step`.
    """
    if keras.backend.backend() == "jax":
        return keras.ops.fori_loop(0, steps, lambda i, s: step(s), state)
    _, out = keras.ops.while_loop(
        lambda i, s: i < steps,
        lambda i, s: (i + 1, step(s)),
        (0, state),
        maximum_iterations=steps,
    )
    return out
