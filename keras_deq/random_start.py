"""`RandomStart`: random initial states for a fraction of the samples in training."""

import keras

from keras_deq import configurable
from keras_deq.solvers import common


@keras.saving.register_keras_serializable(package="keras_deq")
class RandomStart(configurable.Configurable):
    """Starts a random fraction of the samples at Gaussian noise while training.

    The "mixed" initialization of Anil et al. (2022, path independence): in a
    training call each sample starts, with probability `fraction`, at
    `stddev * N(0, 1)` instead of the layer's start (zeros, or the cell's
    `initial_state`); in inference every sample starts at the layer's start. A
    model trained so reaches the same fixed point from any start, which is what
    makes warm starts (`DEQ(stateful=True)`) and more test-time iterations safe.
    The noise is drawn from the layer's `SeedGenerator` (`DEQ(seed=...)`): new
    noise at every call, the same sequence for the same seed.

    Args:
        fraction: Probability in (0, 1] that a sample starts at noise; 1 starts
            every sample there.
        stddev: Standard deviation of the noise, > 0.

    Example:

    ```python
    deq = keras_deq.DEQ(keras_deq.DenseCell(16), start=keras_deq.RandomStart(0.5))
    ```
    """

    def __init__(self, fraction=0.5, stddev=1.0):
        self.fraction = common.check_fraction("fraction", fraction)
        self.stddev = common.check_positive_float("stddev", stddev)

    def __call__(self, z0, seed_generator):
        """`z0` with the rows of a random `fraction` of the samples replaced by noise.

        Args:
            z0: The layer's start, a tensor or a nest of `(batch, ...)` tensors.
            seed_generator: A `keras.random.SeedGenerator`.
        """
        flat = keras.tree.flatten(z0)
        batch = keras.ops.shape(flat[0])[0]
        draw = keras.random.uniform((batch,), seed=seed_generator)
        noisy = draw < self.fraction
        out = []
        for t in flat:
            noise = self.stddev * keras.random.normal(keras.ops.shape(t), seed=seed_generator)
            mask = keras.ops.reshape(noisy, (-1,) + (1,) * (len(t.shape) - 1))
            out.append(keras.ops.where(mask, keras.ops.cast(noise, t.dtype), t))
        return keras.tree.pack_sequence_as(z0, out)
