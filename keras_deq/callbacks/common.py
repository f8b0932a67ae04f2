"""What the callbacks share: checking `layers` and finding a model's DEQ layers."""

from keras_deq.layers.deq import DEQ


def check_layers(layers):
    """None, or a non-empty list (or tuple) of `keras_deq.DEQ` layers, as a list."""
    if layers is None:
        return None
    if not isinstance(layers, (list, tuple)):
        raise ValueError(
            "`layers` must be None (every DEQ layer of the model) or a non-empty list of "
            f"keras_deq.DEQ layers. Received: layers={layers!r}"
        )
    if not layers:
        raise ValueError(
            "`layers` is empty, so the callback would steer nothing. Pass None to steer "
            "every DEQ layer of the model, or a non-empty list of keras_deq.DEQ layers. "
            f"Received: layers={layers!r}"
        )
    for layer in layers:
        if not isinstance(layer, DEQ):
            raise ValueError(
                "`layers` must hold keras_deq.DEQ layers (DEQ or a subclass, such as "
                f"PcDEQ). Received an element of type {type(layer).__name__}: {layer!r}"
            )
    return list(layers)


def deq_layers(callback, hint=""):
    """The DEQ layers a callback steers: its `layers`, or every DEQ of its model."""
    if callback.layers is not None:
        return list(callback.layers)
    found = [layer for layer in callback.model._flatten_layers() if isinstance(layer, DEQ)]
    if not found:
        raise ValueError(
            f"{type(callback).__name__} found no DEQ layer in the model. {hint}".rstrip()
        )
    return found


def retrace(model):
    """Makes Keras trace its train, test and predict functions again."""
    model.make_train_function(force=True)
    model.make_test_function(force=True)
    model.make_predict_function(force=True)
