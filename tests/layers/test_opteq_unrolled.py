"""`OptEqBlock`'s unrolled and SAM modes through its `DEQ`: outputs and gradients against a
numpy reference, the DEQ's metrics and `on_failure`, and files and configs saved before."""

import io
import warnings
import zipfile

import h5py
import keras
import numpy as np
import pytest
from feature_references import layer_gradients
from keras import ops
from opteq_references import numpy_gradient, numpy_map, numpy_unrolled

from keras_deq.layers.opteq_block import OptEqBlock

BACKEND = keras.backend.backend()
# Each mode: the block's arguments and the numpy pieces of its iteration (T_R, grad R).
MODES = {
    "plain": ({}, None, None),
    "structural-l2": ({"prior": "l2", "prior_strength": 0.5}, lambda z: z / 1.5, None),
    "sam-l2": ({"prior": "l2", "prior_mode": "sam", "prior_strength": 0.3}, None, lambda z: z),
    "sam-incay": (
        {"prior": "incay", "prior_mode": "sam", "prior_strength": 0.4, "sam_rho": 0.3},
        None,
        lambda z: -4.0 * z / (np.sum(z * z, axis=1, keepdims=True) + 2.0) ** 2,
    ),
}
PRECISION = [  # dtype, rtol and atol of the outputs, rtol of the gradients
    pytest.param("float32", 2e-5, 2e-6, 5e-4, id="float32"),
    pytest.param("float64", 1e-12, 1e-14, 1e-6, marks=pytest.mark.float64, id="float64"),
]


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def block_and_reference(mode, dtype, steps=6, **overrides):
    """A built block (two units, orthogonal kernels capped at 0.9) and its numpy reference
    `(x, probe) -> z_K` with the block's current weights."""
    options, prior_step, grad_r = MODES[mode]
    block = OptEqBlock(
        [5, 3],
        alpha=0.7,
        max_norm=0.9,
        kernel_initializer="orthogonal",
        unroll_steps=steps,
        deq_options={"on_failure": "ignore"},
        dtype=dtype,
        name="opteq",
        **{**options, **overrides},
    )
    block.build((None, 4))
    sam = {"rho": block.sam_rho, "c": block.sam_c, "gamma": options.get("prior_strength")}

    def reference(x, *weights):
        units = [weights[i : i + 3] for i in range(0, len(weights), 3)]
        t = numpy_map(x, units, 0.7, prior_step)
        return numpy_unrolled(t, x, steps, grad_r, **(sam if grad_r is not None else {}))

    return block, reference


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(("dtype", "rtol", "atol", "grad_rtol"), PRECISION)
def test_unrolled_output_and_gradients_equal_the_numpy_reference(
    mode, dtype, rtol, atol, grad_rtol
):
    """`z_K` and the gradients of `sum(z_K * probe)` with respect to the input and every
    weight, against Algorithm 1 in numpy and its central finite differences (float64)."""
    block, reference = block_and_reference(mode, dtype)
    rng = np.random.default_rng(1)
    x, probe = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    weights = [np.asarray(v, np.float64) for v in block.cell.trainable_variables]
    z = np.asarray(block(ops.convert_to_tensor(x.astype(dtype))))
    np.testing.assert_allclose(z, reference(x, *weights), rtol=rtol, atol=atol)
    grads = layer_gradients(
        block,
        x.astype(dtype),
        lambda out: ops.sum(out * ops.convert_to_tensor(probe, dtype)),
        block.cell.trainable_variables,
    )
    got = np.concatenate([np.asarray(g, np.float64).ravel() for g in grads])
    want = numpy_gradient(lambda *a: float(np.sum(reference(*a) * probe)), [x, *weights])
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(got, want, rtol=grad_rtol, atol=grad_rtol * scale * 1e-2)


@pytest.mark.parametrize("mode", ["plain", "sam-incay"])
def test_unrolled_blocks_report_the_deq_statistics_of_their_k_steps(mode):
    """`fwd_steps` is K and `fwd_residual` the mean relative residual of step K, i.e. of
    `z_{K-1}` against T (numpy)."""
    block, reference = block_and_reference(mode, "float32", steps=5)
    x = np.random.default_rng(2).normal(size=(6, 4))
    block(x.astype("float32"))
    weights = [np.asarray(v, np.float64) for v in block.cell.trainable_variables]
    _, prior_step, _ = MODES[mode]
    t = numpy_map(x, [weights[i : i + 3] for i in range(0, len(weights), 3)], 0.7, prior_step)
    before_last = block_and_reference(mode, "float32", steps=4)[1](x, *weights)
    diff = np.linalg.norm(t(before_last) - before_last, axis=1)
    residual = np.mean(diff / np.linalg.norm(t(before_last), axis=1))
    stats = block.deq.solver_statistics()
    assert stats["fwd_steps"] == 5
    assert stats["fwd_residual"] == pytest.approx(residual, rel=1e-4)
    assert stats["converged"] == float(
        np.mean(diff / np.linalg.norm(t(before_last), axis=1) <= 1e-3)
    )


@pytest.mark.parametrize(
    "options", [{}, {"prior": "l1", "prior_mode": "sam"}], ids=["plain", "sam"]
)
def test_unrolled_blocks_log_the_deq_metrics_in_fit(options):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(32, 4)).astype("float32"), np.arange(32) % 2
    block = OptEqBlock(
        [6], unroll_steps=4, deq_options={"on_failure": "ignore"}, name="opteq", **options
    )
    model = keras.Sequential([keras.Input((4,)), block, keras.layers.Dense(2)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert block.deq.solver_statistics()["fwd_steps"] == 4
    if BACKEND != "jax":  # JAX `fit` logs lack the DEQ's metrics
        assert history.history["opteq_deq_fwd_steps"] == [4.0]
        assert np.isfinite(history.history["opteq_deq_fwd_residual"][0])


@pytest.mark.parametrize(
    "options", [{}, {"prior": "l2", "prior_mode": "sam"}], ids=["plain", "sam"]
)
def test_unrolled_blocks_honour_on_failure(options):
    """One step cannot reach tol=1e-9: "warn" warns once, "ignore" is silent, "raise" raises
    (TensorFlow, PyTorch; JAX refuses "raise" at construction)."""
    x = np.random.default_rng(4).normal(size=(3, 4)).astype("float32")

    def block(on_failure):
        return OptEqBlock(
            [5], unroll_steps=1, tol=1e-9, deq_options={"on_failure": on_failure}, **options
        )

    warning = block("warn")
    with pytest.warns(RuntimeWarning, match="tol=1e-09 for 3 sample.*exactly max_iter=1 steps"):
        warning(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warning(x)  # once per layer
        block("ignore")(x)
    if BACKEND != "jax":
        with pytest.raises(FloatingPointError, match="did not reach tol"):
            block("raise")(x)
    else:
        with pytest.raises(ValueError, match="on_failure"):
            block("raise")


def test_a_nan_sample_is_frozen_and_reported_the_others_are_not_touched():
    x = np.random.default_rng(5).normal(size=(3, 4)).astype("float32")
    block = OptEqBlock([5], unroll_steps=3, tol=1.0, name="opteq")  # clean samples converge
    clean = np.asarray(block(x))
    x[1, 2] = np.nan
    with pytest.warns(RuntimeWarning, match="for 1 sample.*NaN or Inf for 1 of them"):
        z = np.asarray(block(x))
    np.testing.assert_array_equal(z[[0, 2]], clean[[0, 2]])


def test_deq_options_apply_in_every_mode_and_may_not_set_the_blocks_own_settings():
    block = OptEqBlock(
        [5], unroll_steps=3, deq_options={"stop_mode": "abs", "jacobian_weight": 1.0}
    )
    assert block.deq.stop_mode == "abs" and block.deq.solver.stop_mode == "abs"
    block(np.ones((2, 4), "float32"), training=True)
    assert len(block.losses) == 1  # the Jacobian penalty, now also in the unrolled modes
    for options in ({"max_iter": 3}, {"backward": "implicit"}, {"solver": "anderson"}):
        with pytest.raises(ValueError, match="deq_options"):
            OptEqBlock([5], deq_options=options)
    with pytest.raises(ValueError, match="deq_options"):
        OptEqBlock([5], training_mode="implicit", deq_options={"tol": 1e-3})


# Configs written by OptEqBlock before its unrolled modes ran through a DEQ.
OLD_CONFIG = {
    "name": "block",
    "trainable": True,
    "dtype": "float32",
    "units": [6],
    "kind": "dense",
    "kernel_size": 3,
    "alpha": 0.8,
    "learnable_alpha": False,
    "activation": "relu",
    "max_norm": 1.0,
    "prior": "incay",
    "prior_mode": "sam",
    "prior_strength": 0.1,
    "prior_epsilon": 1.0,
    "prior_sigma": 1.0,
    "sam_rho": 0.3,
    "sam_c": 0.1,
    "training_mode": "unrolled",
    "unroll_steps": 5,
    "solver": "broyden",
    "max_iter": 50,
    "tol": 0.001,
    "deq_options": {},
    "kernel_initializer": None,
    "injection_initializer": {
        "module": "keras.initializers",
        "class_name": "GlorotUniform",
        "config": {"seed": None},
        "registered_name": None,
    },
}


@pytest.mark.parametrize(
    "changes",
    [{}, {"prior": None, "prior_mode": "structural"}, {"training_mode": "implicit", "prior": None}],
    ids=["sam", "plain", "implicit"],
)
def test_configs_saved_before_load_with_the_same_keys(changes):
    config = {**OLD_CONFIG, **changes}
    block = OptEqBlock.from_config(config)
    new = block.get_config()
    assert sorted(new) == sorted(config)
    for key in ("units", "prior", "prior_mode", "sam_rho", "sam_c", "training_mode", "tol"):
        assert new[key] == config[key], key


def test_a_file_without_the_deq_variables_loads(tmp_path):
    """Files saved before the unrolled modes had a DEQ hold none of its variables: the
    same file with the DEQ's group removed loads, and computes the same."""
    block = OptEqBlock([5, 3], prior="incay", prior_mode="sam", unroll_steps=4, name="opteq")
    model = keras.Sequential([keras.Input((4,)), block])
    x = np.random.default_rng(6).normal(size=(3, 4)).astype("float32")
    want = np.asarray(model(x))
    path = tmp_path / "model.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    weights = io.BytesIO(members["model.weights.h5"])
    with h5py.File(weights, "r+") as store:
        groups = [name for name in store["layers"] if "deq" in store["layers"][name]]
        assert groups, list(store["layers"])
        for name in groups:
            del store["layers"][name]["deq"]
    members["model.weights.h5"] = weights.getvalue()
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(old, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    loaded = keras.saving.load_model(old)
    np.testing.assert_allclose(np.asarray(loaded(x)), want, rtol=1e-6, atol=1e-7)
