"""The examples in the docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
    "keras_deq.solvers",
    "keras_deq.solvers.base",
    "keras_deq.solvers.fixed_point",
    "keras_deq.solvers.anderson",
    "keras_deq.solvers.broyden",
    "keras_deq.solvers.gmres",
    "keras_deq.solvers.sam",
    "keras_deq.solvers.registry",
    "keras_deq.backward.base",
    "keras_deq.backward.implicit",
    "keras_deq.backward.phantom",
    "keras_deq.backward.one_step",
    "keras_deq.backward.unrolled",
    "keras_deq.backward.explicit",
    "keras_deq.correction",
    "keras_deq.jacobian",
    "keras_deq.callbacks.jacobian_regularization_scheduler",
    "keras_deq.linalg",
    "keras_deq.features",
    "keras_deq.regularizers",
    "keras_deq.layers.multiscale_blocks",
    "keras_deq.layers.opteq_priors",
    "keras_deq.layers.opteq_sam",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
