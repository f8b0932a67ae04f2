"""`DEQTransformerCell` and `DEQTransformerLM`: causality, gradients, dropout, saving."""

import keras
import numpy as np
import pytest
from feature_references import layer_gradients
from keras import ops

import keras_deq
from keras_deq.layers.transformer import DEQTransformerCell, sinusoidal_positions
from keras_deq.models.language import BitsPerCharacter, DEQTransformerLM, Perplexity

VOCAB = 11


def _lm(**kwargs):
    keras.utils.set_random_seed(0)
    options = dict(vocab_size=VOCAB, d_model=16, num_heads=2, max_iter=30, tol=1e-3)
    options.update(kwargs)
    model = DEQTransformerLM(**options)
    model.build((None, None))
    return model


def _scale_kernels(layer, factor):
    """Larger weights, so that the equilibrium is far from the first iterate."""
    for v in layer.trainable_variables:
        if "kernel" in v.path:
            v.assign(v.numpy() * factor)


def _change_token(tokens, t):
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 3) % VOCAB
    return changed


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_changing_token_t_never_changes_earlier_logits_through_the_model(norm):
    # Picard iteration treats positions independently, so the solved model is
    # exactly causal (a solver that mixes iterates across positions is causal up
    # to its tolerance, see the next test).
    model = _lm(norm=norm, solver="fixed_point", max_iter=12)
    _scale_kernels(model.cell, 10.0)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, 10))
    base = np.asarray(model(tokens))
    assert model.deq.solver_statistics()["fwd_steps"] > 3
    for t in (0, 4, 9):
        out = np.asarray(model(_change_token(tokens, t)))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-3


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_per_position_solve_is_exactly_causal_with_any_solver(solver):
    # The language model's default: the solver treats each position as a sample.
    model = _lm(solver=solver, tol=1e-5, max_iter=40)
    assert model.deq.solver_batch_dims == 2
    _scale_kernels(model.cell, 10.0)
    tokens = np.random.default_rng(1).integers(0, VOCAB, (3, 10))
    base = np.asarray(model(tokens))
    assert model.deq.solver_statistics()["fwd_steps"] > 3
    assert model.deq.solver_statistics()["converged"] == 1.0
    for t in (0, 6, 9):
        out = np.asarray(model(_change_token(tokens, t)))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-1


def test_whole_sequence_anderson_is_causal_up_to_the_solver_tolerance():
    model = _lm(solver="anderson", tol=1e-6, max_iter=60, deq_options={"solver_batch_dims": 1})
    _scale_kernels(model.cell, 10.0)
    tokens = np.random.default_rng(1).integers(0, VOCAB, (3, 10))
    base = np.asarray(model(tokens))
    out = np.asarray(model(_change_token(tokens, 6)))
    assert np.abs(out[:, :6] - base[:, :6]).max() < 1e-3
    assert np.abs(out[:, 6:] - base[:, 6:]).max() > 1e-1


def _float64_deq(backward, solver, max_iter, tol, norm):
    keras.utils.set_random_seed(3)
    cell = DEQTransformerCell(
        2,
        ff_dim=12,
        norm=norm,
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.3),
        dtype="float64",
    )
    return keras_deq.DEQ(
        cell,
        solver=solver,
        max_iter=max_iter,
        tol=tol,
        backward=backward,
        on_failure="ignore",
        dtype="float64",
    )


@pytest.mark.float64
@pytest.mark.parametrize("norm", ["pre", pytest.param("post", marks=pytest.mark.slow)])
def test_implicit_gradient_equals_autodiff_through_a_long_unrolled_iteration(norm):
    rng = np.random.default_rng(0)
    x = ops.convert_to_tensor(rng.normal(size=(2, 5, 8)), "float64")
    w = ops.convert_to_tensor(rng.normal(size=(2, 5, 8)), "float64")
    implicit = _float64_deq("implicit", "anderson", 100, 1e-13, norm)
    unrolled = _float64_deq("unrolled", "fixed_point", 80, 1e-300, norm)
    one_step = _float64_deq("one_step", "anderson", 100, 1e-13, norm)
    for layer in (implicit, unrolled, one_step):
        layer.build(x.shape)
        layer.cell.set_weights(implicit.cell.get_weights())

    def grads(layer):
        # Compiled (`tf.function`, `jax.jit`): the eager solver loops are slow.
        loss = lambda out: ops.sum(ops.sin(out) * w)  # noqa: E731
        return layer_gradients(layer, x, loss, layer.cell.trainable_variables)

    g_imp, g_unr = grads(implicit), grads(unrolled)
    # The map is a genuine contraction with a non-trivial Jacobian.
    if keras.backend.backend() != "tensorflow":
        implicit(x)  # the statistics of the compiled stateless call were not kept
    assert 5 < implicit.solver_statistics()["fwd_steps"] < 100
    assert len(g_imp) == 1 + len(implicit.cell.trainable_variables) == 1 + 16
    for a, b in zip(g_imp, g_unr, strict=True):
        assert a is not None and b is not None
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-8 * (1.0 + np.abs(b).max())
    assert np.abs(np.asarray(g_imp[0])).max() > 1e-3
    # ... and the test can tell: the Jacobian-free gradient is far off.
    g_one = grads(one_step)
    assert (
        max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(g_imp, g_one, strict=True))
        > 1e-2
    )


def test_variational_dropout_keeps_one_mask_per_solve():
    keras.utils.set_random_seed(0)
    cell = DEQTransformerCell(2, dropout=0.5)
    z = keras.random.normal((4, 6, 8))
    x = keras.random.normal((4, 6, 8))
    cell(z, x)
    cell.resample_dropout()
    a = cell(z, x, training=True)
    np.testing.assert_array_equal(a, cell(z, x, training=True))
    cell.resample_dropout()
    assert np.abs(a - cell(z, x, training=True)).max() > 1e-3
    np.testing.assert_array_equal(cell(z, x), cell(z, x, training=False))
    # Same mask at every iteration: the training solve still converges.
    deq = keras_deq.DEQ(cell, solver="anderson", max_iter=40, tol=1e-5, on_failure="ignore")
    deq(x, training=True)
    assert deq.solver_statistics()["converged"] == 1.0


def test_model_trains_with_fit_and_reports_bits_and_solver_steps():
    model = _lm(dropout=0.1, embedding_dropout=0.1, max_iter=8, jacobian_weight=0.5)
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[BitsPerCharacter(), Perplexity()],
    )
    tokens = np.tile(np.arange(VOCAB), 40)[: 16 * 13].reshape(16, 13)
    history = model.fit(tokens[:, :-1], tokens[:, 1:], batch_size=8, epochs=2, verbose=0)
    logs = history.history
    np.testing.assert_allclose(logs["bpc"][-1], logs["loss"][-1] / np.log(2), rtol=0.05)
    np.testing.assert_allclose(logs["perplexity"][-1], np.exp(logs["loss"][-1]), rtol=0.05)
    stats = model.deq.solver_statistics()
    assert stats["fwd_steps"] >= 1
    if keras.backend.backend() != "jax":  # the layer keeps metrics that `fit` logs
        assert logs["deq_fwd_steps"][-1] >= 1 and logs["deq_bwd_steps"][-1] >= 1
        assert logs["deq_jac_loss"][-1] > 0
    else:  # JAX `fit` logs lack the DEQ's metrics; its variables hold the last step's
        assert stats["jac_loss"] > 0
    assert logs["loss"][-1] < logs["loss"][0]


def test_generation_is_deterministic_under_a_fixed_seed():
    model = _lm()
    prompt = [1, 2, 3]
    a = model.generate(prompt, length=8, seed=7)
    assert a.shape == (11,) and a.dtype == np.int32 and list(a[:3]) == prompt
    np.testing.assert_array_equal(a, model.generate(prompt, length=8, seed=7))
    samples = {tuple(model.generate(prompt, length=8, seed=s)) for s in range(4)}
    assert len(samples) > 1
    greedy = model.generate([prompt, prompt], length=4, greedy=True)
    assert greedy.shape == (2, 7)
    np.testing.assert_array_equal(greedy[0], greedy[1])


def test_keras_round_trip_gives_identical_logits(tmp_path):
    model = _lm(norm="post", dropout=0.1, ff_dim=24, solver="broyden")
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
    path = tmp_path / "lm.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, DEQTransformerLM) and loaded.deq.solver == "broyden"
    assert loaded.cell.norm == "post" and loaded.cell.dropout == 0.1
    np.testing.assert_array_equal(loaded(tokens), model(tokens))


def test_cell_config_round_trip_and_argument_checks():
    cell = DEQTransformerCell(4, ff_dim=32, norm="post", dropout=0.2, activation="relu")
    clone = DEQTransformerCell.from_config(cell.get_config())
    assert clone.get_config() == cell.get_config()
    with pytest.raises(ValueError, match="norm"):
        DEQTransformerCell(2, norm="sandwich")
    with pytest.raises(ValueError, match="num_heads"):
        DEQTransformerCell(0)
    with pytest.raises(ValueError, match="dropout"):
        DEQTransformerCell(2, dropout=1.0)
    with pytest.raises(ValueError, match="d_model"):
        keras_deq.DEQ(DEQTransformerCell(2), state_shape=(5, 8))(ops.zeros((1, 5, 6)))


def test_sinusoidal_positions():
    pe = np.asarray(sinusoidal_positions(7, 6))
    assert pe.shape == (7, 6)
    np.testing.assert_allclose(pe[:, 0], np.sin(np.arange(7)), atol=1e-6)
    np.testing.assert_allclose(pe[:, 1], np.cos(np.arange(7)), atol=1e-6)
    assert sinusoidal_positions(3, 5).shape == (3, 5)
