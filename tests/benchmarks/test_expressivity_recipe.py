"""benchmarks/expressivity_recipe.py: the structured DEQs stay nilpotent (and tied) while
training (its figure is drawn by docs/figures/render.py, checked by tests/test_figures.py)."""

import keras
import numpy as np
import pytest
from scripts import load_script

recipe = load_script("benchmarks/expressivity_recipe.py")


def nilpotent(w):
    return not np.any(np.linalg.matrix_power(w.astype("float64"), w.shape[0]))


@pytest.mark.parametrize("name", ["nilpotent", "block", "tied"])
def test_structured_deq_stays_nilpotent_and_solves_exactly(name):
    model = recipe.build_deq(name, seed=0)
    cell = model.get_layer("deq").cell
    kernel_mask, _ = recipe.structure(name)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    x = np.random.default_rng(0).uniform(size=(64, 1)).astype("float32")
    model.fit(x, np.sin(6 * x), batch_size=32, epochs=2, verbose=0)
    w = keras.ops.convert_to_numpy(cell.kernel)
    assert np.all(w[kernel_mask == 0] == 0) and nilpotent(w)
    if name == "tied":
        blocks = [w[2 * j - 2 : 2 * j, 2 * j : 2 * j + 2] for j in range(1, 5)]
        for block in blocks[1:]:
            np.testing.assert_allclose(block, blocks[0], rtol=1e-6)
        b = keras.ops.convert_to_numpy(cell.bias).reshape(5, 2)
        np.testing.assert_allclose(b, np.broadcast_to(b[0], b.shape), rtol=1e-6)
    # Plain iteration reaches the exact fixed point within width + 1 evaluations.
    model.evaluate(x, np.sin(6 * x), batch_size=64, verbose=0)
    stats = model.get_layer("deq").solver_statistics()
    assert stats["converged"] == 1.0 and stats["fwd_steps"] <= 11


def test_tied_levels_is_a_projection():
    tie = recipe.TiedLevels(5, 2)
    w = np.random.default_rng(1).normal(size=(10, 10)).astype("float32")
    once = keras.ops.convert_to_numpy(tie(w))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(tie(once)), once, rtol=1e-6)
    expected = np.mean([w[2 * j - 2 : 2 * j, 2 * j : 2 * j + 2] for j in range(1, 5)], axis=0)
    np.testing.assert_allclose(once[4:6, 6:8], expected, rtol=1e-5)


def test_curriculum_phases_cover_the_budget():
    assert recipe.phases(5, False, 3000) == [(5, 3000)]
    plan = recipe.phases(5, True, 3001)
    assert [k for k, _ in plan] == [1, 2, 3, 4, 5] and sum(s for _, s in plan) == 3001
