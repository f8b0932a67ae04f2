"""`keras_deq.layers.multiscale`, the former one-file module, and the vision example."""

import importlib
import importlib.util
import pathlib

import pytest

from keras_deq.layers import multiscale

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "vision" / "multiscale.py"


def test_former_module_gathers_every_piece_under_its_old_path():
    """`from keras_deq.layers.multiscale import ...` still gives the very same objects."""
    homes = {
        "keras_deq.layers.multiscale_blocks": [
            "MeanGroupNormalization",
            "ScaledReLU",
            "fusion_weights",
        ],
        "keras_deq.layers.multiscale_cell": ["GROUP_NORM_EPSILON", "MultiscaleCell"],
        "keras_deq.layers.lipschitz_multiscale_cell": [
            "NORMALIZATIONS",
            "LipschitzMultiscaleCell",
        ],
        "keras_deq.layers.multiscale_deq": ["LipschitzMultiscale", "MultiscaleDEQ"],
    }
    names = [name for group in homes.values() for name in group]
    assert sorted(multiscale.__all__) == sorted(names)
    for module, group in homes.items():
        for name in group:
            assert getattr(multiscale, name) is getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------ the example
def load_example():
    spec = importlib.util.spec_from_file_location("vision_multiscale_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "model",
    [
        "lipschitz",
        pytest.param("mdeq", marks=pytest.mark.slow),
    ],
)
def test_vision_example_runs_on_digits(model, capsys):
    accuracy = load_example().main(
        ["--model", model, "--epochs", "1", "--limit", "256", "--channels", "4,8"]
    )
    out = capsys.readouterr().out
    for column in ("test acc", "fwd steps", "bwd steps", "epoch s"):
        assert column in out
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.slow
def test_vision_example_runs_on_mocked_cifar10(capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        accuracy = load_example().main(["--dataset", "cifar10", "--epochs", "1", "--limit", "10"])
    assert "(32, 32, 3)" in capsys.readouterr().out
    assert 0.0 <= accuracy <= 1.0
