"""How to build a small valid instance of every registered class, and `run_layer_test`.

`CASES` is the one table of constructions the tests share (not tests itself): for each
class registered with `@keras.saving.register_keras_serializable(package="keras_deq")`,
keyed by its registered name without the package, a `Case` says how to build it
(`build`, `kwargs`), what to feed it (`inputs`) and what it supports. `test_serving.py`
round-trips and exports these, `test_fuzz.py` starts its argument sweeps from their
`kwargs`, and `tests/layers/test_layer_cases.py` runs `run_layer_test` on each layer.

`run_layer_test(name, tmp_path)`, after Keras' own `TestCase.run_layer_test`: the layer in
a model, its output shape against `compute_output_shape`, `get_config`/`from_config`, an
eager `fit` epoch, the `.keras` file of the trained model, the layer under `mixed_float16`,
and on TensorFlow `model.export` served by `tf.saved_model.load` and `keras.layers.TFSMLayer`.
"""

import json
import warnings
from collections.abc import Callable
from typing import NamedTuple

import keras
import numpy as np

from keras_deq import (
    DEQ,
    Cell,
    DenseCell,
    FixedPointCorrection,
    JacobianPenalty,
    LipschitzMultiscale,
    MonDEQ,
    OptEqBlock,
    PcDEQ,
    RandomStart,
    SpectralReparametrization,
    WeightNormalization,
    constraints_opteq,
    solvers,
)
from keras_deq import backward as backward_lib
from keras_deq import constraints as constraints_lib
from keras_deq.layers import KernelReparametrization, multiscale, opteq
from keras_deq.layers.monotone_cell import MonotoneCell
from keras_deq.layers.pcdeq import PositiveConcaveCell
from keras_deq.layers.transformer import DEQTransformerCell
from keras_deq.models import BitsPerCharacter, DEQTransformerLM, Perplexity

FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16")
SERVED_BATCHES = (1, 7)  # exports trace batch None; 1 and 7 are never seen before serving


def floats(shape, seed=0, dtype="float32"):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def tokens(batch, length, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).astype("int32")


def normalized(config):
    """A config as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(config))


def quiet(fn, *args, **kwargs):
    """`fn(...)` without the non-convergence warnings of the small solves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


class Case(NamedTuple):
    build: Callable  # (**kwargs) -> the object
    kwargs: dict = {}  # a small valid construction (the fuzz sweeps start from it)
    # (kwargs, batch, seed) -> what the object takes: a layer's input, a cell's (z, x),
    # a constraint's kernel, a regularizer's or prior's features, a solver's injection.
    inputs: Callable | None = None
    # "layer", "cell" (called as `cell(z, x)`), "model", or what a holder model keeps:
    # "solver", "backward", "penalty", "budget", "constraint", "regularizer", "prior", "metric",
    # "cell_base", "correction", "start".
    kind: str = "layer"
    mixed_output: str | None = "float16"  # output dtype under mixed_float16; None: unsupported
    slow_export: bool = False  # tracing it for `model.export` takes 10 s or more
    jax_bugs: dict = {}  # part of `run_layer_test` (a flag of it) -> known bug on JAX


def _vector(width):
    return lambda kw, batch, seed: floats((batch, width), seed)


def _image(size, channels):
    return lambda kw, batch, seed: floats((batch, size, size, channels), seed)


def _cell_inputs(z_shapes, x_shape):
    """(z, x) of a cell; `z_shapes` one sample shape, or a list of them (a list state)."""

    def inputs(kw, batch, seed):
        multi = isinstance(z_shapes, list)
        z = [floats((batch, *s), seed + i) for i, s in enumerate(z_shapes if multi else [z_shapes])]
        return (z if multi else z[0]), floats((batch, *x_shape), seed + 7)

    return inputs


def _deq(**kw):
    """A DEQ of a `DenseCell(4)` (on 4 input features) in the layer's dtype."""
    dtype = kw.get("dtype") if kw.get("dtype") in FLOAT_DTYPES else None
    return DEQ(kw.pop("cell") if "cell" in kw else DenseCell(4, dtype=dtype), **kw)


def _dense_cell_inputs(kw, batch, seed):
    units = kw.get("units", 4)
    x_width = 5 if kw.get("use_injection", True) else units  # without injection: z + x
    return floats((batch, units), seed), floats((batch, x_width), seed + 1)


def _pcdeq_inputs(kw, batch, seed):
    if kw.get("filters") is not None:
        return floats((batch, 4, 4, kw["filters"]), seed)
    return floats((batch, kw.get("units", 4)), seed)


def _multiscale_inputs(kw, batch, seed):
    channels = kw.get("channels", (4,))
    first = channels if isinstance(channels, int) else channels[0]
    return floats((batch, 4, 4, first), seed)


def _opteq_inputs(kw, batch, seed):
    shape = (batch, 4, 4, 3) if kw.get("kind") == "conv" else (batch, 4)
    return floats(shape, seed)


def _kernel(shape):
    return lambda kw, batch, seed: 3.0 * floats(shape, seed)  # large: every cap acts


MULTISCALE = {"channels": (4, 8), "groups": 2}

CASES = {
    # ------------------------------------------------------------------------ layers
    "DEQ": Case(_deq, {}, _vector(4)),
    "DenseCell": Case(
        DenseCell, {"units": 4, "activation": "softsign"}, _dense_cell_inputs, "cell"
    ),
    "WeightNormalization": Case(
        lambda **kw: WeightNormalization(DenseCell(4), **kw),
        {"exclude": ["injection"]},
        _dense_cell_inputs,
        "cell",
    ),
    "SpectralReparametrization": Case(
        lambda **kw: SpectralReparametrization(DenseCell(4), **kw),
        {"power_iterations": 2},
        _dense_cell_inputs,
        "cell",
    ),
    "PcDEQ": Case(PcDEQ, {"units": 4, "weight_norm": True}, _pcdeq_inputs),
    "PositiveConcaveCell": Case(
        PositiveConcaveCell,
        {"activation": "softsign", "kernel_size": 3, "weight_norm": True},
        _cell_inputs((4, 4, 3), (4, 4, 3)),
        "cell",
    ),
    "MonDEQ": Case(MonDEQ, {"units": 4, "monotonicity": 0.5}, _vector(3)),
    "MonotoneCell": Case(
        MonotoneCell,
        {"units": 4, "splitting": "forward_backward", "monotonicity": 0.5},
        _cell_inputs((4,), (3,)),
        "cell",
    ),
    "ScaledReLU": Case(multiscale.ScaledReLU, {"slope": 0.3}, _vector(4)),
    "MeanGroupNormalization": Case(
        multiscale.MeanGroupNormalization,
        {"groups": 2, "gamma_constraint": constraints_lib.MaxAbs(0.7)},
        _image(4, 4),
    ),
    "MultiscaleCell": Case(
        multiscale.MultiscaleCell,
        MULTISCALE,
        _cell_inputs([(4, 4, 4), (2, 2, 8)], (4, 4, 4)),
        "cell",
    ),
    "LipschitzMultiscaleCell": Case(
        multiscale.LipschitzMultiscaleCell,
        {
            **MULTISCALE,
            "slope": 0.5,
            "softmax_weights": False,
            "conv_norm_cap": 1.5,
            "norm_iterations": 4,
        },
        _cell_inputs([(4, 4, 4), (2, 2, 8)], (4, 4, 4)),
        "cell",
    ),
    "MultiscaleDEQ": Case(
        multiscale.MultiscaleDEQ,
        {**MULTISCALE, "max_iter": 6, "on_failure": "ignore"},
        _multiscale_inputs,
        slow_export=True,
    ),
    "LipschitzMultiscale": Case(
        LipschitzMultiscale,
        {**MULTISCALE, "norm_iterations": 4, "max_iter": 4, "on_failure": "ignore"},
        _multiscale_inputs,
        slow_export=True,
    ),
    "OptEqDenseUnit": Case(
        opteq.OptEqDenseUnit,
        {"units": 8, "alpha": 0.7, "learnable_alpha": True, "max_norm": 0.9},
        _cell_inputs((5,), (4,)),
        "cell",
    ),
    "OptEqConvUnit": Case(
        opteq.OptEqConvUnit,
        {"units": 4, "kernel_size": 3, "alpha": 0.6},
        _cell_inputs((4, 4, 2), (4, 4, 3)),
        "cell",
    ),
    "OptEqCell": Case(
        opteq.OptEqCell,
        {"units": [6, 8], "alpha": 0.9, "prior": "l1", "prior_strength": 0.05},
        _cell_inputs((5,), (5,)),
        "cell",
    ),
    "OptEqBlock": Case(OptEqBlock, {"units": [4, 6], "unroll_steps": 7}, _opteq_inputs),
    "DEQTransformerCell": Case(
        DEQTransformerCell,
        {"num_heads": 2, "ff_dim": 12, "norm": "post", "dropout": 0.1},
        _cell_inputs((5, 8), (5, 8)),
        "cell",
    ),
    "DEQTransformerLM": Case(
        DEQTransformerLM,
        {"vocab_size": 7, "d_model": 8, "num_heads": 2, "max_iter": 4},
        lambda kw, batch, seed: tokens(batch, 5, kw["vocab_size"], seed),
        "model",
        mixed_output="float32",  # float32 logits, as documented
        jax_bugs={
            "mixed_precision": "in the solver's compiled loop the float16 attention is a "
            "dot_general of precision F16_F16_F32, which XLA on CPU refuses"
        },
    ),
    # -------------------------------------------------- objects that models hold
    "FixedPoint": Case(solvers.FixedPoint, {"max_iter": 20, "damping": 0.7}, _vector(4), "solver"),
    "Anderson": Case(
        solvers.Anderson, {"window": 3, "ridge": 0.0, "stop_mode": "abs"}, _vector(4), "solver"
    ),
    "Broyden": Case(solvers.Broyden, {"memory": 4, "tol": 1e-6}, _vector(4), "solver"),
    # Round-tripped on a non-affine map: its best measured iterate, the same after loading.
    "GMRES": Case(solvers.GMRES, {"restart": 4, "tol": 1e-6}, _vector(4), "solver"),
    "SAM": Case(
        solvers.SAM,
        {"max_iter": 9, "rho": 0.4, "c": 0.1, "gamma": 0.2, "fixed_steps": False},
        _vector(4),
        "solver",
    ),
    "Cell": Case(Cell, kind="cell_base"),
    # The base of the reparametrizations: no `build_kernel`, kept by a holder unbuilt.
    "KernelReparametrization": Case(
        lambda **kw: KernelReparametrization(DenseCell(4), **kw), kind="cell_base"
    ),  # the base class: no `call`, kept by a holder
    "Implicit": Case(
        backward_lib.Implicit,
        {"solver": solvers.Broyden(memory=4, max_iter=25)},
        kind="backward",
    ),
    "Phantom": Case(backward_lib.Phantom, {"steps": 3, "damping": 0.8}, kind="backward"),
    "OneStep": Case(backward_lib.OneStep, kind="backward"),
    "Unrolled": Case(backward_lib.Unrolled, kind="backward"),
    "Explicit": Case(backward_lib.Explicit, {"depth": 4}, kind="backward"),
    "FixedPointCorrection": Case(
        FixedPointCorrection,
        {"states": 2, "indexing": [3, 7], "gradient": "phantom", "weighting": "linear"},
        kind="correction",
    ),
    "RandomStart": Case(RandomStart, {"fraction": 0.5, "stddev": 0.3}, kind="start"),
    "JacobianPenalty": Case(
        JacobianPenalty,
        {"weight": 0.3, "frequency": 0.5, "probes": 2, "max_iter_delta": 1},
        kind="penalty",
    ),
    "Budget": Case(
        solvers.Budget, {"max_iter": 6, "eval_max_iter": 9, "min_iter": 3}, kind="budget"
    ),
    "ConvOperatorNorm": Case(
        constraints_lib.ConvOperatorNorm,
        {"max_norm": 1.5, "input_shape": (4, 4), "iterations": 8},
        _kernel((3, 3, 2, 3)),
        "constraint",
    ),
    "MaxAbs": Case(constraints_lib.MaxAbs, {"max_value": 0.5}, _kernel((4, 3)), "constraint"),
    "SpectralNorm": Case(
        constraints_opteq.SpectralNorm, {"max_norm": 0.8}, _kernel((4, 3)), "constraint"
    ),
    "ConvSpectralNorm": Case(
        constraints_opteq.ConvSpectralNorm,
        {"max_norm": 0.8, "spatial_shape": (4, 4)},
        _kernel((3, 3, 2, 3)),
        "constraint",
    ),
    "DecorrelationRegularizer": Case(
        opteq.DecorrelationRegularizer, {"strength": 0.3}, _vector(3), "regularizer"
    ),
    "HSICRegularizer": Case(
        opteq.HSICRegularizer, {"strength": 0.3, "sigma": 0.7}, _vector(3), "regularizer"
    ),
    "FeaturePrior": Case(
        opteq.FeaturePrior, {"name": "incay", "strength": 0.3, "epsilon": 0.5}, _vector(4), "prior"
    ),
    "BitsPerCharacter": Case(BitsPerCharacter, {"name": "m"}, kind="metric"),
    "Perplexity": Case(Perplexity, {"name": "m"}, kind="metric"),
}

LAYERS = sorted(name for name, case in CASES.items() if case.kind in ("layer", "cell", "model"))


def make(name, /, **overrides):
    """A small valid instance of `name` (a key of `CASES`), with `overrides`."""
    case = CASES[name]
    return case.build(**{**case.kwargs, **overrides})


def make_inputs(name, /, batch=3, seed=0, **overrides):
    case = CASES[name]
    return case.inputs({**case.kwargs, **overrides}, batch, seed)


def flat_inputs(name, inputs):
    """The list of arrays a model of `name` takes: a cell's `[*z, x]`."""
    if CASES[name].kind != "cell":
        return inputs
    z, x = inputs
    return [*(z if isinstance(z, list) else [z]), x]


def layer_model(name, layer, inputs):
    """A model applying `layer` to inputs like `inputs` (the layer itself for a model)."""
    kind = CASES[name].kind
    if kind == "model":
        layer(inputs)
        return layer
    if kind == "cell":
        z, x = inputs
        z_in = [keras.Input(t.shape[1:]) for t in (z if isinstance(z, list) else [z])]
        x_in = keras.Input(x.shape[1:])
        out = layer(z_in if isinstance(z, list) else z_in[0], x_in)
        return keras.Model([*z_in, x_in], out)
    x_in = keras.Input(inputs.shape[1:], dtype=str(inputs.dtype))
    return keras.Model(x_in, layer(x_in))


def build_model(name, /, seed=0, **overrides):
    """(model, layer, data): `make(name, **overrides)` in a model, and its data."""
    keras.utils.set_random_seed(seed)
    layer = make(name, **overrides)
    inputs = make_inputs(name, **overrides)
    return layer_model(name, layer, inputs), layer, flat_inputs(name, inputs)


def predict(model, data):
    """Inference, eagerly (tracing `model.predict` costs seconds per DEQ)."""
    return _arrays(quiet(model, data, training=False))


def _shapes(shape):
    """A shape, or a list of shapes, as a list of tuples."""
    if all(d is None or isinstance(d, int) for d in shape):
        return [tuple(shape)]
    return [tuple(s) for s in shape]


def _arrays(outputs):
    return [np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(outputs)]


def assert_finite(outputs):
    for array in _arrays(outputs):
        assert np.all(np.isfinite(array.astype("float64"))), "non-finite output"


# ---------------------------------------------------------------------------- checks
def check_output_shape(name, layer, data, outputs):
    """`compute_output_shape` of the input shapes gives the outputs' shapes."""
    shapes = [a.shape for a in _arrays(data)]
    if CASES[name].kind == "cell":
        z_shapes = shapes[:-1] if len(shapes) > 2 else shapes[0]
        expected = layer.compute_output_shape(z_shapes, shapes[-1])
    else:
        expected = layer.compute_output_shape(shapes[0])
    assert _shapes(expected) == [a.shape for a in _arrays(outputs)], expected


def check_config(layer):
    """`from_config(get_config())` makes a layer of the same class and config."""
    config = layer.get_config()
    clone = type(layer).from_config(normalized(config))
    assert type(clone) is type(layer)
    assert normalized(clone.get_config()) == normalized(config)


def check_training(model, data):
    """Two `fit` steps: a finite loss, and some trainable weight changes. Eagerly: tracing
    a DEQ's train step takes 10-30 s (the compiled fit is tested with each layer)."""
    if not model.trainable_weights:
        return
    targets = [floats(a.shape, 11 + i) for i, a in enumerate(predict(model, data))]
    model.compile(keras.optimizers.SGD(0.05), "mse", run_eagerly=True)
    before = [np.array(w) for w in model.trainable_weights]
    targets = targets[0] if len(targets) == 1 else targets
    history = quiet(model.fit, data, targets, batch_size=2, epochs=1, verbose=0).history
    assert np.all(np.isfinite(history["loss"])), history
    after = [np.array(w) for w in model.trainable_weights]
    assert any(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))


def check_keras_file(name, model, layer, data, path):
    """The saved `.keras` model predicts the same, with a layer of the same config. It loads
    with Keras' default `safe_mode=True` (spelled out): no custom object needs unsafe
    deserialization (a lambda in a config, ...)."""
    expected = predict(model, data)
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    for want, have in zip(expected, predict(loaded, data), strict=True):
        assert np.all(np.isfinite(want))
        np.testing.assert_array_equal(have, want)
    restored = loaded if CASES[name].kind == "model" else loaded.get_layer(layer.name)
    assert type(restored) is type(layer)
    assert normalized(restored.get_config()) == normalized(layer.get_config())


def check_mixed_precision(name, **overrides):
    """Built under `mixed_float16`: float32 variables, finite outputs of the case's dtype."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model, layer, data = build_model(name, **overrides)
        outputs = quiet(model, data)
    finally:
        keras.config.set_dtype_policy(previous)
    assert layer.compute_dtype == "float16"
    assert all(v.dtype == "float32" for v in layer.weights if "float" in v.dtype)
    for array in _arrays(outputs):
        assert array.dtype == CASES[name].mixed_output, array.dtype
    assert_finite(outputs)


def export(model, path, signature=None):
    model.export(str(path), verbose=False, **({"input_signature": signature} if signature else {}))


def signature_of(model, data):
    """The export signature of a subclassed model (a functional one reads its Inputs)."""
    import tensorflow as tf

    if isinstance(model, keras.Sequential) or hasattr(model, "_nodes_by_depth"):
        return None
    return [tf.TensorSpec((None, *data.shape[1:]), tf.as_dtype(data.dtype))]


def assert_serves_keras_predictions(model, make_data, path, tfsm=True):
    """The exported model at `path` gives the Keras model's predictions, reloaded with
    `tf.saved_model.load` and as a `keras.layers.TFSMLayer`, on batches it never saw."""
    import tensorflow as tf

    restored = tf.saved_model.load(str(path))
    layer = keras.layers.TFSMLayer(str(path), call_endpoint="serve") if tfsm else None
    for batch in SERVED_BATCHES:
        data = make_data(batch, seed=batch)
        expected = predict(model, data)
        assert expected[0].shape[0] == batch
        assert_finite(expected)
        served = [quiet(restored.serve, tf.nest.map_structure(tf.constant, data))]
        if layer is not None:
            served.append(quiet(layer, data))
        for outputs in served:
            for have, want in zip(_arrays(outputs), expected, strict=True):
                np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6)


def check_export(name, model, data, path, write=export, **overrides):
    """`write(model, path, signature)` exports a model that serves the Keras predictions."""
    write(model, path, signature_of(model, data))

    def make_data(batch, seed):
        return flat_inputs(name, make_inputs(name, batch, seed, **overrides))

    assert_serves_keras_predictions(model, make_data, path)


def run_layer_test(
    name, tmp_path, *, training=True, keras_file=True, mixed_precision=None, export=None
):
    """The checks every layer of `CASES` passes; a flag left `None` follows the case. The
    export runs on TensorFlow only (a SavedModel of TensorFlow functions)."""
    case = CASES[name]
    model, layer, data = build_model(name)
    outputs = quiet(model, data)
    assert_finite(outputs)
    check_output_shape(name, layer, data, outputs)
    check_config(layer)
    if training:
        check_training(model, data)  # before the saving: trained, not initial, weights
    if keras_file:
        check_keras_file(name, model, layer, data, tmp_path / "model.keras")
    if case.mixed_output is not None if mixed_precision is None else mixed_precision:
        check_mixed_precision(name)
    if not case.slow_export if export is None else export:
        if keras.backend.backend() == "tensorflow":
            check_export(name, model, data, tmp_path / "exported")
