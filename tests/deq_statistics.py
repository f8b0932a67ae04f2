"""A `DEQ` layer's solver statistics, read the same way on every backend (not tests).

On TensorFlow and PyTorch the layer keeps Keras metrics, `{name}_{key}`, which `fit` and
`evaluate` log. On JAX a layer's metric cannot be updated in `fit` (keras-team/keras#21639): the
layer keeps its last call's forward statistics in variables instead, read with
`solver_statistics()`, and the logs hold none.
"""

import keras

# Whether the layer keeps metrics (TensorFlow, PyTorch) rather than variables (JAX).
LAYER_METRICS = keras.backend.backend() in ("tensorflow", "torch")


def layer_metric(layer, key):
    """The layer's metric `{name}_{key}` (TensorFlow), found through `layer.metrics`."""
    found = [m for m in layer.metrics if m.name == f"{layer.name}_{key}"]
    assert len(found) == 1, [m.name for m in layer.metrics]
    return found[0]


def statistic(layer, key):
    """The layer's statistic `key`: on TensorFlow its metric's value (the mean since the
    last reset); on JAX the last call's."""
    if not LAYER_METRICS:
        return layer.solver_statistics()[key]
    return float(layer_metric(layer, key).result())


def reset_statistics(layer):
    """Starts the layer's metrics afresh (on JAX each call replaces its statistics)."""
    for m in layer.metrics:
        m.reset_state()


def logged(layer, logs, key):
    """The statistic `key` in the logs of `train_on_batch`, `evaluate` or `fit`; on JAX,
    whose logs hold none, the layer's last batch's."""
    if not LAYER_METRICS:
        return layer.solver_statistics()[key]
    return logs[f"{layer.name}_{key}"]


class EpochStatistic(keras.callbacks.Callback):
    """The layer's statistic `key` at each epoch's end, in `values`: the epoch's from the
    logs on TensorFlow; on JAX the last batch's (for `jac_loss`, the last estimate
    applied, 0 before any)."""

    def __init__(self, layer, key):
        super().__init__()
        self.layer, self.key = layer, key
        self.values = []

    def on_epoch_end(self, epoch, logs=None):
        self.values.append(logged(self.layer, logs, self.key))
