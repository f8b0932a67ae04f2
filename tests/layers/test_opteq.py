"""`keras_deq.layers.opteq`, the former one-file module, and the paper's CIFAR-10 example."""

import importlib
import importlib.util
import pathlib

import pytest

from keras_deq.layers import opteq

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_former_module_gathers_every_piece_under_its_old_path():
    """`from keras_deq.layers import opteq` still gives every name, the very same objects."""
    homes = {
        "keras_deq.features": ["soft_threshold", "incay", "incay_gradient", "decorrelation"],
        "keras_deq.regularizers": ["DecorrelationRegularizer", "HSICRegularizer"],
        "keras_deq.layers.opteq_priors": ["PRIORS", "FeaturePrior"],
        "keras_deq.layers.opteq_sam": ["check_sam_schedule", "sam_iteration"],
        "keras_deq.layers.opteq_units": ["OptEqDenseUnit", "OptEqConvUnit"],
        "keras_deq.layers.opteq_cell": ["KINDS", "OptEqCell"],
        "keras_deq.layers.opteq_block": ["PRIOR_MODES", "TRAINING_MODES", "OptEqBlock"],
    }
    homes["keras_deq.features"] += ["decorrelation_gradient", "hsic", "hsic_gradient"]
    homes["keras_deq.regularizers"] += ["FEATURE_REGULARIZERS", "feature_regularizer"]
    homes["keras_deq.layers.opteq_units"] += ["DEFAULT_SPATIAL_SHAPE"]
    names = [name for group in homes.values() for name in group]
    assert sorted(opteq.__all__) == sorted(names)
    for module, group in homes.items():
        for name in group:
            assert getattr(opteq, name) is getattr(importlib.import_module(module), name), name


# ------------------------------------------------------------------ the CIFAR-10 example
def load_example():
    path = ROOT / "examples" / "vision" / "opteq_cifar10.py"
    spec = importlib.util.spec_from_file_location("opteq_cifar10_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_cifar10_model_has_199k_parameters():
    example = load_example()
    model = example.build_opteq_model("cifar10")
    block = model.get_layer("opteq")
    # Five 3x3 units n_l = 16/32/64/128/128 on a 30-channel state and input:
    # sum_l n_l (9*30 [W_l] + 9*30 [U_l] + 1 [b_l]) = 368 * 541 trainable parameters
    # (the block's DEQ adds a few non-trainable scalars, its regularizer's controls).
    assert example.trainable_params(block) == 199_088
    assert example.trainable_params(model) == 199_088 + (27 * 30 + 30) + (30 * 10 + 10)
    assert abs(example.trainable_params(model) - 199_000) / 199_000 < 0.01


def test_explicit_baseline_matches_the_parameter_count():
    example = load_example()
    for dataset in ("digits", "cifar10"):
        opteq_params = example.trainable_params(example.build_opteq_model(dataset))
        explicit = example.build_explicit_model(dataset, target_params=opteq_params)
        assert abs(explicit.count_params() - opteq_params) / opteq_params < 0.03


@pytest.mark.slow
def test_example_trains_on_digits_and_prints_the_accuracy(capsys):
    accuracy = load_example().main(
        ["--kind", "dense", "--epochs", "1", "--limit", "200", "--prior", "l1", "--verbose", "0"]
    )
    out = capsys.readouterr().out
    assert "parameters: 66730" in out and "test accuracy:" in out
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.slow
def test_example_conv_digits_default_reaches_90_percent():
    assert load_example().main(["--verbose", "0"]) >= 0.90


@pytest.mark.slow
def test_unroll_benchmark_runs_end_to_end():
    path = ROOT / "benchmarks" / "opteq_unroll.py"
    spec = importlib.util.spec_from_file_location("opteq_unroll_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(
        ["--epochs", "1", "--repeats", "1", "--calls", "1", "--must-show", "--seeds", "1"]
    )
    assert len(results["table"]) == 6 and len(results["must_show"]) == 3
