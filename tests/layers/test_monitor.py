"""Tests of `keras_deq.layers.monitor`: the failure warning of a traced training step."""

import os
import warnings

import keras
import numpy as np
import pytest

from keras_deq import DEQ, DenseCell


def _failing_model():
    """A DEQ whose forward and adjoint solves never reach their tolerance."""
    deq = DEQ(
        DenseCell(5),
        max_iter=2,
        tol=1e-12,
        backward="implicit",
        backward_max_iter=2,
        backward_tol=1e-12,
        name="deq",
    )
    model = keras.Sequential([keras.Input((5,)), deq, keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    return model, deq


def _fit(model, epochs=2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = rng.normal(size=(64, 3)).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=8, epochs=epochs, verbose=0)
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.tensorflow_only(reason="the gate is a TensorFlow graph variable")
def test_a_traced_step_calls_the_host_once_per_layer():
    model, deq = _failing_model()
    calls = []
    original = deq._on_host_failure

    def counting(*args):
        calls.append(args[0])
        return original(*args)

    deq._on_host_failure = counting
    caught = _fit(model)
    # 16 failing steps, each with a failing forward and adjoint solve: one call.
    assert calls == ["forward"]
    assert len(caught) == 1
    assert "forward solver did not reach tol=1e-12" in str(caught[0].message)
    assert float(model.get_metrics_result()["deq_converged"]) == 0.0


@pytest.mark.tensorflow_only(reason="the gate is a TensorFlow graph variable")
def test_the_gate_is_not_a_weight_and_is_not_saved(tmp_path):
    model, deq = _failing_model()
    names = [v.path for v in model.variables]
    assert not any("warning_gate" in name for name in names)
    _fit(model, epochs=1)
    assert int(deq._warning_gate.variable.numpy()) == 0
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert len(loaded.weights) == len(model.weights)
    # A new layer warns again.
    assert int(loaded.get_layer("deq")._warning_gate.variable.numpy()) == 1
    assert len(_fit(loaded, epochs=1)) == 1
