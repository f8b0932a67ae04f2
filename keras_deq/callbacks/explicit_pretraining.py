"""`ExplicitPretraining`: DEQ layers trained as explicit networks for the first steps."""

import keras

from keras_deq.callbacks import common
from keras_deq.solvers.common import check_nonnegative_int, check_positive_int


class ExplicitPretraining(keras.callbacks.Callback):
    """Trains DEQ layers as explicit networks for the first steps of a run.

    For the first `steps` training steps (the optimizer's iteration counter, so
    a resumed run continues where it stopped), each DEQ layer applies its cell
    `depth` times from the initial state and is differentiated by autodiff, with
    no solver: a weight-tied network of `depth` layers. This is the "pretrain"
    phase of the DEQ recipes (e.g. the DEQ-Transformer's), which gives the cell
    a sensible scale before the solver and the implicit gradient take over. The
    train, test and predict functions are traced again at each switch; at the
    end of `fit` the layers return to solving.

    A `JacobianRegularizationScheduler` given this callback as `after=` counts
    its schedule's steps from the end of this phase, as the recipes do.

    Args:
        steps: Number of explicit training steps, an integer >= 0 (numpy
            integers too).
        depth: Cell applications per explicit forward pass, an integer >= 1.
        layers: A non-empty list of the `keras_deq.DEQ` layers to switch; None
            switches every `DEQ` in the model.
        verbose: If 1, print when the phase starts and ends.

    Example:

    ```python
    model.fit(x, y, epochs=5, callbacks=[
        keras_deq.callbacks.ExplicitPretraining(steps=500, depth=4),
    ])
    ```
    """

    def __init__(self, steps, depth, layers=None, verbose=0):
        super().__init__()
        self.steps = check_nonnegative_int("steps", steps)
        self.depth = check_positive_int("depth", depth)
        self.layers = common.check_layers(layers)
        self.verbose = verbose

    def _switch(self, explicit):
        depth = self.depth if explicit else None
        changed = False
        for layer in common.deq_layers(self):
            changed |= layer.explicit_depth != depth
            layer.explicit_depth = depth
        if changed:
            common.retrace(self.model)
            if self.verbose:
                step = int(self.model.optimizer.iterations.numpy())
                phase = f"explicit (depth {self.depth})" if explicit else "the solver"
                print(f"\nStep {step}: DEQ layers now train with {phase}.")

    def on_train_begin(self, logs=None):
        self._switch(int(self.model.optimizer.iterations.numpy()) < self.steps)

    def on_train_batch_begin(self, batch, logs=None):
        self._switch(int(self.model.optimizer.iterations.numpy()) < self.steps)

    def on_train_end(self, logs=None):
        self._switch(False)
