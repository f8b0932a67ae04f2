"""Serving and saving: TF SavedModel export and `.keras` round trips of every public class.

- `model.export(path)` (Keras 3, TF SavedModel) of models holding the package's layers,
  reloaded with `tf.saved_model.load` and `keras.layers.TFSMLayer`, must serve the Keras
  model's predictions on batch sizes not seen at export, also in a fresh process that has
  not imported `keras_deq`.
- Every class registered with `@keras.saving.register_keras_serializable(package="keras_deq")`
  goes through one `.keras` file round trip (`test_keras_file_round_trip`); a coverage guard
  fails when a registered class has no case.

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
import warnings
from typing import Any, NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_deq
from keras_deq import DEQ, DenseCell, LipschitzMultiscale, OptEqBlock, PcDEQ, constraints_opteq
from keras_deq import constraints as constraints_lib
from keras_deq.layers import multiscale, opteq
from keras_deq.layers.pcdeq import PositiveConcaveCell
from keras_deq.layers.transformer import DEQTransformerCell
from keras_deq.models import BitsPerCharacter, DEQTransformerLM, Perplexity

BATCHES = (1, 7)  # the export traces with batch None; 1 and 7 are never seen before serving


def rng(seed=0):
    return np.random.default_rng(seed)


def floats(shape, seed=0):
    return rng(seed).normal(size=shape).astype("float32")


def predict(model, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return model.predict(inputs, verbose=0)


# ===================================================================== export models
class Served(NamedTuple):
    model: Any
    signature: Any  # tf.TensorSpec of the single input
    make_input: Any  # (batch, seed) -> numpy input


def _vector_input(features):
    return lambda batch, seed: floats((batch, features), seed)


def deq_model(**deq_kwargs):
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6),
            DEQ(DenseCell(6), tol=1e-6, name="deq", **deq_kwargs),
            keras.layers.Dense(3),
        ]
    )
    return Served(model, tf.TensorSpec((None, 5), tf.float32), _vector_input(5))


def pcdeq_model(**deq_kwargs):
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6),
            PcDEQ(units=6, tol=1e-6, name="pcdeq", **deq_kwargs),
            keras.layers.Dense(3),
        ]
    )
    return Served(model, tf.TensorSpec((None, 5), tf.float32), _vector_input(5))


def multiscale_model(**deq_kwargs):
    inputs = keras.Input((8, 8, 1))
    stem = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    branches = LipschitzMultiscale(
        channels=(4, 8), groups=2, norm_iterations=5, max_iter=18, tol=1e-4, name="ms", **deq_kwargs
    )(stem)
    pooled = [keras.layers.GlobalAveragePooling2D()(z) for z in branches]
    outputs = keras.layers.Dense(3)(keras.layers.Concatenate()(pooled))
    return Served(
        keras.Model(inputs, outputs),
        tf.TensorSpec((None, 8, 8, 1), tf.float32),
        lambda batch, seed: floats((batch, 8, 8, 1), seed),
    )


def opteq_model(**block_kwargs):
    model = keras.Sequential(
        [
            keras.Input((6,)),
            OptEqBlock([6, 8], name="opteq", **block_kwargs),
            keras.layers.Dense(3),
        ]
    )
    return Served(model, tf.TensorSpec((None, 6), tf.float32), _vector_input(6))


def lm_model(**lm_kwargs):
    model = DEQTransformerLM(vocab_size=11, d_model=8, num_heads=2, max_iter=8, **lm_kwargs)
    model(np.zeros((2, 4), "int32"))
    return Served(
        model,
        tf.TensorSpec((None, None), tf.int32),
        lambda batch, seed: rng(seed).integers(0, 11, size=(batch, 5)).astype("int32"),
    )


# Models as users build them: every layer with its default (implicit) backward pass.
DEFAULT_MODELS = {
    "deq": deq_model,
    "pcdeq": pcdeq_model,
    "lipschitz_multiscale": multiscale_model,
    "opteq_implicit": lambda: opteq_model(
        training_mode="implicit", deq_options={"on_failure": "ignore"}
    ),
    "transformer_lm": lm_model,
}

# The same models with a backward mode without `tf.custom_gradient`: one each.
NON_IMPLICIT_MODELS = {
    "deq-one_step": lambda: deq_model(backward="one_step"),
    "pcdeq-unrolled": lambda: pcdeq_model(backward="unrolled"),
    "lipschitz_multiscale-phantom": lambda: multiscale_model(backward="phantom"),
    "opteq-unrolled_training": lambda: opteq_model(training_mode="unrolled", unroll_steps=10),
    "transformer_lm-one_step": lambda: lm_model(backward="one_step"),
}


def export_without_custom_gradients(served, path):
    """`model.export` by hand, leaving the custom gradients out of the SavedModel."""
    archive = keras.export.ExportArchive()
    archive.track(served.model)
    archive.add_endpoint(
        "serve", lambda x: served.model(x, training=False), input_signature=[served.signature]
    )
    archive.write_out(
        str(path),
        options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
        verbose=False,
    )


def assert_serves_keras_predictions(served, path, name):
    """The reloaded SavedModel gives the Keras model's predictions.

    Loaded with `tf.saved_model.load`, and for the dense models also as a
    `keras.layers.TFSMLayer` (loading costs a few seconds per model).
    """
    restored = tf.saved_model.load(str(path))
    tfsm = None
    if name.startswith(("deq", "pcdeq")):
        tfsm = keras.layers.TFSMLayer(str(path), call_endpoint="serve")
    for batch in BATCHES:
        x = served.make_input(batch, seed=batch)
        expected = predict(served.model, x)
        assert expected.shape[0] == batch
        assert np.all(np.isfinite(expected))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            by_load = restored.serve(tf.constant(x)).numpy()
            by_layer = None if tfsm is None else keras.ops.convert_to_numpy(tfsm(x))
        np.testing.assert_allclose(by_load, expected, rtol=1e-5, atol=1e-6)
        if by_layer is not None:
            np.testing.assert_allclose(by_layer, expected, rtol=1e-5, atol=1e-6)


# The multiscale model fails the same way; it is left out here only because tracing it for
# the export takes 10-20 s (it is exported by the two tests below).
@pytest.mark.parametrize("name", sorted(set(DEFAULT_MODELS) - {"lipschitz_multiscale"}))
def test_model_export_with_default_backward_serves_keras_predictions(name, tmp_path):
    keras.utils.set_random_seed(0)
    served = DEFAULT_MODELS[name]()
    export_kwargs = {}
    if name == "transformer_lm":  # a subclassed model: no Input to read the signature from
        export_kwargs["input_signature"] = [served.signature]
    served.model.export(str(tmp_path / "exported"), verbose=False, **export_kwargs)
    assert_serves_keras_predictions(served, tmp_path / "exported", name)


@pytest.mark.parametrize("name", sorted(NON_IMPLICIT_MODELS))
def test_model_export_without_implicit_backward_serves_keras_predictions(name, tmp_path):
    keras.utils.set_random_seed(0)
    served = NON_IMPLICIT_MODELS[name]()
    export_kwargs = {}
    if name.startswith("transformer_lm"):
        export_kwargs["input_signature"] = [served.signature]
    served.model.export(str(tmp_path / "exported"), verbose=False, **export_kwargs)
    assert_serves_keras_predictions(served, tmp_path / "exported", name)


@pytest.mark.parametrize("name", sorted(DEFAULT_MODELS))
def test_implicit_backward_exports_without_custom_gradients(name, tmp_path):
    """The workaround for the export bug: the served forward pass is the same."""
    keras.utils.set_random_seed(0)
    served = DEFAULT_MODELS[name]()
    export_without_custom_gradients(served, tmp_path / "exported")
    assert_serves_keras_predictions(served, tmp_path / "exported", name)


def test_served_deq_state_is_the_fixed_point_computed_in_numpy(tmp_path):
    """An independent check of the served state: `z = tanh(z W + x U + b)` in float64."""
    keras.utils.set_random_seed(1)
    layer = DEQ(DenseCell(6), solver="anderson", tol=1e-6, backward="one_step", name="deq")
    model = keras.Sequential([keras.Input((6,)), layer])
    model.export(str(tmp_path / "exported"), verbose=False)
    restored = tf.saved_model.load(str(tmp_path / "exported"))
    w, u, b = (np.asarray(v, "float64") for v in layer.cell.get_weights())
    for batch in BATCHES:
        x = floats((batch, 6), seed=10 + batch)
        z = restored.serve(tf.constant(x)).numpy().astype("float64")
        fz = np.tanh(z @ w + x.astype("float64") @ u + b)
        rel = np.linalg.norm(fz - z, axis=1) / (np.linalg.norm(fz, axis=1) + 1e-8)
        assert z.shape == (batch, 6)
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
        "converged": DEQ(DenseCell(5), tol=1e-5, max_iter=60, backward="one_step", name="deq"),
        # max_iter=1 cannot reach tol: the default on_failure="warn" branch runs.
        "unconverged": DEQ(DenseCell(5), tol=1e-5, max_iter=1, backward="one_step", name="deq"),
    }
    expected = {}
    for name, layer in models.items():
        keras.utils.set_random_seed(2)
        model = keras.Sequential([keras.Input((5,)), layer, keras.layers.Dense(2)])
        x = floats((7, 5), seed=3)
        # Exported before any call: a layer that has already warned traces no report.
        model.export(str(root / name / "model"), verbose=False)
        expected[name] = predict(model, x)
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
def normalized(config):
    """A config as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(config))


class RoundTrip(NamedTuple):
    model: Any  # a keras.Model holding the object
    inputs: Any
    get: Any  # model -> the object of the class under test
    outputs: Any = None  # (model, inputs) -> arrays to compare; default: predict
    check: Any = None  # optional (original object, restored object) -> None


CASES = {}


def case(registered_name):
    def register(fn):
        CASES[registered_name] = fn
        return fn

    return register


def _layer(name):
    return lambda model: model.get_layer(name)


def _cell_model(cell, z_shapes, x_shape, seed=0):
    """A functional model `[z..., x] -> cell(z, x)`; `z_shapes` a shape or a list of them."""
    multi = isinstance(z_shapes, list)
    z_inputs = [keras.Input(s) for s in (z_shapes if multi else [z_shapes])]
    x_input = keras.Input(x_shape)
    out = cell(z_inputs if multi else z_inputs[0], x_input)
    model = keras.Model([*z_inputs, x_input], out)
    arrays = [
        floats((3, *s), seed + i) for i, s in enumerate([*(z_shapes if multi else [z_shapes])])
    ]
    return model, [*arrays, floats((3, *x_shape), seed + 7)]


@case("keras_deq>DEQ")
def _deq():
    layer = DEQ(DenseCell(7), state_shape=(7,), solver_options={"window": 3}, tol=1e-5, name="deq")
    layer.jacobian_weight = 0.25  # changed after construction: the config must follow
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6), layer])
    return RoundTrip(model, floats((4, 5)), _layer("deq"))


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


def _solver_case(class_name, settings):
    def make():
        solver = getattr(keras_deq.solvers, class_name)(**settings)
        model = keras.Sequential([keras.Input((4,)), SolverHolder(solver, name="holder")])
        return RoundTrip(model, floats((3, 4)), lambda m: m.get_layer("holder").solver)

    return make


for _name, _settings in [
    ("FixedPoint", {"max_iter": 20, "damping": 0.7}),
    ("Anderson", {"window": 3, "ridge": 0.0, "stop_mode": "abs"}),
    ("Broyden", {"memory": 4, "tol": 1e-6}),
    ("SAM", {"max_iter": 9, "rho": 0.4, "c": 0.1, "gamma": 0.2, "fixed_steps": False}),
]:
    case(f"keras_deq>{_name}")(_solver_case(_name, _settings))


def _backward_case(mode):
    def make():
        layer = DEQ(DenseCell(6), backward=mode, tol=1e-5, name="deq")
        model = keras.Sequential([keras.Input((6,)), layer])
        return RoundTrip(model, floats((3, 6)), lambda m: m.get_layer("deq")._mode)

    return make


for _mode in [
    keras_deq.backward.Implicit(solver=keras_deq.solvers.Broyden(memory=4, max_iter=25)),
    keras_deq.backward.Phantom(steps=3, damping=0.8),
    keras_deq.backward.OneStep(),
    keras_deq.backward.Unrolled(),
    keras_deq.backward.Explicit(depth=4),
]:
    case(f"keras_deq>{type(_mode).__name__}")(_backward_case(_mode))


@case("keras_deq>JacobianPenalty")
def _jacobian_penalty():
    penalty = keras_deq.JacobianPenalty(weight=0.3, frequency=0.5, probes=2, max_iter_delta=1)
    layer = DEQ(DenseCell(6), regularizer=penalty, tol=1e-5, name="deq")
    model = keras.Sequential([keras.Input((6,)), layer])
    return RoundTrip(model, floats((3, 6)), lambda m: m.get_layer("deq").regularizer)


@keras.saving.register_keras_serializable(package="keras_deq_tests")
class CellHolder(keras.layers.Layer):
    """A layer holding a cell that it keeps in its config (the base `Cell` has no `call`)."""

    def __init__(self, cell, **kwargs):
        super().__init__(**kwargs)
        self.cell = keras.saving.deserialize_keras_object(cell) if isinstance(cell, dict) else cell

    def build(self, input_shape):
        pass

    def call(self, x):
        return x

    def get_config(self):
        return {**super().get_config(), "cell": keras.saving.serialize_keras_object(self.cell)}


@case("keras_deq>Cell")
def _cell():
    model = keras.Sequential([keras.Input((4,)), CellHolder(keras_deq.Cell(name="cell"), name="h")])

    def check(original, restored):
        assert restored.state_shape((None, 4)) is None and restored.name == "cell"

    return RoundTrip(model, floats((3, 4)), lambda m: m.get_layer("h").cell, check=check)


@case("keras_deq>DenseCell")
def _dense_cell():
    model, x = _cell_model(DenseCell(6, activation="softsign", name="cell"), (6,), (5,))
    return RoundTrip(model, x, _layer("cell"))


@case("keras_deq>PositiveConcaveCell")
def _positive_concave_cell():
    cell = PositiveConcaveCell("softsign", kernel_size=3, weight_norm=True, name="cell")
    model, x = _cell_model(cell, (4, 4, 3), (4, 4, 3))
    return RoundTrip(model, x, _layer("cell"))


@case("keras_deq>PcDEQ")
def _pcdeq():
    layer = PcDEQ(filters=3, kernel_size=3, variant=2, weight_norm=True, tol=1e-5, name="pc")
    model = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 1), layer])
    return RoundTrip(model, floats((3, 4, 4, 2)), _layer("pc"))


@case("keras_deq>ScaledReLU")
def _scaled_relu():
    layer = multiscale.ScaledReLU(0.3, name="act")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), layer])
    return RoundTrip(model, floats((5, 4)), _layer("act"))


@case("keras_deq>MeanGroupNormalization")
def _mean_group_norm():
    layer = multiscale.MeanGroupNormalization(
        2, gamma_constraint=constraints_lib.MaxAbs(0.7), name="norm"
    )
    model = keras.Sequential([keras.Input((4, 4, 4)), layer])
    layer.gamma.assign(floats((4,), 5))
    layer.beta.assign(floats((4,), 6))
    return RoundTrip(model, floats((3, 4, 4, 4)), _layer("norm"))


@case("keras_deq>MultiscaleCell")
def _multiscale_cell():
    cell = multiscale.MultiscaleCell(channels=(4, 8), groups=2, name="cell")
    model, x = _cell_model(cell, [(4, 4, 4), (2, 2, 8)], (4, 4, 4))
    return RoundTrip(model, x, _layer("cell"))


@case("keras_deq>LipschitzMultiscaleCell")
def _lipschitz_multiscale_cell():
    cell = multiscale.LipschitzMultiscaleCell(
        channels=(4, 8), groups=2, slope=0.5, softmax_weights=False, conv_norm_cap=1.5, name="cell"
    )
    model, x = _cell_model(cell, [(4, 4, 4), (2, 2, 8)], (4, 4, 4))
    return RoundTrip(model, x, _layer("cell"))


def _multiscale_deq_model(layer):
    inputs = keras.Input((4, 4, 1))
    branches = layer(keras.layers.Conv2D(4, 3, padding="same")(inputs))
    pooled = [keras.layers.GlobalAveragePooling2D()(z) for z in branches]
    return keras.Model(inputs, keras.layers.Concatenate()(pooled))


@case("keras_deq>MultiscaleDEQ")
def _multiscale_deq():
    layer = multiscale.MultiscaleDEQ(
        channels=(4, 8), groups=2, max_iter=6, on_failure="ignore", name="ms"
    )
    return RoundTrip(_multiscale_deq_model(layer), floats((3, 4, 4, 1)), _layer("ms"))


@case("keras_deq>LipschitzMultiscale")
def _lipschitz_multiscale():
    layer = LipschitzMultiscale(
        channels=(4, 8), groups=2, norm_iterations=5, max_iter=10, tol=1e-3, name="ms"
    )
    return RoundTrip(_multiscale_deq_model(layer), floats((3, 4, 4, 1)), _layer("ms"))


@case("keras_deq>OptEqDenseUnit")
def _opteq_dense_unit():
    unit = opteq.OptEqDenseUnit(8, alpha=0.7, learnable_alpha=True, max_norm=0.9, name="unit")
    model, x = _cell_model(unit, (5,), (4,))
    return RoundTrip(model, x, _layer("unit"))


@case("keras_deq>OptEqConvUnit")
def _opteq_conv_unit():
    unit = opteq.OptEqConvUnit(4, kernel_size=3, alpha=0.6, name="unit")
    model, x = _cell_model(unit, (4, 4, 2), (4, 4, 3))
    return RoundTrip(model, x, _layer("unit"))


@case("keras_deq>OptEqCell")
def _opteq_cell():
    cell = opteq.OptEqCell([6, 8], alpha=0.9, prior="l1", prior_strength=0.05, name="cell")
    model, x = _cell_model(cell, (5,), (5,))
    return RoundTrip(model, x, _layer("cell"))


@case("keras_deq>OptEqBlock")
def _opteq_block():
    block = OptEqBlock(
        [6, 8],
        prior="incay",
        prior_mode="sam",
        sam_rho=0.4,
        sam_c=0.1,
        unroll_steps=7,
        name="block",
    )
    model = keras.Sequential([keras.Input((6,)), block])
    return RoundTrip(model, floats((4, 6)), _layer("block"))


@case("keras_deq>DEQTransformerCell")
def _transformer_cell():
    cell = DEQTransformerCell(2, ff_dim=12, norm="post", dropout=0.1, name="cell")
    model, x = _cell_model(cell, (5, 8), (5, 8))
    return RoundTrip(model, x, _layer("cell"))


@case("keras_deq>DEQTransformerLM")
def _transformer_lm():
    model = DEQTransformerLM(11, d_model=8, num_heads=2, max_iter=6, norm="post")
    tokens = rng(0).integers(0, 11, size=(3, 5)).astype("int32")
    model(tokens)
    return RoundTrip(model, tokens, lambda m: m)


def _metric_case(metric_cls):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5)])
    model.compile(
        "sgd",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[metric_cls(name="m")],
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
        logits = predict(model, x).astype("float64")
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        ce = -log_p[np.arange(6), y].mean()
        want = ce / np.log(2.0) if metric_cls is BitsPerCharacter else np.exp(ce)
        assert float(restored.result()) == pytest.approx(want, rel=1e-5)

    return RoundTrip(model, x, get, outputs=evaluate, check=check)


@case("keras_deq>BitsPerCharacter")
def _bpc():
    return _metric_case(BitsPerCharacter)


@case("keras_deq>Perplexity")
def _perplexity():
    return _metric_case(Perplexity)


def _constraint_case(constraint, kernel_shape):
    if len(kernel_shape) == 4:
        layer = keras.layers.Conv2D(
            kernel_shape[-1], kernel_shape[0], padding="same", kernel_constraint=constraint
        )
        model = keras.Sequential([keras.Input((4, 4, kernel_shape[2])), layer])
        x = floats((2, 4, 4, kernel_shape[2]))
    else:
        layer = keras.layers.Dense(kernel_shape[-1], kernel_constraint=constraint)
        model = keras.Sequential([keras.Input((kernel_shape[0],)), layer])
        x = floats((3, kernel_shape[0]))
    layer.kernel.assign(3.0 * floats(kernel_shape, 9))  # large: every cap is active

    def get(m):
        return m.layers[-1].kernel_constraint

    def check(original, restored):
        w = tf.constant(3.0 * floats(kernel_shape, 9))
        np.testing.assert_array_equal(np.asarray(restored(w)), np.asarray(original(w)))
        assert not np.allclose(np.asarray(original(w)), w.numpy())  # the cap acted

    return RoundTrip(model, x, get, check=check)


@case("keras_deq>ConvOperatorNorm")
def _conv_operator_norm():
    constraint = constraints_lib.ConvOperatorNorm(1.5, (4, 4), iterations=8)
    return _constraint_case(constraint, (3, 3, 2, 3))


@case("keras_deq>MaxAbs")
def _max_abs():
    return _constraint_case(constraints_lib.MaxAbs(0.5), (4, 3))


@case("keras_deq>SpectralNorm")
def _spectral_norm():
    return _constraint_case(constraints_opteq.SpectralNorm(0.8), (4, 3))


@case("keras_deq>ConvSpectralNorm")
def _conv_spectral_norm():
    return _constraint_case(constraints_opteq.ConvSpectralNorm(0.8, (4, 4)), (3, 3, 2, 3))


def _regularizer_case(regularizer):
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activity_regularizer=regularizer)]
    )
    x = floats((6, 4))

    def losses(m, inputs):
        out = m(inputs)
        return [np.asarray(out), *[np.asarray(loss) for loss in m.losses]]

    def check(original, restored):
        features = tf.constant(floats((6, 3), 4))
        value = float(restored(features))
        assert value == float(original(features))
        assert value > 0

    return RoundTrip(model, x, lambda m: m.layers[-1].activity_regularizer, losses, check)


@case("keras_deq>DecorrelationRegularizer")
def _decorrelation():
    return _regularizer_case(opteq.DecorrelationRegularizer(0.3))


@case("keras_deq>HSICRegularizer")
def _hsic():
    return _regularizer_case(opteq.HSICRegularizer(0.3, sigma=0.7))


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


@case("keras_deq>FeaturePrior")
def _feature_prior():
    layer = PriorStep(opteq.FeaturePrior("incay", strength=0.3, epsilon=0.5), name="prior")
    model = keras.Sequential([keras.Input((4,)), layer])

    def check(original, restored):
        z = tf.constant(floats((3, 4), 8))
        np.testing.assert_array_equal(restored.step(z).numpy(), original.step(z).numpy())

    return RoundTrip(model, floats((3, 4)), lambda m: m.get_layer("prior").prior, check=check)


def _outputs(trip, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if trip.outputs is not None:
            return trip.outputs(model, trip.inputs)
        return predict(model, trip.inputs)


@pytest.mark.parametrize("registered_name", sorted(CASES))
def test_keras_file_round_trip(registered_name, tmp_path):
    cls = keras.saving.get_registered_object(registered_name)
    assert cls is not None, f"{registered_name} is not registered"
    keras.utils.set_random_seed(0)
    trip = CASES[registered_name]()
    expected = _outputs(trip, trip.model)
    path = tmp_path / "x.keras"
    trip.model.save(path)
    loaded = keras.saving.load_model(path)
    got = _outputs(trip, loaded)

    for want, have in zip(tf.nest.flatten(expected), tf.nest.flatten(got), strict=True):
        assert np.all(np.isfinite(want))
        np.testing.assert_array_equal(have, want)
    original, restored = trip.get(trip.model), trip.get(loaded)
    assert type(original) is cls and type(restored) is cls
    assert normalized(restored.get_config()) == normalized(original.get_config())
    if trip.check is not None:
        trip.check(original, restored)


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
    registered = registered_keras_deq_classes()
    assert len(registered) >= 25
    missing = sorted(set(registered) - set(CASES))
    stale = sorted(set(CASES) - set(registered))
    assert not missing, f"registered classes without a .keras round-trip case: {missing}"
    assert not stale, f"cases for names that are not registered: {stale}"


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
