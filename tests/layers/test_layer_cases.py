"""`run_layer_test` on every layer of the shared table `CASES` (tests/layer_cases.py)."""

import keras
import pytest
from layer_cases import CASES, LAYERS, run_layer_test

ON_JAX = keras.backend.backend() == "jax"


def _params(name):
    case = CASES[name]
    bugs = case.jax_bugs if ON_JAX else {}
    yield pytest.param(name, {part: False for part in bugs}, id=name)
    for part, reason in bugs.items():  # the part alone, known to fail
        only = {"training": False, "keras_file": False, part: True}
        yield pytest.param(
            name, only, id=f"{name}-{part}", marks=pytest.mark.xfail(strict=True, reason=reason)
        )
    if case.slow_export:  # the whole test again, with the export the default run leaves out
        slow = [pytest.mark.slow, pytest.mark.tensorflow_only("SavedModel export")]
        yield pytest.param(name, {"export": True}, id=f"{name}-export", marks=slow)


@pytest.mark.parametrize(("name", "flags"), [p for name in LAYERS for p in _params(name)])
def test_layer(name, flags, tmp_path):
    run_layer_test(name, tmp_path, **flags)
