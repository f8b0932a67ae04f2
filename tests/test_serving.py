"""Serving and saving: TF SavedModel export and `.keras` round trips of every public class.

Every class registered with `@keras.saving.register_keras_serializable(package="keras_deq")`
has a case in the shared table `CASES` (tests/layer_cases.py); a coverage guard fails when
one has none. The layers' default constructions are saved, exported and served by
`run_layer_test` (tests/layers/test_layer_cases.py); this file adds:

- `model.export(path)` (Keras 3, TF SavedModel) of variants of the layers (a backward mode
  without `tf.custom_gradient` each, OptEq's implicit mode) and of every layer with an
  implicit backward without its custom gradients, reloaded with `tf.saved_model.load` and
  `keras.layers.TFSMLayer`, serving the Keras model's predictions on batch sizes not seen
  at export, also in a fresh process that has not imported `keras_deq`;
- one `.keras` file round trip (`test_keras_file_round_trip`) of each other registered
  class (solvers, backward modes, constraints, ...) in a model that holds it.

Every `.keras` file is loaded with Keras' default `safe_mode=True`: no class needs unsafe
deserialization (`test_safe_mode_refuses_what_needs_unsafe_deserialization`).

Two bugs this file found are fixed (export failed with the implicit backward; a served
model could not report non-convergence in another process); known bugs would be kept as
`xfail(strict=True)` tests, so that a fix makes the marker go.
"""

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
import textwrap
from typing import Any, NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf
from layer_cases import (
    CASES,
    LAYERS,
    SERVED_BATCHES,
    build_model,
    check_export,
    floats,
    make,
    make_inputs,
    normalized,
    predict,
    quiet,
)

import keras_deq
from keras_deq.models import BitsPerCharacter

# ===================================================================== export models
# The table's default constructions are exported by `run_layer_test`; these variants here.
VARIANTS = {
    "DEQ-one_step": ("DEQ", {"backward": "one_step"}),
    "PcDEQ-unrolled": ("PcDEQ", {"backward": "unrolled"}),
    "LipschitzMultiscale-phantom": ("LipschitzMultiscale", {"backward": "phantom"}),
    "OptEqBlock-implicit": (
        "OptEqBlock",
        {"training_mode": "implicit", "deq_options": {"on_failure": "ignore"}},
    ),
    "DEQTransformerLM-one_step": ("DEQTransformerLM", {"backward": "one_step"}),
}
# Models with the (default) implicit backward, whose gradient is a `tf.custom_gradient`.
IMPLICIT = {
    "DEQ": ("DEQ", {}),
    "PcDEQ": ("PcDEQ", {}),
    "LipschitzMultiscale": ("LipschitzMultiscale", {}),
    "OptEqBlock-implicit": VARIANTS["OptEqBlock-implicit"],
    "DEQTransformerLM": ("DEQTransformerLM", {}),
}


def export_without_custom_gradients(model, path, signature):
    """`model.export` by hand, leaving the custom gradients out of the SavedModel."""
    if signature is None:  # a functional model: its Input's
        signature = [tf.TensorSpec(t.shape, t.dtype) for t in model.inputs]
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda x: model(x, training=False), input_signature=signature)
    archive.write_out(
        str(path),
        options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
        verbose=False,
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_export_serves_keras_predictions(variant, tmp_path):
    name, overrides = VARIANTS[variant]
    model, _, data = build_model(name, **overrides)
    check_export(name, model, data, tmp_path / "exported", **overrides)


@pytest.mark.parametrize("variant", sorted(IMPLICIT))
def test_implicit_backward_exports_without_custom_gradients(variant, tmp_path):
    """The workaround for the export bug: the served forward pass is the same."""
    name, overrides = IMPLICIT[variant]
    model, _, data = build_model(name, **overrides)
    write = export_without_custom_gradients
    check_export(name, model, data, tmp_path / "exported", write, **overrides)


def test_served_deq_state_is_the_fixed_point_computed_in_numpy(tmp_path):
    """An independent check of the served state: `z = tanh(z W + x U + b)` in float64."""
    model, layer, _ = build_model("DEQ", seed=1, solver="anderson", tol=1e-6, backward="one_step")
    model.export(str(tmp_path / "exported"), verbose=False)
    restored = tf.saved_model.load(str(tmp_path / "exported"))
    w, u, b = (np.asarray(v, "float64") for v in layer.cell.get_weights())
    for batch in SERVED_BATCHES:
        x = make_inputs("DEQ", batch, seed=10 + batch)
        z = restored.serve(tf.constant(x)).numpy().astype("float64")
        fz = np.tanh(z @ w + x.astype("float64") @ u + b)
        rel = np.linalg.norm(fz - z, axis=1) / (np.linalg.norm(fz, axis=1) + 1e-8)
        assert z.shape == x.shape
        assert np.all(rel < 1e-5), rel  # tol 1e-6 in float32, re-measured in float64


# ------------------------------------------------------------- a fresh serving process
FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf

    results = {}
    for name in sys.argv[2:]:
        folder = os.path.join(sys.argv[1], name)
        try:
            served = tf.saved_model.load(os.path.join(folder, "model"))
            out = served.serve(tf.constant(np.load(os.path.join(folder, "x.npy")))).numpy()
            np.save(os.path.join(folder, "served.npy"), out)
            results[name] = "ok"
        except Exception as error:  # reported to the test
            results[name] = f"{type(error).__name__}: {str(error)[:300]}"
    results["keras_deq imported"] = "keras_deq" in sys.modules
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def fresh_process_serving(tmp_path_factory):
    """Exports two models, serves them in a new Python process; returns what it served."""
    root = tmp_path_factory.mktemp("fresh")
    models = {
        # Converges: the py_function's branch of the tf.cond never runs.
        "converged": make("DEQ", tol=1e-5, max_iter=60, backward="one_step"),
        # max_iter=1 cannot reach tol: the default on_failure="warn" branch runs.
        "unconverged": make("DEQ", tol=1e-5, max_iter=1, backward="one_step"),
    }
    expected = {}
    for name, layer in models.items():
        keras.utils.set_random_seed(2)
        x = make_inputs("DEQ", 7, seed=3)
        model = keras.Sequential([keras.Input(x.shape[1:]), layer, keras.layers.Dense(2)])
        # Exported before any call: a layer that has already warned traces no report.
        model.export(str(root / name / "model"), verbose=False)
        (expected[name],) = predict(model, x)
        np.save(root / name / "x.npy", x)
    script = root / "serve.py"
    script.write_text(FRESH_PROCESS_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(root), *models],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads(done.stdout.strip().splitlines()[-1])
    served = {
        name: np.load(root / name / "served.npy") if status[name] == "ok" else None
        for name in models
    }
    return status, served, expected


def test_fresh_process_serves_without_keras_deq(fresh_process_serving):
    status, served, expected = fresh_process_serving
    assert status["keras_deq imported"] is False
    assert status["converged"] == "ok", status
    np.testing.assert_allclose(served["converged"], expected["converged"], rtol=1e-5, atol=1e-6)


def test_fresh_process_serves_an_unconverged_input(fresh_process_serving):
    status, served, expected = fresh_process_serving
    assert status["unconverged"] == "ok", status["unconverged"]
    np.testing.assert_allclose(served["unconverged"], expected["unconverged"], atol=1e-6)


# ===================================================================== .keras round trips
class RoundTrip(NamedTuple):
    model: Any  # a keras.Model holding the object
    inputs: Any
    get: Any  # model -> the object of the class under test
    outputs: Any = None  # (model, inputs) -> arrays to compare; default: predict
    check: Any = None  # optional (original object, restored object) -> None


@keras.saving.register_keras_serializable(package="keras_deq_tests")
class SolverHolder(keras.layers.Layer):
    """A layer holding a solver object: the `.keras` case of the solver classes."""

    def __init__(self, solver, **kwargs):
        super().__init__(**kwargs)
        self.solver = keras_deq.solvers.get(solver)

    def call(self, x):
        return self.solver(lambda z: 0.5 * tf.tanh(z) + x, tf.zeros_like(x)).state

    def get_config(self):
        return {**super().get_config(), "solver": keras_deq.solvers.serialize(self.solver)}


@keras.saving.register_keras_serializable(package="keras_deq_tests")
class PriorStep(keras.layers.Layer):
    """A test layer applying a `FeaturePrior` that it keeps in its config."""

    def __init__(self, prior, **kwargs):
        super().__init__(**kwargs)
        if isinstance(prior, dict):
            prior = keras.saving.deserialize_keras_object(prior)
        self.prior = prior

    def call(self, z):
        return self.prior.step(z)

    def get_config(self):
        return {**super().get_config(), "prior": keras.saving.serialize_keras_object(self.prior)}


@keras.saving.register_keras_serializable(package="keras_deq_tests")
class CellHolder(keras.layers.Layer):
    """A layer keeping a cell in its config (the base `Cell` has no `call`)."""

    def __init__(self, cell, **kwargs):
        super().__init__(**kwargs)
        self.cell = keras.saving.deserialize_keras_object(cell) if isinstance(cell, dict) else cell

    def call(self, x):
        return x

    def get_config(self):
        return {**super().get_config(), "cell": keras.saving.serialize_keras_object(self.cell)}


def _cell_base_trip(name):
    model = keras.Sequential([keras.Input((4,)), CellHolder(make(name, name="cell"), name="h")])

    def check(original, restored):
        assert restored.name == "cell"
        assert restored.state_shape((None, 4)) == original.state_shape((None, 4))

    return RoundTrip(model, floats((3, 4)), lambda m: m.get_layer("h").cell, check=check)


def _solver_trip(name):
    x = make_inputs(name)
    model = keras.Sequential([keras.Input(x.shape[1:]), SolverHolder(make(name), name="holder")])
    return RoundTrip(model, x, lambda m: m.get_layer("holder").solver)


def _deq_trip(argument, attribute):
    """A DEQ model whose `argument` is the object; `attribute` reads it back."""

    def trip(name):
        model, _, x = build_model("DEQ", tol=1e-5, name="deq", **{argument: make(name)})
        return RoundTrip(model, x, lambda m: getattr(m.get_layer("deq"), attribute))

    return trip


def _constraint_trip(name):
    kernel = make_inputs(name)
    shape, constraint = kernel.shape, make(name)
    if len(shape) == 4:
        layer = keras.layers.Conv2D(
            shape[-1], shape[0], padding="same", kernel_constraint=constraint
        )
        model = keras.Sequential([keras.Input((4, 4, shape[2])), layer])
        x = floats((2, 4, 4, shape[2]))
    else:
        layer = keras.layers.Dense(shape[-1], kernel_constraint=constraint)
        model = keras.Sequential([keras.Input((shape[0],)), layer])
        x = floats((3, shape[0]))
    layer.kernel.assign(kernel)  # large: every cap is active

    def check(original, restored):
        w = tf.constant(kernel)
        np.testing.assert_array_equal(np.asarray(restored(w)), np.asarray(original(w)))
        assert not np.allclose(np.asarray(original(w)), kernel)  # the cap acted

    return RoundTrip(model, x, lambda m: m.layers[-1].kernel_constraint, check=check)


def _regularizer_trip(name):
    features = make_inputs(name, batch=6, seed=4)
    dense = keras.layers.Dense(features.shape[1], activity_regularizer=make(name))
    model = keras.Sequential([keras.Input((4,)), dense])

    def losses(m, inputs):
        return [np.asarray(m(inputs)), *[np.asarray(loss) for loss in m.losses]]

    def check(original, restored):
        value = float(restored(tf.constant(features)))
        assert value == float(original(tf.constant(features)))
        assert value > 0

    return RoundTrip(
        model, floats((6, 4)), lambda m: m.layers[-1].activity_regularizer, losses, check
    )


def _prior_trip(name):
    z = make_inputs(name, seed=8)
    model = keras.Sequential([keras.Input(z.shape[1:]), PriorStep(make(name), name="prior")])

    def check(original, restored):
        z_t = tf.constant(z)
        np.testing.assert_array_equal(restored.step(z_t).numpy(), original.step(z_t).numpy())

    return RoundTrip(model, floats(z.shape), lambda m: m.get_layer("prior").prior, check=check)


def _metric_trip(name):
    metric_cls = CASES[name].build
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5)])
    model.compile(
        "sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=[make(name)]
    )
    x = floats((6, 4))
    y = np.arange(6) % 5

    def evaluate(m, inputs):
        return np.array(m.evaluate(inputs, y, return_dict=True, verbose=0)["m"])

    def get(m):
        evaluate(m, x)  # compiled metrics are built on first use
        (found,) = [o for o in m.metrics[-1].metrics if isinstance(o, metric_cls)]
        return found

    def check(original, restored):
        # Independent value: cross-entropy of the logits in numpy.
        (logits,) = predict(model, x)
        logits = logits.astype("float64")
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        ce = -log_p[np.arange(6), y].mean()
        want = ce / np.log(2.0) if metric_cls is BitsPerCharacter else np.exp(ce)
        assert float(restored.result()) == pytest.approx(want, rel=1e-5)

    return RoundTrip(model, x, get, outputs=evaluate, check=check)


# What holds an object of each kind of `CASES` in a model (the layers: `run_layer_test`).
HOLDERS = {
    "solver": _solver_trip,
    "backward": _deq_trip("backward", "_mode"),
    "penalty": _deq_trip("regularizer", "regularizer"),
    "budget": _deq_trip("max_iter", "budget"),
    "correction": _deq_trip("correction", "correction"),
    "start": _deq_trip("start", "start"),
    "constraint": _constraint_trip,
    "regularizer": _regularizer_trip,
    "prior": _prior_trip,
    "metric": _metric_trip,
    "cell_base": _cell_base_trip,
}
OBJECTS = sorted(name for name, case in CASES.items() if case.kind in HOLDERS)


def _outputs(trip, model):
    if trip.outputs is not None:
        return quiet(trip.outputs, model, trip.inputs)
    return predict(model, trip.inputs)


@pytest.mark.parametrize("name", OBJECTS)
def test_keras_file_round_trip(name, tmp_path):
    cls = keras.saving.get_registered_object(f"keras_deq>{name}")
    assert cls is not None, f"{name} is not registered"
    keras.utils.set_random_seed(0)
    trip = HOLDERS[CASES[name].kind](name)
    expected = _outputs(trip, trip.model)
    path = tmp_path / "x.keras"
    trip.model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)  # Keras' default, spelled out
    got = _outputs(trip, loaded)

    for want, have in zip(tf.nest.flatten(expected), tf.nest.flatten(got), strict=True):
        assert np.all(np.isfinite(want))
        np.testing.assert_array_equal(have, want)
    original, restored = trip.get(trip.model), trip.get(loaded)
    assert type(original) is cls and type(restored) is cls
    assert normalized(restored.get_config()) == normalized(original.get_config())
    if trip.check is not None:
        trip.check(original, restored)


def test_safe_mode_refuses_what_needs_unsafe_deserialization(tmp_path):
    """The round trips load every registered class with `safe_mode=True`, Keras' default,
    so none needs unsafe deserialization. That check bites: a file with a lambda is refused."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda x: 2 * x)])
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="safe_mode"):
        keras.saving.load_model(tmp_path / "lambda.keras", safe_mode=True)


# ------------------------------------------------------------------- coverage guard
SERIALIZABLE_BASES = (
    keras.layers.Layer,
    keras.constraints.Constraint,
    keras.regularizers.Regularizer,
    keras.metrics.Metric,
    keras.initializers.Initializer,
    keras.losses.Loss,
)


def _package_modules():
    """Every module of `keras_deq`, imported (so that every registration has run)."""
    modules = [keras_deq]
    for info in pkgutil.walk_packages(keras_deq.__path__, prefix="keras_deq."):
        modules.append(importlib.import_module(info.name))
    return modules


def registered_keras_deq_classes():
    _package_modules()
    return {
        name: obj
        for name, obj in keras.saving.get_custom_objects().items()
        if name.startswith("keras_deq>")
    }


def test_every_registered_class_has_a_round_trip_case():
    """A case in `CASES`, round-tripped here (`OBJECTS`) or by `run_layer_test` (`LAYERS`)."""
    registered = registered_keras_deq_classes()
    assert len(registered) >= 25
    cases = {f"keras_deq>{name}" for name in CASES}
    missing = sorted(set(registered) - cases)
    stale = sorted(cases - set(registered))
    assert not missing, f"registered classes without a case in layer_cases.CASES: {missing}"
    assert not stale, f"cases for names that are not registered: {stale}"
    assert sorted([*OBJECTS, *LAYERS]) == sorted(CASES), "a kind that no test round-trips"
    for name in CASES:
        assert registered[f"keras_deq>{name}"] is type(make(name)), name


def test_every_public_keras_object_class_is_registered():
    """A new public layer, constraint, regularizer, metric ... must be registered (and so
    get a round-trip case above): `.keras` files of models using it would not load."""
    unregistered = set()
    for module in _package_modules():
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and obj.__module__.startswith("keras_deq")
                and not name.startswith("_")
                and issubclass(obj, SERIALIZABLE_BASES)
                and not keras.saving.get_registered_name(obj).startswith("keras_deq>")
            ):
                unregistered.add(f"{obj.__module__}.{name}")
    assert not unregistered, sorted(unregistered)
