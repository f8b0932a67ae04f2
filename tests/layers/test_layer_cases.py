"""`run_layer_test` on every layer of the shared table `CASES` (tests/layer_cases.py)."""

import keras
import pytest
from layer_cases import CASES, LAYERS, run_layer_test


def _params(name):
    case = CASES[name]
    marks = []
    if case.jax_bug and keras.backend.backend() == "jax":
        marks.append(pytest.mark.xfail(strict=True, reason=case.jax_bug))
    yield pytest.param(name, None, id=name, marks=marks)
    if case.slow_export:  # the rest again, with the export that the default run leaves out
        slow = [pytest.mark.slow, pytest.mark.tensorflow_only("SavedModel export")]
        yield pytest.param(name, True, id=f"{name}-export", marks=slow)


@pytest.mark.parametrize(("name", "export"), [p for name in LAYERS for p in _params(name)])
def test_layer(name, export, tmp_path):
    run_layer_test(name, tmp_path, export=export)
