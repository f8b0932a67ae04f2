"""`Cell`: the base class of `DEQ` cells, which can say their state's shape and start."""

import keras

from keras_deq.layers import deq_state


@keras.saving.register_keras_serializable(package="keras_deq")
class Cell(keras.layers.Layer):
    """Base class of the cells `z_next = f(z, x)` of a `keras_deq.DEQ`.

    A cell is a Keras layer called as `cell(z, x)` that returns the next state,
    with the structure and shape of `z`; `x` is the injection (the `DEQ` layer's
    input). Subclassing `Cell` is optional: `DEQ` takes any such layer. What the
    base class adds are two methods that `DEQ` consults (on any cell that has
    them) so that a cell can carry its own defaults:

    - `state_shape(input_shape)`: the state's shape for an injection of
      `input_shape`, used when the `DEQ` is given no `state_shape`;
    - `initial_state(x, state_shape)`: the state the solver starts from, used
      when the `DEQ` call gets no `initial_state`.

    Their defaults are `DEQ`'s own: the input's shape, and zeros. The state a
    cell's `initial_state` returns is differentiated by the backward modes that
    differentiate through the forward solve (`Unrolled`, and the explicit
    pre-training steps); the others treat it as a constant, as they treat the
    `initial_state` argument of `DEQ.call`.

    A subclass implements `call(z, x)` (and `build(z_shape, x_shape)` if it has
    weights); `compute_output_shape` returns the state's shape.

    Example:

    ```python
    @keras.saving.register_keras_serializable(package="my_project")
    class HalfStep(keras_deq.layers.Cell):
        # z_next = (z + tanh(x)) / 2, started at z0 = x: its fixed point is tanh(x).
        def initial_state(self, x, state_shape):
            return x

        def call(self, z, x):
            return 0.5 * (z + keras.ops.tanh(x))

    z_star = keras_deq.DEQ(HalfStep(), solver="fixed_point")(x)
    ```
    """

    def state_shape(self, input_shape):
        """The state's shape, without the batch dimension, for an injection of `input_shape`.

        `DEQ` calls it when it is given no `state_shape` argument of its own.

        Args:
            input_shape: The injection's shape, with the batch dimension (a tuple,
                or a list or dict of tuples for several injection tensors).

        Returns:
            A tuple (a single-tensor state) or a list of tuples (a multi-tensor
            state), without the batch dimension; or None (the default): the state
            has the input's shape (a single-tensor input only).
        """
        del input_shape
        return None

    def initial_state(self, x, state_shape):
        """The state the solver starts from, for the injection `x`.

        `DEQ` calls it when its call gets no `initial_state`.

        Args:
            x: The injection (the `DEQ` layer's input): a tensor or a nest of them.
            state_shape: The state's shape without the batch dimension, as the
                `DEQ` resolved it (its own `state_shape`, else this cell's
                `state_shape(...)`); None when the state has the input's shape.

        Returns:
            The starting state, with the structure and shape of the state. The
            default is zeros.
        """
        return deq_state.zeros(x, state_shape, self.compute_dtype)

    def compute_output_shape(self, z_shape, x_shape):
        return z_shape
