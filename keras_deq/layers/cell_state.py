"""One state of the cell per solve: its non-trainable variables are read once per
`DEQ` call and advanced once.

A cell may hold state that its calls update: the seed of a `keras.layers.Dropout`,
the moving statistics of a `keras.layers.BatchNormalization`. Updated on every
evaluation, the map would change from one solver iteration to the next (a new
dropout mask each time: no fixed point to find), and the gradient would not be
that of the map the forward pass solved. So, as Keras' recurrent layers use one
dropout mask for every time step, every evaluation of the cell in one `DEQ` call
(forward solve, backward pass, Jacobian penalty) sees the state as it was when
the call began, and the state then advances once, by one more evaluation at the
equilibrium (a new dropout mask for the next batch; the batch statistics at
`z*` for the moving averages).
"""

import keras

from keras_deq import backend


class FrozenCellState:
    """Evaluations of a cell that all see its non-trainable state as it is now.

    Args:
        cell: The cell layer.
    """

    def __init__(self, cell):
        self.variables = list(cell.non_trainable_variables)
        # On JAX, Keras runs the step in a stateless scope of its own, whose values an
        # inner scope does not see: there every variable of the cell is mapped.
        mapped = list(cell.variables) if backend.name() == "jax" else self.variables
        # Values read now (a copy: TensorFlow would hand back the variable itself),
        # since the backward pass evaluates the cell after `advance` assigned.
        self._mapping = [(v, keras.ops.copy(v.value)) for v in mapped] if self.variables else []
        # The other variables are mapped to their values at each evaluation, read through
        # any enclosing scope (which this one hides), e.g. `Unrolled(remat=True)`'s.
        self._live = [] if backend.name() == "jax" else list(cell.trainable_variables)

    def _scope(self):
        live = [(v, v.value) for v in self._live]
        return keras.StatelessScope(state_mapping=self._mapping + live)

    def call(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` with the state of the call's start; updates discarded."""
        if not self.variables:
            return fn(*args, **kwargs)
        with self._scope():
            return fn(*args, **kwargs)

    def advance(self, fn, *args, **kwargs):
        """Evaluates `fn` once more and assigns the state that evaluation leaves."""
        if not self.variables:
            return
        with self._scope() as scope:
            before = [scope.get_current_value(v) for v in self.variables]
            fn(*args, **kwargs)
        for variable, old in zip(self.variables, before, strict=True):
            new = scope.get_current_value(variable)
            if new is not old:
                variable.assign(new)
