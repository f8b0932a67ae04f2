"""`stepwise_schedule` and `JacobianRegularizationScheduler` (spec section 2.2),
`ExplicitPretraining` and `SolverLogger`."""

import contextlib
import math

import keras
import numpy as np
import pytest
from deq_statistics import EpochStatistic
from feature_references import layer_gradients
from keras import ops

import keras_deq
from keras_deq.callbacks import JacobianRegularizationScheduler, SolverLogger, stepwise_schedule

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
    jac = EpochStatistic(deq, "jac_loss")
    history = _fit(
        model,
        [
            JacobianRegularizationScheduler(lambda step: 0.0 if step < STEPS_PER_EPOCH else 1.0),
            jac,
        ],
        epochs=2,
    )
    assert jac.values[0] == 0.0
    assert jac.values[1] > 0.0
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
    jac = EpochStatistic(deq, "jac_loss")
    _fit(model, [JacobianRegularizationScheduler(lambda s: 0.3), jac], epochs=1)
    assert float(deq.jacobian_weight.numpy()) == pytest.approx(0.3)
    assert jac.values[0] > 0.0


# ------------------------------------- counting the schedule after pretraining
def test_scheduler_counts_steps_from_the_end_of_explicit_pretraining():
    # The recipe: gamma_t = gamma_0 + 0.1 floor(t_deq / inc), t_deq counting the
    # steps after pretraining; no penalty during pretraining (pretrain_weight=0).
    deq = _deq("deq")
    model = _model(deq)
    schedule = stepwise_schedule(0.5, increment=0.25, every=2)
    pretrain = keras_deq.callbacks.ExplicitPretraining(steps=3, depth=2)
    scheduler = JacobianRegularizationScheduler(schedule, after=pretrain)
    recorder = _Recorder(deq)
    history = _fit(model, [pretrain, scheduler, recorder], epochs=2)
    steps = [row[0] for row in recorder.rows]
    assert steps == list(range(8))
    expected = [0.0, 0.0, 0.0] + [schedule(t - 3) for t in range(3, 8)]
    np.testing.assert_allclose([row[1] for row in recorder.rows], expected, rtol=1e-6)
    assert expected[3:] == [0.5, 0.5, 0.75, 0.75, 1.0]  # starts at gamma_0 after pretraining
    assert history.history["jacobian_weight"] == [0.5, 1.0]
    # `after` reads the callback's `steps` at each batch.
    pretrain.steps = 6
    recorder.rows.clear()
    _fit(model, [scheduler, recorder], epochs=1)  # optimizer steps 8..11
    np.testing.assert_allclose(
        [row[1] for row in recorder.rows], [schedule(t - 6) for t in (8, 9, 10, 11)]
    )


def test_scheduler_after_a_step_with_a_pretraining_weight_and_frequency():
    deq = _deq("deq", frequency=1.0)
    model = _model(deq)
    seen = []

    def frequency(step):
        seen.append(step)
        return 0.2 + 0.1 * step

    scheduler = JacobianRegularizationScheduler(
        lambda step: 1.0 + step,
        frequency=frequency,
        after=np.int64(5),
        pretrain_weight=0.03,
    )
    recorder = _Recorder(deq)
    _fit(model, [scheduler, recorder], epochs=2)
    np.testing.assert_allclose(
        [row[1] for row in recorder.rows], [0.03] * 5 + [1.0, 2.0, 3.0], rtol=1e-6
    )
    # The frequency function sees the schedule's step: 0 during pretraining.
    assert seen == [0, 0, 0, 0, 0, 0, 1, 2]
    np.testing.assert_allclose([row[2] for row in recorder.rows], [0.2] * 6 + [0.3, 0.4], rtol=1e-6)


def test_scheduler_after_pretraining_resumes_exactly_with_backup_and_restore(tmp_path):
    # The schedule's step is derived from the optimizer's counter, which the backup
    # restores: a resumed run continues the weights of the interrupted one exactly.
    schedule = stepwise_schedule(0.1, increment=0.1, every=2)

    def run(callbacks):
        deq = _deq("deq")
        model = _model(deq)
        pretrain = keras_deq.callbacks.ExplicitPretraining(steps=5, depth=2)
        recorder = _Recorder(deq)
        scheduler = JacobianRegularizationScheduler(schedule, after=pretrain)
        with contextlib.suppress(_Interrupted):
            _fit(model, [*callbacks, pretrain, scheduler, recorder], epochs=2)
        return recorder.rows

    def backup():
        return keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))

    first = run([backup(), _InterruptAt(step=6)])  # the epoch-1 backup holds 4 steps
    resumed = run([backup()])
    assert [row[0] for row in first] == list(range(6))
    assert [row[0] for row in resumed] == list(range(4, 8))
    weights = [row[1] for row in first] + [row[1] for row in resumed[2:]]
    expected = [0.0] * 5 + [schedule(t - 5) for t in range(5, 8)]
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert resumed[:2] == first[4:6]  # the replayed steps get the same weights


class _Interrupted(Exception):
    pass


class _InterruptAt(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_begin(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            raise _Interrupted


def test_scheduler_verbose_names_the_phase(capsys):
    model = _model(_deq("deq"))
    scheduler = JacobianRegularizationScheduler(
        stepwise_schedule(0.5, increment=0.5, every=3), after=2, verbose=1
    )
    _fit(model, [scheduler], epochs=2)
    out = capsys.readouterr().out
    assert "Step 0 (pretraining): Jacobian regularization weight set to 0." in out
    assert "Step 2 (schedule step 0): Jacobian regularization weight set to 0.5." in out
    assert "Step 5 (schedule step 3): Jacobian regularization weight set to 1." in out


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"after": -1}, "after"),
        ({"after": 1.5}, "after"),
        ({"after": "pretraining"}, "after"),
        ({"after": True}, "after"),
        ({"after": 3, "pretrain_weight": -0.1}, "pretrain_weight"),
        ({"pretrain_weight": 0.1}, "pretrain_weight"),  # no `after`: never used
    ],
)
def test_scheduler_bad_after_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        JacobianRegularizationScheduler(lambda s: 0.1, **kwargs)


# ---------------------------------------------------------- argument checks
def _scheduler(layers):
    return JacobianRegularizationScheduler(lambda s: 0.1, layers=layers)


def _pretraining(layers):
    return keras_deq.callbacks.ExplicitPretraining(steps=2, depth=2, layers=layers)


def _logger(layers):
    return SolverLogger(layers=layers)


@pytest.mark.parametrize("make", [_scheduler, _pretraining, _logger])
def test_empty_layers_is_refused(make):
    # `layers=[]` used to steer nothing, silently, while the logs showed a weight.
    with pytest.raises(ValueError, match="`layers` is empty"):
        make([])


@pytest.mark.parametrize("make", [_scheduler, _pretraining, _logger])
def test_non_deq_layers_are_refused_with_a_clear_error(make):
    # `layers=[Dense(1)]` used to fail inside `fit` with an AttributeError.
    with pytest.raises(ValueError, match=r"`layers` must hold keras_deq\.DEQ layers.*Dense"):
        make([_deq("deq"), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=r"`layers` must be None.*keras_deq\.DEQ"):
        make(_deq("deq"))  # a layer, not a list


def test_layers_may_be_a_tuple_of_deqs_and_subclasses():
    pc = keras_deq.PcDEQ(4)
    scheduler = JacobianRegularizationScheduler(lambda s: 0.1, layers=(pc,))
    assert scheduler.layers == [pc]


def test_numpy_integers_are_accepted():
    every, stop = np.int64(10), np.int32(30)
    schedule = stepwise_schedule(0.5, increment=0.1, every=every, stop_step=stop)
    reference = stepwise_schedule(0.5, increment=0.1, every=10, stop_step=30)
    assert [schedule(t) for t in range(40)] == [reference(t) for t in range(40)]
    pretrain = keras_deq.callbacks.ExplicitPretraining(steps=np.int64(2), depth=np.int8(3))
    assert (pretrain.steps, pretrain.depth) == (2, 3)
    assert type(pretrain.steps) is int and type(pretrain.depth) is int
    # ... and act like ints during fit.
    model = _pretrain_model()
    log = _BatchLog()
    model.fit(_X, _Y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[pretrain, log])
    assert [d for d, _ in log.rows] == [3, 3, None, None]


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"every": 0}, "every"),
        ({"every": 2.0}, "every"),
        ({"every": True}, "every"),
        ({"stop_step": -1}, "stop_step"),
        ({"stop_step": np.float64(3)}, "stop_step"),
    ],
)
def test_stepwise_schedule_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        stepwise_schedule(0.5, **kwargs)


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
        # `self.model` makes JAX write the step's variables back to the layers.
        layer = self.model.get_layer("deq")
        self.rows.append((layer.explicit_depth, layer.solver_statistics()["fwd_steps"]))


class _ThreeCellCalls(keras.layers.Layer):
    """`_pretrain_model`'s layers with the DEQ replaced by three calls of its cell."""

    def __init__(self, model):
        super().__init__(name="three_cell_calls")
        self.dense, self.deq, self.readout = model.layers

    def call(self, x, training=None):
        h = self.dense(x)
        z = ops.zeros_like(h)
        for _ in range(3):
            z = self.deq.cell(z, h)
        return self.readout(z)


def test_explicit_depth_applies_the_cell_depth_times_with_autodiff_gradients():
    model = _pretrain_model()
    layer = model.get_layer("deq")
    x = ops.convert_to_tensor(_X[:5])
    layer.explicit_depth = 3
    out = model(x, training=True)
    grads = layer_gradients(model, x, ops.sum, model.trainable_variables)[1:]
    # Independent computation: three explicit cell calls, autodiff.
    reference = _ThreeCellCalls(model)
    ref = reference(x, training=True)
    ref_grads = layer_gradients(reference, x, ops.sum, model.trainable_variables)[1:]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)
    # Three steps do not reach the equilibrium: the solver's output differs.
    layer.explicit_depth = None
    assert not np.allclose(np.asarray(model(x)), np.asarray(out), atol=1e-4)


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
    model.fit(
        _X, _Y, batch_size=8, epochs=1, verbose=0, validation_data=(_X, _Y), callbacks=[pretrain]
    )
    # The statistics of the validation, which ran last (on TensorFlow, the logs'
    # `val_deq_fwd_steps`; JAX's logs hold no layer metrics).
    layer = model.get_layer("deq")
    assert layer.solver_statistics()["fwd_steps"] == 2.0
    model.evaluate(_X, _Y, verbose=0)
    assert layer.solver_statistics()["fwd_steps"] > 2.0


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


# ------------------------------------------------------------------ SolverLogger
_LABELS = (_X[:, 0] > 0).astype("int32")


def _solving_deq(name):
    """A DEQ whose step counts vary (Anderson up to a tolerance), unlike `_deq`'s."""
    return keras_deq.DEQ(
        keras_deq.DenseCell(4), tol=1e-3, max_iter=20, on_failure="ignore", seed=0, name=name
    )


def _classifier(*deqs):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((3,)), keras.layers.Dense(4), *deqs, keras.layers.Dense(2)]
    model = keras.Sequential(layers)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _log(model, epochs=2, validation=True, **kwargs):
    """Fits with a `SolverLogger(**kwargs)`; returns its lines and the history."""
    lines = []
    logger = SolverLogger(print_fn=lines.append, **kwargs)
    history = model.fit(
        _X,
        _LABELS,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        validation_data=(_X, _LABELS) if validation else None,
        callbacks=[logger],
    )
    return lines, history.history


def _check_printed(text, value):
    """`text` is `value` printed: equal up to half a unit of its last printed digit."""
    mantissa, _, exponent = text.partition("e")
    decimals = len(mantissa.partition(".")[2])
    assert decimals > 0, text
    tolerance = 0.5 * 10.0 ** (int(exponent or 0) - decimals)
    assert abs(float(text) - value) <= tolerance * 1.001, (text, value)


@pytest.mark.tensorflow_only(
    "checks the printed statistics against fit's logs, which hold the DEQ's metrics only on "
    "TensorFlow (keras-team/keras#21639); on JAX SolverLogger prints the layers' last "
    "statistics, tested in tests/jax"
)
def test_solver_logger_prints_the_history():
    model = _classifier(_solving_deq("deq"))
    lines, history = _log(model)
    header, *rows = lines
    titles = ["epoch", "accuracy", "val_accuracy", "fwd steps", "fwd resid", "bwd steps"]
    titles += ["bwd resid", "converged", "epoch s"]
    assert header.split() == " ".join(titles).split()
    assert len(rows) == 2
    # Aligned: every value ends where its title ends.
    ends = [header.index(title) + len(title) for title in titles]
    keys = ["accuracy", "val_accuracy", "deq_fwd_steps", "deq_fwd_residual", "deq_bwd_steps"]
    keys += ["deq_bwd_residual", "deq_converged"]
    for epoch, row in enumerate(rows):
        assert len(row) == len(header)
        cells = row.split()
        assert [row[end - len(cell) : end] for end, cell in zip(ends, cells, strict=True)] == cells
        assert cells[0] == str(epoch + 1)
        for key, cell in zip(keys, cells[1:-1], strict=True):
            _check_printed(cell, history[key][epoch])
        assert 0 < float(cells[-1]) < 600
    # Not a constant: the solver's step counts and residuals are measured values.
    assert history["deq_fwd_steps"][0] != history["deq_fwd_steps"][1]


@pytest.mark.tensorflow_only(
    "checks the printed statistics against fit's logs, which hold the DEQ's metrics only on "
    "TensorFlow (keras-team/keras#21639); on JAX SolverLogger prints the layers' last "
    "statistics, tested in tests/jax"
)
def test_solver_logger_columns_per_deq_layer_and_every():
    model = _classifier(_solving_deq("deq1"), _solving_deq("deq2"))
    lines, history = _log(
        model,
        epochs=3,
        metrics={"loss": "train loss"},
        stats=("fwd_steps", "val_fwd_steps", "jac_loss"),
        prefix="[w0] ",
        every=2,
    )
    header, *rows = lines
    titles = ["train loss", "deq1 fwd steps", "deq1 val fwd steps", "deq1 jac loss"]
    titles += ["deq2 fwd steps", "deq2 val fwd steps", "deq2 jac loss"]
    assert header.split() == " ".join(["[w0]", "epoch", *titles, "epoch s"]).split()
    assert all(line.startswith("[w0] ") for line in lines)
    assert [row.split()[1] for row in rows] == ["2", "3"]  # every 2nd epoch, and the last
    keys = ["loss", "deq1_fwd_steps", "val_deq1_fwd_steps", "deq1_jac_loss"]
    keys += ["deq2_fwd_steps", "val_deq2_fwd_steps", "deq2_jac_loss"]
    for row, epoch in zip(rows, (1, 2), strict=True):
        for key, cell in zip(keys, row.split()[2:-1], strict=True):
            _check_printed(cell, history[key][epoch])


@pytest.mark.tensorflow_only(
    "checks the printed statistics against fit's logs, which hold the DEQ's metrics only on "
    "TensorFlow (keras-team/keras#21639); on JAX SolverLogger prints the layers' last "
    "statistics, tested in tests/jax"
)
def test_solver_logger_only_the_given_layers_and_missing_logs():
    deq1, deq2 = _solving_deq("deq1"), _solving_deq("deq2")
    model = _classifier(deq1, deq2)
    lines, history = _log(
        model,
        epochs=1,
        validation=False,
        metrics=("accuracy", "val_accuracy", "mae"),
        layers=[deq2],
    )
    header, row = lines
    assert "deq1" not in header and "deq2" not in header  # one layer: titled by statistic
    cells = row.split()
    assert cells[2:4] == ["-", "-"]  # no validation, no `mae` metric
    _check_printed(cells[1], history["accuracy"][0])
    _check_printed(cells[4], history["deq2_fwd_steps"][0])


def test_solver_logger_without_deq_layer(capsys):
    with pytest.raises(ValueError, match=r"SolverLogger found no DEQ layer.*stats=\(\)"):
        _fit(_model(), [SolverLogger()], epochs=1)
    # With stats=(): the logs alone, printed to standard output by default.
    _fit(_model(), [SolverLogger(metrics=["loss"], stats=())], epochs=2)
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["epoch", "loss", "epoch", "s"]
    assert [row.split()[0] for row in rows] == ["1", "2"]


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"metrics": "accuracy"}, "metrics"),
        ({"metrics": ["accuracy", 1]}, "metrics"),
        ({"metrics": ["accuracy", ""]}, "metrics"),
        ({"metrics": {"accuracy": None}}, "metrics"),
        ({"metrics": None}, "metrics"),
        ({"stats": "fwd_steps"}, "stats"),
        ({"stats": ("fwd_step",)}, "stats"),
        ({"stats": ("val_deq_fwd_steps",)}, "stats"),
        ({"stats": None}, "stats"),
        ({"prefix": None}, "prefix"),
        ({"print_fn": "print"}, "print_fn"),
        ({"every": 0}, "every"),
        ({"every": 1.5}, "every"),
        ({"every": True}, "every"),
    ],
)
def test_solver_logger_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`.*Received: {argument}="):
        SolverLogger(**kwargs)


def test_solver_logger_knows_every_deq_metric():
    from keras_deq.callbacks.solver_logger import _STAT_COLUMNS
    from keras_deq.layers.monitor import METRICS

    assert set(_STAT_COLUMNS) == set(METRICS)
