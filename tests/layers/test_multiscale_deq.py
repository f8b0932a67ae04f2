"""The multiscale DEQ layers (`MultiscaleDEQ`, `LipschitzMultiscale`): training, gradients, saving."""

import keras
import numpy as np
import pytest
from conv_references import exact_norm
from multiscale_references import SIZE, SMALL, random_injection, saturate

from keras_deq import constraints
from keras_deq.layers.multiscale_deq import LipschitzMultiscale, MultiscaleDEQ


def conv_layers(cell):
    """Every conv of the cell, with the input size it sees."""
    chains = [*cell.block_inner, *cell.fusions, *cell.post_fusion]
    return [s for chain in chains for s in chain.steps if isinstance(s, keras.layers.Conv2D)]


def classifier(deq_layer, stem_channels):
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Conv2D(stem_channels, 3, padding="same", activation="relu")(inputs)
    branches = deq_layer(x)
    pooled = [keras.layers.GlobalAveragePooling2D()(z) for z in branches]
    logits = keras.layers.Dense(3)(keras.layers.Concatenate()(pooled))
    return keras.Model(inputs, logits)


# ------------------------------------------------------------------ caps survive training
def test_caps_hold_after_training_with_a_large_learning_rate():
    keras.utils.set_random_seed(0)
    layer = LipschitzMultiscale(**SMALL, solver="fixed_point", max_iter=30, tol=1e-4, name="deq")
    model = classifier(layer, SMALL["channels"][0])
    model.compile(
        keras.optimizers.Adam(1e-1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(320, SIZE, SIZE, 1)).astype("float32")
    y = rng.integers(0, 3, size=320)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert len(history.history["loss"]) == 1 and np.isfinite(history.history["loss"][0])

    cell = layer.cell
    norms, bounds = [], []
    for conv in conv_layers(cell):
        cap = conv.kernel_constraint
        norms.append(exact_norm(conv.kernel.numpy(), cap.input_shape[:2], cap.strides))
        bounds.append(float(cap.norm(conv.kernel)))
    assert max(norms) <= cell.conv_norm_cap * (1 + 1e-6)  # a guarantee, not an estimate
    assert max(bounds) >= 0.99 * cell.conv_norm_cap  # the cap was active
    gammas = [v.numpy() for v in cell.weights if v.path.endswith("gamma")]
    assert max(np.abs(g).max() for g in gammas) <= cell.gamma_cap
    assert float(cell.lipschitz_bound()) < 1.0


@pytest.mark.float64
@pytest.mark.tensorflow_only(
    "on_failure='raise', which DEQ refuses on JAX (no sound way to stop a compiled step), "
    "and a tf.GradientTape through eager cell calls"
)
# ------------------------------------------------------------------ implicit gradient = unrolled
def test_implicit_gradient_equals_autodiff_through_a_long_unrolled_iteration():
    import tensorflow as tf  # noqa: PLC0415

    layer = LipschitzMultiscale(
        **SMALL,
        solver="anderson",
        max_iter=100,
        tol=1e-13,
        backward_tol=1e-13,
        backward_max_iter=100,
        stop_mode="abs",
        on_failure="raise",
        dtype="float64",
    )
    x = random_injection(2, 1, dtype="float64")
    layer.build(x.shape)
    saturate(layer.cell, seed=4)
    rng = np.random.default_rng(5)
    weights = [tf.constant(rng.normal(size=(2, *shape))) for shape in layer.state_shape]

    def loss(z):
        return tf.add_n([tf.reduce_sum(w * t) for w, t in zip(weights, z, strict=True)])

    variables = layer.cell.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        implicit = loss(layer(x, training=True))
        z = [tf.zeros_like(w) for w in weights]
        for _ in range(80):  # a contraction by at most the bound (< 0.7): error < 1e-13
            z = layer.cell(z, x)
        unrolled = loss(z)
    np.testing.assert_allclose(implicit.numpy(), unrolled.numpy(), rtol=1e-12)
    got = tape.gradient(implicit, [x, *variables])
    want = tape.gradient(unrolled, [x, *variables])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------ config and saving
@pytest.mark.parametrize("cls", [MultiscaleDEQ, LipschitzMultiscale])
def test_layer_config_round_trip(cls):
    layer = cls(channels=(4, 8), groups=2, max_iter=12, tol=1e-3, solver="fixed_point")
    restored = cls.from_config(layer.get_config())
    assert restored.get_config() == layer.get_config()
    assert type(restored.cell) is type(layer.cell)
    assert restored.cell.get_config()["channels"] == [4, 8]


def test_lipschitz_layer_passes_its_hyper_parameters_to_the_cell():
    layer = LipschitzMultiscale(**SMALL, slope=0.3, alpha=0.25, beta=0.5, conv_norm_cap=1.5)
    assert (layer.cell.slope, layer.cell.alpha, layer.cell.beta) == (0.3, 0.25, 0.5)
    assert layer.get_config()["conv_norm_cap"] == 1.5


@pytest.mark.parametrize("cls", [MultiscaleDEQ, LipschitzMultiscale])
def test_keras_file_save_and_load(cls, tmp_path):
    keras.utils.set_random_seed(1)
    layer = cls(**SMALL, max_iter=20, tol=1e-4, on_failure="ignore", name="deq")
    model = classifier(layer, SMALL["channels"][0])
    x = np.random.default_rng(0).normal(size=(4, SIZE, SIZE, 1)).astype("float32")
    before = model.predict(x, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), before, rtol=1e-5, atol=1e-6)
    layer = loaded.get_layer("deq")
    assert type(layer) is cls
    assert layer.state_shape == [(8, 8, 4), (4, 4, 8)]
    if cls is LipschitzMultiscale:
        assert all(
            isinstance(c.kernel_constraint, constraints.ConvOperatorNorm)
            for c in conv_layers(layer.cell)
        )


def test_layer_output_is_the_list_of_branch_states():
    layer = MultiscaleDEQ(channels=(4, 8, 8), groups=2, max_iter=5, on_failure="ignore")
    out = layer(random_injection(2, 0))
    assert [tuple(t.shape) for t in out] == [(2, 8, 8, 4), (2, 4, 4, 8), (2, 2, 2, 8)]
    assert layer.compute_output_shape((None, 8, 8, 4)) == [
        (None, 8, 8, 4),
        (None, 4, 4, 8),
        (None, 2, 2, 8),
    ]
