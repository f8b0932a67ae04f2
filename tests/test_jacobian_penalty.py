"""`JacobianPenalty`: the Jacobian regularizer as an object, and how `DEQ` takes it."""

import json

import keras
import numpy as np
import pytest
from keras import ops

import keras_deq
from keras_deq import DEQ, DenseCell, JacobianPenalty
from keras_deq.jacobian_penalty import get


def linear_layer(**kwargs):
    """A linear cell with W = 0.5 * orthogonal: ||W||_F^2 / d = 0.25 exactly."""
    cell = DenseCell(
        8, activation="linear", kernel_initializer=keras.initializers.Orthogonal(0.5, seed=0)
    )
    return DEQ(cell, seed=3, name="deq", **kwargs)


def data(seed=0):
    return ops.convert_to_tensor(np.random.default_rng(seed).normal(size=(6, 8)), "float32")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight": -1.0}, r"`weight`.*weight=-1.0"),
        ({"weight": float("nan")}, r"weight=nan"),
        ({"frequency": 0.0}, r"`frequency`.*frequency=0.0"),
        ({"frequency": 1.5}, r"frequency=1.5"),
        ({"probes": 0}, r"`probes`.*probes=0"),
        ({"max_iter_delta": -1}, r"`max_iter_delta`.*max_iter_delta=-1"),
        ({"max_iter_delta": 1.5}, r"max_iter_delta=1.5"),
    ],
)
def test_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JacobianPenalty(**kwargs)


def test_the_object_and_the_flat_arguments_give_the_same_loss():
    x = data()
    by_object = linear_layer(regularizer=JacobianPenalty(weight=2.0, probes=64))
    flat = linear_layer(jacobian_weight=2.0, jacobian_probes=64)
    by_object(x, training=True)
    flat(x, training=True)
    assert len(by_object.losses) == 1
    np.testing.assert_array_equal(float(by_object.losses[0]), float(flat.losses[0]))
    # 2 * 0.25 up to the Hutchinson error of 64 probes: the estimate is what it claims.
    assert abs(float(by_object.losses[0]) - 0.5) < 0.08
    by_object(x, training=False)
    assert by_object.losses == []


def test_weight_zero_stays_out_of_the_graph_until_set():
    layer = linear_layer(regularizer=JacobianPenalty(weight=0.0))
    layer(data(), training=True)
    assert layer.losses == []
    with pytest.warns(UserWarning, match="traced again"):
        layer.jacobian_weight = 1.0
    layer(data(), training=True)
    assert len(layer.losses) == 1 and float(layer.losses[0]) > 0.1


def test_the_penalty_set_twice_is_refused():
    with pytest.raises(ValueError, match="set twice"):
        linear_layer(regularizer=JacobianPenalty(1.0), jacobian_weight=0.5)
    with pytest.raises(ValueError, match="set twice"):
        linear_layer(regularizer=JacobianPenalty(1.0), jacobian_probes=2)


@pytest.mark.parametrize("bad", ["jacobian", 1.0, {"class_name": "Anderson", "config": {}}])
def test_a_bad_regularizer_is_refused(bad):
    with pytest.raises(ValueError, match="`regularizer` must be"):
        get(bad)
    with pytest.raises(ValueError, match="`regularizer` must be"):
        linear_layer(regularizer=bad)


def test_config_round_trip_keeps_the_object_and_the_current_weight():
    penalty = JacobianPenalty(weight=1.0, frequency=0.5, probes=2, max_iter_delta=2)
    layer = linear_layer(regularizer=penalty)
    layer.build((None, 8))
    layer.jacobian_weight = 0.25  # as a scheduler would
    config = json.loads(json.dumps(layer.get_config()))
    assert config["jacobian_weight"] == 0.0  # the flat shorthand is unused
    assert config["regularizer"]["config"] == {
        "weight": 0.25,
        "frequency": 0.5,
        "probes": 2,
        "max_iter_delta": 2,
    }
    clone = DEQ.from_config(config)
    assert clone.jacobian_weight == 0.25 and clone.jacobian_probes == 2
    assert clone.jacobian_max_iter_delta == 2
    assert json.loads(json.dumps(clone.get_config())) == config


def test_flat_arguments_keep_their_config_keys():
    config = linear_layer(jacobian_weight=0.5, jacobian_frequency=0.25).get_config()
    assert config["regularizer"] is None
    assert (config["jacobian_weight"], config["jacobian_frequency"]) == (0.5, 0.25)


def test_budget_draws_max_iter_plus_delta_only_on_picked_steps():
    penalty = JacobianPenalty(max_iter_delta=3)
    seed = keras.random.SeedGenerator(0)
    picked = [int(penalty.budget(10, True, seed)) for _ in range(300)]
    assert set(picked) == set(range(7, 13))  # 10 + {-3, ..., 2}
    assert {int(penalty.budget(10, False, seed)) for _ in range(20)} == {10}
    assert penalty.budget(10, True, seed) is not None
    assert JacobianPenalty().budget(10, True, seed) == 10  # no delta: the int itself


def test_the_scheduler_drives_a_layer_built_with_the_object():
    layer = linear_layer(regularizer=JacobianPenalty(weight=0.0))
    model = keras.Sequential([keras.Input((8,)), layer, keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    schedule = keras_deq.callbacks.JacobianRegularizationScheduler(lambda epoch: 0.5 * epoch)
    x, y = ops.convert_to_numpy(data()), np.zeros((6, 1), "float32")
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[schedule])
    assert float(layer.jacobian_weight.numpy()) == 0.5
    if keras.backend.backend() != "jax":
        assert history.history["deq_jac_loss"][-1] > 0.1
    else:  # JAX `fit` logs lack the DEQ's metrics; its variables hold the last step's
        assert layer.solver_statistics()["jac_loss"] > 0.1
