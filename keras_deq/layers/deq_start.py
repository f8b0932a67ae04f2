"""Where a `DEQ` starts: `start` (random starts in training) and `stateful` (warm starts)."""

import keras

from keras_deq import backend
from keras_deq.layers import deq_arguments as arguments
from keras_deq.layers import deq_state as state
from keras_deq.random_start import RandomStart
from keras_deq.solvers import common


def cast_floats(structure, dtype):
    """The floating tensors of `structure` cast to `dtype`, the others as they are."""
    return keras.tree.map_structure(
        lambda t: keras.ops.cast(t, dtype) if backend.is_float(t) else t, structure
    )


class StartControls:
    """The start of a `DEQ` (a mixin). `start`: a `RandomStart` applied in training.
    `stateful`: as `keras.layers.RNN(stateful=True)`, the layer keeps its last fixed
    point in variables (one per state tensor, batch size fixed) and the next call
    starts there; `reset_states()` forgets it."""

    def _check_start(self, start, stateful):
        self.start = arguments.optional_object("start", start, RandomStart)
        self.stateful = common.check_bool("stateful", stateful)

    def _start_config(self):
        return {"start": keras.saving.serialize_keras_object(self.start), "stateful": self.stateful}

    def _start(self, x, initial_state, training):
        """`(z0, evaluate)`: the starting state and the cell as `(z, x) -> next z`."""
        z0 = state.start(self.cell, x, self.state_shape, self.compute_dtype)
        z0 = self._initial(z0, training)
        if initial_state is not None:
            z0 = state.check_initial_state(initial_state, z0, self.compute_dtype)
        cell_dtype = self.cell.compute_dtype
        own_dtype = self.compute_dtype

        def evaluate(z, x_in):
            # The cell runs in its own dtype, the layer's state in the layer's.
            if cell_dtype != own_dtype:
                z, x_in = cast_floats(z, cell_dtype), cast_floats(x_in, cell_dtype)
            out = self.cell(z, x_in, training=training)
            return cast_floats(out, own_dtype) if cell_dtype != own_dtype else out

        return z0, evaluate

    def _budget(self, training):
        """The forward `max_iter` of a call: `self.max_iter` itself, or the budget's."""
        if self.budget is None:
            return self.max_iter
        return self.budget.for_call(training, self.seed_generator)

    def _initial(self, z0, training):
        """The layer's start `z0` with `start`'s random rows in training, or the kept
        fixed point once there is one."""
        if self.start is not None and training:
            z0 = self.start(z0, self.seed_generator)
        return self._warm_start(z0)

    def _build_warm_state(self, z_spec):
        self._warm_states = None
        if not self.stateful:
            return
        shapes = [tuple(t.shape) for t in keras.tree.flatten(z_spec)]
        if any(d is None for s in shapes for d in s):
            raise ValueError(
                "`stateful=True` needs a fixed batch size and state shape: pass "
                "`keras.Input(shape, batch_size=...)` (or `batch_shape=`). "
                f"Received: state shapes {shapes}"
            )
        self._warm_states = [
            self.add_weight(shape=s, initializer="zeros", trainable=False, name=f"warm_state_{i}")
            for i, s in enumerate(shapes)
        ]
        self._warm_flag = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="warm_started"
        )

    def reset_states(self):
        """Forgets the kept fixed point: the next call starts from the layer's start."""
        for v in self._warm_states or ():
            v.assign(keras.ops.zeros(v.shape, v.dtype))
        if self._warm_states:
            self._warm_flag.assign(0.0)

    def _warm_start(self, z0):
        """`z0`, or the kept fixed point once there is one."""
        if not self.stateful:
            return z0
        kept = self._warm_flag > 0.5
        flat = [
            keras.ops.where(kept, keras.ops.cast(v, t.dtype), t)
            for v, t in zip(self._warm_states, keras.tree.flatten(z0), strict=True)
        ]
        return keras.tree.pack_sequence_as(z0, flat)

    def _keep_state(self, z):
        if not self.stateful:
            return
        for v, t in zip(self._warm_states, keras.tree.flatten(z), strict=True):
            v.assign(keras.ops.cast(keras.ops.stop_gradient(t), v.dtype))
        self._warm_flag.assign(1.0)
