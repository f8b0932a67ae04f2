"""The solvers' docstring examples run on the active backend (they use keras.ops only)."""

import doctest
import importlib

import keras
import pytest

from tests.test_doctests import MODULES as ALL_MODULES

MODULES = [name for name in ALL_MODULES if name.startswith("keras_deq.solvers")]


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow",
    reason="tests/test_doctests.py runs these examples on TensorFlow",
)
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_on_this_backend(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
