"""Training under a `tf.distribute` strategy where Keras' `fit` cannot be used."""

import warnings

import keras
import tensorflow as tf

from keras_deq.solvers.common import check_optional_positive_int, check_positive_int

__all__ = ["fit_distributed"]

VERBOSE = ("auto", 0, 1, 2)


def _check_arguments(model, dataset, epochs, strategy, steps_per_epoch, verbose):
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model. Received: model={model!r}")
    if not getattr(model, "compiled", False) or model.optimizer is None:
        raise ValueError(
            "`model` must be compiled with an optimizer and a loss before training: call "
            "`model.compile(optimizer, loss, ...)` inside `strategy.scope()`."
        )
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(
            "`dataset` must be a tf.data.Dataset of `(x, y)` or `(x, y, sample_weight)` "
            "batches of the global batch size (it is split between the replicas). "
            f"Received: dataset of type {type(dataset).__name__}"
        )
    epochs = check_positive_int("epochs", epochs)
    steps_per_epoch = check_optional_positive_int("steps_per_epoch", steps_per_epoch)
    if steps_per_epoch is None and dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "`dataset` is infinite (it repeats): pass `steps_per_epoch`, or the epoch never ends."
        )
    if verbose not in VERBOSE:
        raise ValueError(f"`verbose` must be one of {VERBOSE}. Received: verbose={verbose!r}")
    if strategy is None:
        strategy = model.distribute_strategy
    elif strategy is not model.distribute_strategy:
        raise ValueError(
            "The model was not created under `strategy`: create and compile it inside "
            "`with strategy.scope():`. Received: strategy="
            f"{type(strategy).__name__}, the model's strategy="
            f"{type(model.distribute_strategy).__name__}"
        )
    return epochs, strategy, steps_per_epoch


def _make_train_function(model, strategy):
    """One training step on a distributed batch; returns logs averaged over replicas."""

    def train_function(data):
        outputs = strategy.run(model.train_step, args=(data,))
        return tf.nest.map_structure(
            lambda value: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None),
            outputs,
        )

    if model.run_eagerly:
        return train_function
    return tf.function(train_function, reduce_retracing=True, jit_compile=model.jit_compile)


def _epoch_logs(model, logs):
    """The metrics read across replicas (total over count), as `fit` reports at epoch end."""
    results = model.get_metrics_result()
    if isinstance(logs, dict) and set(logs) == set(results):
        return results
    return logs


def fit_distributed(
    model,
    dataset,
    epochs=1,
    strategy=None,
    callbacks=None,
    steps_per_epoch=None,
    verbose="auto",
):
    """Trains a compiled model with `strategy.run`, where `model.fit` cannot be used.

    Keras 3's `model.fit` fails under `tf.distribute.MultiWorkerMirroredStrategy`
    ([keras-team/keras#20585](https://github.com/keras-team/keras/issues/20585)). This
    function is a small replacement for that case (it works under any strategy, and
    without one). Each step runs the model's own `train_step` (its compiled loss,
    optimizer and metrics, or your override of `train_step`) in every replica with
    `strategy.run`, on the batches of `strategy.experimental_distribute_dataset(dataset)`,
    inside a `tf.function` (compiled with XLA if `model.jit_compile` is True).

    The loss is scaled as in `fit`: in each replica the compiled loss (the mean over the
    replica's share of the batch) and `model.losses` (a DEQ layer's Jacobian regularizer,
    for instance) are divided by the number of replicas, and the optimizer sums the
    gradients over the replicas. A step therefore follows the gradient of the mean over the
    replicas, which is the mean over the global batch when the shares are equal (batch with
    `drop_remainder=True`, or a global batch size divisible by the number of replicas).

    Metrics are means over the replicas, not sums: the logs of a step average each value
    over the replicas, and the epoch logs read each metric across replicas (total over
    count). A DEQ layer's statistics (`{name}_fwd_steps`, `{name}_converged`, ...) are
    reported like that, as with `fit`.

    Callbacks receive `on_train_begin`/`on_train_end`, `on_epoch_begin`/`on_epoch_end` and
    `on_train_batch_begin`/`on_train_batch_end` with logs, so `keras.callbacks.History`,
    `EarlyStopping` (through `model.stop_training`) and
    `keras_deq.callbacks.JacobianRegularizationScheduler` and
    `keras_deq.callbacks.ExplicitPretraining` work. There is no validation,
    `steps_per_execution` or `initial_epoch`.

    Under `MultiWorkerMirroredStrategy` every worker runs the same program: it creates and
    compiles the model inside `strategy.scope()`, and calls this function with the same
    dataset and arguments. Each worker then trains on its share of every global batch, and
    all workers end with the same weights and logs.

    Args:
        model: A `keras.Model`, created and compiled inside `strategy.scope()`.
        dataset: A `tf.data.Dataset` of `(x, y)` or `(x, y, sample_weight)` batches of the
            global batch size. It is distributed with
            `strategy.experimental_distribute_dataset`.
        epochs: Number of passes over the dataset (a positive integer).
        strategy: The `tf.distribute.Strategy` the model was created under; None uses
            `model.distribute_strategy`.
        callbacks: A list of `keras.callbacks.Callback`s.
        steps_per_epoch: Steps per epoch, required for an infinite dataset; None runs
            each epoch until the dataset ends. When set, one iterator is kept across
            epochs, as in `fit`.
        verbose: `"auto"`, 0 (silent), 1 (progress bar) or 2 (one line per epoch).

    Returns:
        The `keras.callbacks.History` of the run (`history.history[name]` is the list of the
        epoch values of each metric).

    Example:

    ```python
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # reads TF_CONFIG
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((64,)),
            keras.layers.Dense(32),
            keras_deq.DEQ(keras_deq.DenseCell(32), name="deq"),
            keras.layers.Dense(10),
        ])
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(64, drop_remainder=True)
    history = keras_deq.distribute.fit_distributed(model, dataset, epochs=2, strategy=strategy)
    print(history.history["loss"], history.history["deq_fwd_steps"])
    ```
    """
    epochs, strategy, steps_per_epoch = _check_arguments(
        model, dataset, epochs, strategy, steps_per_epoch, verbose
    )
    # Build the model, its optimizer and its compiled metrics outside the replicas, as
    # `fit` does: variables cannot be created inside `strategy.run`.
    with strategy.scope():
        model._symbolic_build(data_batch=dataset.element_spec)
    distributed = strategy.experimental_distribute_dataset(dataset)
    cardinality = int(dataset.cardinality())
    if not isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks = keras.callbacks.CallbackList(
            callbacks,
            add_history=True,
            add_progbar=verbose != 0,
            verbose=verbose,
            epochs=epochs,
            steps=steps_per_epoch or (cardinality if cardinality >= 0 else None),
            model=model,
        )

    model.stop_training = False
    callbacks.on_train_begin()
    # Traced after `on_train_begin`: a callback may change the graph there (the Jacobian
    # regularization scheduler switches the regularizer on).
    train_function = _make_train_function(model, strategy)
    # Callbacks that change the graph mid-run (`ExplicitPretraining`) ask Keras to
    # trace again with `model.make_train_function(force=True)`: follow them.
    traced_for = getattr(model, "train_function", None)
    iterator = iter(distributed) if steps_per_epoch else None
    epoch_logs = None
    for epoch in range(epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        if steps_per_epoch is None:
            iterator = iter(distributed)
        logs, step = {}, 0
        while steps_per_epoch is None or step < steps_per_epoch:
            try:
                data = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                if steps_per_epoch is not None:
                    warnings.warn(
                        f"The dataset ran out of data after {step} steps of epoch {epoch + 1} "
                        f"(steps_per_epoch={steps_per_epoch}): training stops. Repeat the "
                        "dataset (`dataset.repeat()`) or lower `steps_per_epoch`.",
                        stacklevel=2,
                    )
                    model.stop_training = True
                break
            callbacks.on_train_batch_begin(step)
            if getattr(model, "train_function", None) is not traced_for:
                traced_for = model.train_function
                train_function = _make_train_function(model, strategy)
            logs = train_function(data)
            callbacks.on_train_batch_end(step, logs)
            step += 1
            if model.stop_training:
                break
        if step == 0 and epoch == 0:
            raise ValueError("`dataset` yielded no batch: there is nothing to train on.")
        epoch_logs = dict(_epoch_logs(model, logs))
        callbacks.on_epoch_end(epoch, epoch_logs)
        if model.stop_training:
            break

    model.optimizer.finalize_variable_values(model.trainable_weights)
    callbacks.on_train_end(logs=epoch_logs)
    return model.history
