"""`Budget`: a DEQ's forward iteration budget in training (fixed or drawn) and at evaluation.
Each solve is compared with a hand-written loop of the cell run for the budget's number of
steps; compiled training steps are counted to show that a new draw does not retrace them."""

import keras
import numpy as np
import pytest
from deq_statistics import EpochStatistic, reset_statistics, statistic
from keras import ops

from keras_deq import DEQ, DenseCell, solvers
from keras_deq.solvers import Budget

BATCH, UNITS = 3, 5
BACKEND = keras.backend.backend()


def test_settings_are_checked_and_serialize():
    budget = Budget(12, eval_max_iter=30, min_iter=8)
    assert budget.get_config() == {"max_iter": 12, "eval_max_iter": 30, "min_iter": 8}
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(budget))
    assert restored.get_config() == budget.get_config()
    with pytest.raises(ValueError, match=r"`min_iter` must be at most `max_iter`.*min_iter=5"):
        Budget(4, min_iter=5)
    with pytest.raises(ValueError, match="max_iter=0"):
        Budget(0)
    with pytest.raises(ValueError, match="eval_max_iter=2.5"):
        Budget(4, eval_max_iter=2.5)


def test_for_call_picks_the_evaluation_budget_or_draws_the_training_one():
    assert Budget(6, eval_max_iter=20).for_call(False) == 20
    assert Budget(6).for_call(None) == 6
    assert Budget(6, eval_max_iter=20).for_call(True) == 6
    assert Budget(6, min_iter=6).for_call(True) == 6
    seed = keras.random.SeedGenerator(0)
    draws = [int(Budget(6, min_iter=3).for_call(True, seed)) for _ in range(40)]
    assert set(draws) == {3, 4, 5, 6}


def _layer(budget, **kwargs):
    keras.utils.set_random_seed(0)
    # A slow contraction (gain 0.9), and a solver that runs exactly its budget and
    # returns its last iterate: a call of budget k returns cell applied k times.
    cell = DenseCell(UNITS, kernel_initializer=keras.initializers.Orthogonal(0.9, seed=0))
    solver = solvers.FixedPoint(tol=1e-6, fixed_steps=True)
    layer = DEQ(cell, solver=solver, max_iter=budget, on_failure="ignore", seed=3, **kwargs)
    x = np.random.default_rng(1).normal(size=(BATCH, UNITS)).astype("float32")
    layer.build(x.shape)
    return layer, x


def _unrolled(cell, x, k):
    """`cell` applied `k` times from zeros, in a Python loop."""
    z = ops.zeros((BATCH, UNITS))
    for _ in range(k):
        z = cell(z, ops.convert_to_tensor(x))
    return ops.convert_to_numpy(z)


def test_calls_stop_at_the_drawn_or_evaluation_budget():
    layer, x = _layer(Budget(5, eval_max_iter=8, min_iter=2))
    seen = set()
    for _ in range(4):
        reset_statistics(layer)
        out = ops.convert_to_numpy(layer(x, training=True))
        k = int(statistic(layer, "fwd_steps"))
        assert 2 <= k <= 5
        np.testing.assert_allclose(out, _unrolled(layer.cell, x, k), rtol=1e-5, atol=1e-6)
        seen.add(k)
    assert len(seen) >= 2
    reset_statistics(layer)
    out = ops.convert_to_numpy(layer(x, training=False))
    assert statistic(layer, "fwd_steps") == 8
    np.testing.assert_allclose(out, _unrolled(layer.cell, x, 8), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_fit_draws_a_budget_per_step_without_retracing(backward):
    layer, x = _layer(Budget(5, eval_max_iter=8, min_iter=2), backward=backward)
    traces = []
    draw = layer._budget

    def counted(training):  # runs once per trace of a compiled step (each call eagerly)
        traces.append(training)
        return draw(training)

    layer._budget = counted
    model = keras.Sequential([keras.Input((UNITS,)), layer, keras.layers.Dense(1)])
    model.compile("sgd", "mse", run_eagerly=False)
    steps = EpochStatistic(layer, "fwd_steps")
    model.fit(x, np.zeros((BATCH, 1)), epochs=10, batch_size=BATCH, verbose=0, callbacks=[steps])
    assert all(2 <= s <= 5 for s in steps.values) and len(set(steps.values)) >= 2, steps.values
    compiled_steps = BACKEND != "torch"  # Keras runs a torch step eagerly
    assert traces.count(True) == (1 if compiled_steps else 10)
    logs = model.evaluate(x, np.zeros((BATCH, 1)), verbose=0, return_dict=True)
    assert (logs.get(f"{layer.name}_fwd_steps") or statistic(layer, "fwd_steps")) == 8


def _presets():
    """Each preset with a `Budget`, an input, and its `DEQ` (the layer or the one inside);
    `tol` is out of reach: a training solve runs its 2 steps, an evaluation one more."""
    import keras_deq
    from keras_deq.models import DEQTransformerLM

    rng = np.random.default_rng(0)
    budget = Budget(2, eval_max_iter=7)
    dense = rng.normal(size=(BATCH, 8)).astype("float32")
    image = rng.normal(size=(2, 4, 4, 4)).astype("float32")
    common = {"max_iter": budget, "tol": 1e-12}
    return {
        "PcDEQ": (lambda: keras_deq.PcDEQ(8, **common), dense, lambda layer: layer),
        "MonDEQ": (lambda: keras_deq.MonDEQ(8, **common), dense, lambda layer: layer),
        "MultiscaleDEQ": (
            lambda: keras_deq.MultiscaleDEQ(channels=(4, 4), groups=2, **common),
            image,
            lambda layer: layer,
        ),
        "OptEqBlock": (
            lambda: keras_deq.OptEqBlock(8, training_mode="implicit", **common),
            dense,
            lambda block: block.deq,
        ),
        "DEQTransformerLM": (
            lambda: DEQTransformerLM(11, d_model=8, num_heads=2, **common),
            rng.integers(0, 11, size=(2, 5)),
            lambda model: model.deq,
        ),
    }


# The hand-over of `max_iter` is the same code on every backend; on JAX, whose eager
# calls compile op by op, the two largest presets cost 20-30 s each: left to TF and torch.
_SLOW_ON_JAX = pytest.mark.skipif(BACKEND == "jax", reason="compile time; same code as TF")
PRESETS = [
    pytest.param(name, marks=_SLOW_ON_JAX)
    if name in ("MultiscaleDEQ", "DEQTransformerLM")
    else name
    for name in _presets()
]


@pytest.mark.filterwarnings("ignore:DEQ layer:RuntimeWarning")  # tol out of reach
@pytest.mark.parametrize("name", PRESETS)
def test_presets_take_a_budget_and_keep_it_in_their_config(name):
    make, x, inner = _presets()[name]
    layer = make()
    layer(x, training=True)
    deq = inner(layer)
    for training, low, high in ((True, 2, 2), (False, 3, 7)):  # beyond 2: the evaluation budget
        reset_statistics(deq)
        layer(x, training=training)
        assert low <= statistic(deq, "fwd_steps") <= high, (training, statistic(deq, "fwd_steps"))
    config = type(layer).from_config(layer.get_config()).get_config()
    restored = keras.saving.deserialize_keras_object(config["max_iter"])
    assert restored.get_config() == {"max_iter": 2, "eval_max_iter": 7, "min_iter": None}
