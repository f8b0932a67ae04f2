"""`stepwise_schedule` and `JacobianRegularizationScheduler` (spec section 2.2)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from keras_deq.callbacks import JacobianRegularizationScheduler, stepwise_schedule

# 32 samples, batch 8: 4 steps per epoch.
_RNG = np.random.default_rng(0)
_X = _RNG.normal(size=(32, 3)).astype("float32")
_Y = _RNG.normal(size=(32, 1)).astype("float32")
STEPS_PER_EPOCH = 4


# ------------------------------------------------------------ stepwise_schedule
def test_stepwise_schedule_values():
    initial, increment, every, stop = 0.5, 0.1, 3, 10
    schedule = stepwise_schedule(initial, increment=increment, every=every, stop_step=stop)
    for step in range(20):
        expected = 0.0 if step >= stop else initial + increment * math.floor(step / every)
        assert schedule(step) == pytest.approx(expected, abs=1e-12), step
        assert isinstance(schedule(step), float)
    # Explicit values: constant within a block, a bump at each multiple of `every`.
    assert schedule(0) == schedule(2) == 0.5
    assert schedule(3) == pytest.approx(0.6)
    assert schedule(9) == pytest.approx(0.8)
    assert schedule(10) == 0.0
    assert schedule(10_000) == 0.0


def test_stepwise_schedule_docstring_example():
    schedule = stepwise_schedule(1.0, increment=0.1, every=100, stop_step=1000)
    assert schedule(0) == 1.0
    assert schedule(99) == 1.0
    assert schedule(250) == pytest.approx(1.2)
    assert schedule(999) == pytest.approx(1.9)
    assert schedule(1000) == 0.0


def test_stepwise_schedule_constant_and_never_stopping():
    schedule = stepwise_schedule(0.7)
    assert [schedule(s) for s in (0, 1, 10**6)] == [0.7, 0.7, 0.7]
    growing = stepwise_schedule(0.0, increment=0.25, every=2)
    assert growing(10**3) == pytest.approx(0.25 * 500)


def test_stepwise_schedule_stop_at_zero():
    schedule = stepwise_schedule(2.0, increment=1.0, every=1, stop_step=0)
    assert schedule(0) == 0.0
    assert schedule(5) == 0.0


# ------------------------------------------------- JacobianRegularizationScheduler
def _deq(name, weight=0.0, frequency=1.0):
    return keras_deq.DEQ(
        keras_deq.DenseCell(4),
        jacobian_weight=weight,
        jacobian_frequency=frequency,
        solver="fixed_point",
        backward="one_step",
        max_iter=5,
        on_failure="ignore",
        seed=0,
        name=name,
    )


def _model(*deqs):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((3,)), keras.layers.Dense(4)]
    layers += list(deqs) if deqs else [keras.layers.Dense(4, activation="tanh")]
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.SGD(1e-2), loss="mse")
    return model


class _Recorder(keras.callbacks.Callback):
    """Records (optimizer step, weight, frequency) of one layer at each batch begin."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.rows = []

    def on_train_batch_begin(self, batch, logs=None):
        self.rows.append(
            (
                int(self.model.optimizer.iterations.numpy()),
                float(np.asarray(self.layer.jacobian_weight)),
                float(np.asarray(self.layer.jacobian_frequency)),
            )
        )


def _fit(model, callbacks, epochs=2):
    return model.fit(
        _X, _Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks
    )


def test_scheduler_sets_weight_per_step_from_optimizer_iterations():
    deq = _deq("deq")
    model = _model(deq)
    schedule = stepwise_schedule(0.5, increment=0.25, every=3)
    recorder = _Recorder(deq)
    _fit(model, [JacobianRegularizationScheduler(schedule), recorder], epochs=2)
    steps = [row[0] for row in recorder.rows]
    assert steps == list(range(2 * STEPS_PER_EPOCH))
    np.testing.assert_allclose([row[1] for row in recorder.rows], [schedule(s) for s in steps])
    # The layer's variable after fit holds schedule(last step).
    last = 2 * STEPS_PER_EPOCH - 1
    assert float(deq.jacobian_weight.numpy()) == pytest.approx(schedule(last))
    assert float(deq.jacobian_weight.numpy()) != pytest.approx(schedule(0))
    # Frequency untouched when None.
    assert float(deq.jacobian_frequency.numpy()) == 1.0


def test_scheduler_continues_across_fit_calls():
    deq = _deq("deq")
    model = _model(deq)
    schedule = stepwise_schedule(0.1, increment=0.1, every=1)
    callback = JacobianRegularizationScheduler(schedule)
    _fit(model, [callback], epochs=1)
    recorder = _Recorder(deq)
    _fit(model, [callback, recorder], epochs=1)
    steps = [row[0] for row in recorder.rows]
    assert steps == list(range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))
    np.testing.assert_allclose([row[1] for row in recorder.rows], [schedule(s) for s in steps])


def test_scheduled_weight_is_used_by_the_compiled_train_step():
    # Weight 0 during epoch 1, positive during epoch 2: the (unweighted) Jacobian
    # metric is only recorded when the regularizer is applied, so it is 0 in the
    # first epoch and positive in the second -- the compiled step reads the variable.
    deq = _deq("deq", weight=0.0)
    model = _model(deq)
    history = _fit(
        model,
        [JacobianRegularizationScheduler(lambda step: 0.0 if step < STEPS_PER_EPOCH else 1.0)],
        epochs=2,
    )
    jac = history.history["deq_jac_loss"]
    assert jac[0] == 0.0
    assert jac[1] > 0.0
    assert history.history["jacobian_weight"] == [0.0, 1.0]


def test_scheduler_fixed_frequency():
    deq = _deq("deq", frequency=1.0)
    model = _model(deq)
    recorder = _Recorder(deq)
    _fit(model, [JacobianRegularizationScheduler(lambda s: 0.2, frequency=0.3), recorder])
    np.testing.assert_allclose([row[2] for row in recorder.rows], 0.3, rtol=1e-6)
    assert float(deq.jacobian_frequency.numpy()) == pytest.approx(0.3)
    assert float(deq.jacobian_weight.numpy()) == pytest.approx(0.2)


def test_scheduler_callable_frequency():
    deq = _deq("deq", frequency=1.0)
    model = _model(deq)
    recorder = _Recorder(deq)

    def frequency(step):
        return 0.1 + 0.1 * step

    _fit(model, [JacobianRegularizationScheduler(lambda s: 0.2, frequency=frequency), recorder])
    steps = [row[0] for row in recorder.rows]
    np.testing.assert_allclose([row[2] for row in recorder.rows], [frequency(s) for s in steps])
    last = 2 * STEPS_PER_EPOCH - 1
    assert float(deq.jacobian_frequency.numpy()) == pytest.approx(frequency(last))


def test_scheduler_finds_all_deq_layers_including_nested():
    outer = _deq("outer", weight=0.0)
    inner = _deq("inner", weight=0.0)
    keras.utils.set_random_seed(0)
    block = keras.Sequential([keras.Input((4,)), inner], name="block")
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4)(inputs)
    h = outer(h)
    h = block(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile(optimizer=keras.optimizers.SGD(1e-2), loss="mse")
    _fit(model, [JacobianRegularizationScheduler(lambda s: 0.4, frequency=0.5)], epochs=1)
    for layer in (outer, inner):
        assert float(layer.jacobian_weight.numpy()) == pytest.approx(0.4)
        assert float(layer.jacobian_frequency.numpy()) == pytest.approx(0.5)


def test_scheduler_only_steers_the_given_layers():
    first = _deq("first", weight=0.0)
    second = _deq("second", weight=0.05, frequency=0.9)
    model = _model(first, second)
    _fit(
        model,
        [JacobianRegularizationScheduler(lambda s: 0.4, frequency=0.5, layers=[first])],
        epochs=1,
    )
    assert float(first.jacobian_weight.numpy()) == pytest.approx(0.4)
    assert float(first.jacobian_frequency.numpy()) == pytest.approx(0.5)
    assert float(second.jacobian_weight.numpy()) == pytest.approx(0.05)
    assert float(second.jacobian_frequency.numpy()) == pytest.approx(0.9)


def test_scheduler_without_deq_layers_raises():
    model = _model()
    with pytest.raises(ValueError, match="DEQ"):
        _fit(model, [JacobianRegularizationScheduler(lambda s: 0.1)], epochs=1)


@pytest.mark.parametrize("bad", [0.5, None, "0.5", [0.1, 0.2]])
def test_non_callable_schedule_raises(bad):
    with pytest.raises(ValueError, match="schedule"):
        JacobianRegularizationScheduler(bad)


def test_negative_scheduled_weight_is_refused():
    model = _model(_deq("deq"))
    with pytest.raises(ValueError, match="jacobian_weight"):
        _fit(model, [JacobianRegularizationScheduler(lambda s: -1.0)], epochs=1)


def test_out_of_range_frequency_is_refused():
    model = _model(_deq("deq"))
    with pytest.raises(ValueError, match="jacobian_frequency"):
        _fit(model, [JacobianRegularizationScheduler(lambda s: 0.1, frequency=0.0)], epochs=1)


def test_scheduler_verbose_prints_on_change(capsys):
    model = _model(_deq("deq"))
    schedule = stepwise_schedule(0.5, increment=0.5, every=3)
    _fit(model, [JacobianRegularizationScheduler(schedule, verbose=1)], epochs=2)
    out = capsys.readouterr().out
    # 8 steps, weight changes at steps 0, 3 and 6.
    assert out.count("Jacobian regularization weight set to") == 3
    assert "Step 3: Jacobian regularization weight set to 1." in out
    assert "Step 6: Jacobian regularization weight set to 1.5." in out


def test_scheduler_on_unbuilt_layer_before_fit():
    # A DEQ not yet built when fit starts: the weight set by the callback must be
    # the one the built layer starts with.
    deq = _deq("deq", weight=0.0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(4), deq, keras.layers.Dense(1)])
    assert not deq.built
    model.compile(optimizer=keras.optimizers.SGD(1e-2), loss="mse")
    history = _fit(model, [JacobianRegularizationScheduler(lambda s: 0.3)], epochs=1)
    assert float(deq.jacobian_weight.numpy()) == pytest.approx(0.3)
    assert history.history["deq_jac_loss"][0] > 0.0


# ------------------------------------------------------------ ExplicitPretraining
def _pretrain_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras_deq.DEQ(keras_deq.DenseCell(4), max_iter=25, tol=1e-5, name="deq"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(0.05), "mse")
    return model


class _BatchLog(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        layer = self.model.get_layer("deq")
        self.rows.append((layer.explicit_depth, float(logs["deq_fwd_steps"])))


def test_explicit_depth_applies_the_cell_depth_times_with_autodiff_gradients():
    model = _pretrain_model()
    layer = model.get_layer("deq")
    x = keras.ops.convert_to_tensor(_X[:5])
    layer.explicit_depth = 3
    with tf.GradientTape() as tape:
        out = model(x, training=True)
    grads = tape.gradient(out, model.trainable_variables)
    # Independent computation: three explicit cell calls, autodiff.
    with tf.GradientTape() as tape:
        h = model.layers[0](x)
        z = tf.zeros_like(h)
        for _ in range(3):
            z = layer.cell(z, h)
        ref = model.layers[2](z)
    ref_grads = tape.gradient(ref, model.trainable_variables)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-5, atol=1e-6)
    # Three steps do not reach the equilibrium: the solver's output differs.
    layer.explicit_depth = None
    assert not np.allclose(model(x).numpy(), out.numpy(), atol=1e-4)


def test_pretraining_switches_from_explicit_to_solver_at_the_step():
    model = _pretrain_model()
    log = _BatchLog()
    pretrain = keras_deq.callbacks.ExplicitPretraining(steps=6, depth=2)
    model.fit(_X, _Y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[pretrain, log])
    depths = [d for d, _ in log.rows]
    assert depths == [2] * 6 + [None] * 6
    # fwd_steps is a running mean over the epoch: epoch 1 is all explicit (2 steps each).
    assert [s for _, s in log.rows[:4]] == [2.0] * 4
    assert log.rows[-1][1] > 2.0  # the solver needs more than two steps to tol=1e-5
    assert model.get_layer("deq").explicit_depth is None  # solving again after fit


def test_pretraining_equals_training_the_explicit_network():
    reference = _pretrain_model()
    reference.get_layer("deq").explicit_depth = 2
    reference.fit(_X, _Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    model = _pretrain_model()
    pretrain = keras_deq.callbacks.ExplicitPretraining(steps=4, depth=2)
    model.fit(_X, _Y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[pretrain])
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Without the callback the same run (solver + implicit gradient) ends elsewhere.
    plain = _pretrain_model()
    plain.fit(_X, _Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    differ = [
        not np.allclose(a, b, atol=1e-6)
        for a, b in zip(plain.get_weights(), model.get_weights(), strict=True)
    ]
    assert any(differ)


def test_pretraining_resumes_from_the_optimizer_step():
    model = _pretrain_model()
    model.fit(_X, _Y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # 4 steps done
    log = _BatchLog()
    pretrain = keras_deq.callbacks.ExplicitPretraining(steps=6, depth=3)
    model.fit(_X, _Y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[pretrain, log])
    assert [d for d, _ in log.rows] == [3, 3, None, None]


def test_pretraining_validation_uses_the_current_phase():
    model = _pretrain_model()
    pretrain = keras_deq.callbacks.ExplicitPretraining(steps=100, depth=2)
    history = model.fit(
        _X, _Y, batch_size=8, epochs=1, verbose=0, validation_data=(_X, _Y), callbacks=[pretrain]
    )
    assert history.history["val_deq_fwd_steps"] == [2.0]
    assert model.evaluate(_X, _Y, verbose=0, return_dict=True)["deq_fwd_steps"] > 2.0


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"steps": -1, "depth": 2}, "steps"),
        ({"steps": 1.5, "depth": 2}, "steps"),
        ({"steps": 3, "depth": 0}, "depth"),
        ({"steps": 3, "depth": True}, "depth"),
    ],
)
def test_pretraining_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        keras_deq.callbacks.ExplicitPretraining(**kwargs)


def test_explicit_depth_setter_checks_its_value():
    layer = keras_deq.DEQ(keras_deq.DenseCell(4))
    with pytest.raises(ValueError, match="explicit_depth"):
        layer.explicit_depth = 0
