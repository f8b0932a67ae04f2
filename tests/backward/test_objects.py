"""Backward modes as objects: look-up, settings, config, a user-defined mode, and how
`DEQ` takes them (names, objects, the deprecated flat phantom arguments)."""

import json
import warnings

import keras
import numpy as np
import pytest
from feature_references import FLOAT_DTYPES, layer_gradients
from keras import ops

import keras_deq
from keras_deq import backward
from keras_deq.backward import Implicit, OneStep, Phantom, Unrolled

UNITS, FEATURES, BATCH = 4, 3, 5
# A tolerance the solves reach in each dtype; convergence is checked in `grads`.
TOL = {"float64": 1e-12, "float32": 1e-6}
# (rtol, atol) of gradients that agree up to rounding.
ROUNDING = {"float64": (1e-12, 1e-13), "float32": (1e-5, 1e-6)}


def tanh_deq(mode, seed=0, dtype="float32", **kwargs):
    """A DEQ with a tanh DenseCell whose kernel has spectral norm 0.6."""
    cell = keras_deq.DenseCell(UNITS, dtype=dtype)
    tight = {"tol": TOL[dtype], "max_iter": 300, "on_failure": "ignore"}
    layer = keras_deq.DEQ(
        cell, backward=mode, state_shape=(UNITS,), dtype=dtype, **{**tight, **kwargs}
    )
    layer.build((None, FEATURES))
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(UNITS, UNITS))
    cell.kernel.assign(0.6 * w / np.linalg.norm(w, 2))
    cell.injection_kernel.assign(rng.normal(size=(FEATURES, UNITS)))
    cell.bias.assign(rng.normal(size=(UNITS,)))
    return layer


def grads(layer, seed=1):
    """The gradients of a squared error with respect to the input and the cell's
    weights, after checking that the layer's solve converges."""
    rng = np.random.default_rng(seed)
    x = ops.convert_to_tensor(rng.normal(size=(BATCH, FEATURES)), layer.dtype)
    t = ops.convert_to_tensor(rng.normal(size=(BATCH, UNITS)), layer.dtype)
    loss = lambda out: ops.sum(ops.square(out - t))  # noqa: E731
    gradients = layer_gradients(layer, x, loss, layer.cell.trainable_variables)
    layer(x, training=True)  # the compiled call keeps no statistics on JAX
    assert layer.solver_statistics()["converged"] == 1.0
    return [np.asarray(g) for g in gradients]


# ---------------------------------------------------------------- look-up and config
def test_names_are_the_built_in_modes_in_order():
    assert backward.names() == ("implicit", "phantom", "one_step", "unrolled")
    assert backward.MODES == backward.names()


@pytest.mark.parametrize(
    "identifier, expected",
    [
        ("implicit", Implicit()),
        ("phantom", Phantom()),
        ("one_step", OneStep()),
        ("unrolled", Unrolled()),
        ({"class_name": "Phantom", "config": {"steps": 7}}, Phantom(steps=7)),
    ],
)
def test_get_accepts_names_and_configs(identifier, expected):
    got = backward.get(identifier)
    assert type(got) is type(expected)
    assert got.get_config() == expected.get_config()


def test_get_returns_an_instance_as_is_and_applies_overrides():
    mode = Phantom(steps=3)
    assert backward.get(mode) is mode
    changed = backward.get(mode, damping=1.0)
    assert changed is not mode and changed.get_config() == {"steps": 3, "damping": 1.0}


@pytest.mark.parametrize("bad", ["newton", 3, None, {"class_name": "Nope", "config": {}}])
def test_get_refuses_unknown_identifiers(bad):
    with pytest.raises(ValueError, match="backward"):
        backward.get(bad)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Phantom(steps=0), r"`steps`.*steps=0"),
        (lambda: Phantom(steps=2.5), r"steps=2.5"),
        (lambda: Phantom(damping=0.0), r"`damping`.*damping=0.0"),
        (lambda: Phantom(damping=1.5), r"damping=1.5"),
        (lambda: backward.Explicit(depth=0), r"`depth`.*depth=0"),
        (lambda: Implicit(solver="newton"), r"solver='newton'"),
    ],
)
def test_settings_are_checked_by_the_constructor(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "mode",
    [
        Implicit(),
        Implicit(solver=keras_deq.solvers.Anderson(window=3, max_iter=12)),
        Phantom(steps=2, damping=0.25),
        OneStep(),
        Unrolled(),
        backward.Explicit(depth=3),
    ],
    ids=lambda m: type(m).__name__,
)
def test_serialize_round_trips_through_json(mode):
    config = json.loads(json.dumps(backward.serialize(mode)))
    clone = backward.deserialize(config)
    assert type(clone) is type(mode) and clone is not mode
    assert clone.get_config() == mode.get_config()
    assert repr(clone) == repr(mode)


def test_implicit_holds_a_solver_object():
    mode = Implicit(solver={"class_name": "Broyden", "config": {"memory": 3}})
    assert isinstance(mode.solver, keras_deq.solvers.Broyden) and mode.solver.memory == 3


# ---------------------------------------------------------------- a user-defined mode
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_a_new_mode_is_one_class_reachable_by_name(monkeypatch, dtype):
    monkeypatch.setattr(backward.Backward, "_registry", dict(backward.Backward._registry))

    class TwoSteps(backward.JacobianFree):
        """Two undamped cell applications from z*, differentiated (the worked example)."""

        name = "two_steps"

        def refine(self, fn, x, z):
            return fn(fn(z, x), x)

    assert backward.names()[-1] == "two_steps"
    assert isinstance(backward.get("two_steps"), TwoSteps)
    layer = tanh_deq("two_steps", dtype=dtype)
    reference = tanh_deq(Phantom(steps=2, damping=1.0), dtype=dtype)
    rtol, atol = ROUNDING[dtype]
    for got, want in zip(grads(layer), grads(reference), strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    # ... and differs from one step, so the comparison can fail.
    one = grads(tanh_deq("one_step", dtype=dtype))
    assert max(np.max(np.abs(a - b)) for a, b in zip(grads(layer), one, strict=True)) > 1e-3


def test_a_duplicate_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):

        class Another(backward.JacobianFree):  # noqa: F841
            name = "phantom"


def test_an_unfinished_mode_says_what_is_missing():
    class NoRefine(backward.JacobianFree):
        pass

    with pytest.raises(NotImplementedError, match="refine"):
        tanh_deq(NoRefine())(ops.zeros((2, FEATURES)), training=True)


# ---------------------------------------------------------------- DEQ and the objects
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_name_and_object_give_the_same_gradient(dtype):
    by_name = grads(tanh_deq("phantom", dtype=dtype))
    by_object = grads(tanh_deq(Phantom(steps=5, damping=0.5), dtype=dtype))
    for a, b in zip(by_name, by_object, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_deprecated_phantom_arguments_build_the_phantom_object(dtype):
    with pytest.warns(DeprecationWarning, match="Phantom"):
        layer = tanh_deq("phantom", dtype=dtype, phantom_steps=3, phantom_damping=0.9)
    assert isinstance(layer._mode, Phantom)
    assert layer._mode.get_config() == {"steps": 3, "damping": 0.9}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference = tanh_deq(Phantom(steps=3, damping=0.9), dtype=dtype)
    for a, b in zip(grads(layer), grads(reference), strict=True):
        np.testing.assert_array_equal(a, b)
    # The config holds the object, not the deprecated arguments.
    config = layer.get_config()
    assert "phantom_steps" not in config
    assert config["backward"]["config"] == {"steps": 3, "damping": 0.9}


def test_a_config_saved_before_backward_objects_still_loads():
    layer = tanh_deq("phantom")
    config = layer.get_config()
    config.update(backward="phantom", phantom_steps=2, phantom_damping=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading an old file is not the user's doing
        clone = keras_deq.DEQ.from_config(config)
    assert clone._mode.get_config() == {"steps": 2, "damping": 1.0}
    implicit = {**config, "backward": "implicit"}
    assert isinstance(keras_deq.DEQ.from_config(implicit)._mode, Implicit)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_implicit_solver_sets_the_adjoint_solver(dtype):
    fixed_point = keras_deq.solvers.FixedPoint(max_iter=300, tol=TOL[dtype])
    own = tanh_deq(Implicit(solver=fixed_point), dtype=dtype)
    flat = tanh_deq("implicit", dtype=dtype, backward_solver="fixed_point")
    assert isinstance(own._adjoint, keras_deq.solvers.FixedPoint)
    rtol = ROUNDING[dtype][0]
    for a, b in zip(grads(own), grads(flat), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-2)
    clone = keras_deq.DEQ.from_config(json.loads(json.dumps(own.get_config())))
    assert clone._adjoint.get_config() == own._adjoint.get_config()


def test_adjoint_settings_override_the_implicit_solver():
    layer = tanh_deq(Implicit(solver="anderson"), backward_max_iter=7)
    assert layer._adjoint.max_iter == 7 and layer.backward_max_iter == 7


def test_the_adjoint_solver_set_twice_is_refused():
    with pytest.raises(ValueError, match="set twice"):
        tanh_deq(Implicit(solver="anderson"), backward_solver="broyden")


@pytest.mark.parametrize("bad", ["newton", 3, keras_deq.solvers.Anderson()])
def test_deq_refuses_a_bad_backward(bad):
    with pytest.raises(ValueError, match="`backward` must be"):
        keras_deq.DEQ(keras_deq.DenseCell(4), backward=bad)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_explicit_as_a_mode_is_the_cell_applied_depth_times(dtype):
    layer = tanh_deq(backward.Explicit(depth=3), dtype=dtype)
    x = ops.convert_to_tensor(np.random.default_rng(2).normal(size=(BATCH, FEATURES)), dtype)
    z = ops.zeros((BATCH, UNITS), dtype)
    for _ in range(3):
        z = layer.cell(z, x)
    atol = {"float64": 1e-15, "float32": 1e-6}[dtype]
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(z), rtol=0, atol=atol)


def test_every_mode_works_in_a_compiled_fit():
    for mode in (Implicit(), Phantom(steps=2), OneStep(), Unrolled()):
        model = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras_deq.DEQ(keras_deq.DenseCell(UNITS), backward=mode, state_shape=(UNITS,)),
            ]
        )
        model.compile("sgd", "mse")
        rng = np.random.default_rng(3)
        history = model.fit(
            rng.normal(size=(8, FEATURES)), rng.normal(size=(8, UNITS)), epochs=1, verbose=0
        )
        assert np.isfinite(history.history["loss"][0]), type(mode).__name__
