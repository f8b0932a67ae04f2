"""A DEQ under Keras' own `keras.distribution` on JAX, on two host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=2`, in a fresh process) against
one device: `DataParallel` and `ModelParallel` (the cell's kernels split by columns)
train to the same weights, and the variables are laid out as asked."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("JAX backend tests (KERAS_BACKEND=jax)", allow_module_level=True)

CHILD = pathlib.Path(__file__).with_name("distribution_child.py")


@pytest.fixture(scope="module")
def results():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(CHILD), "data", "model"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("mode", ["data", "model"])
def test_two_devices_train_to_the_weights_of_one(results, mode):
    single, sharded = results["single"], results[mode]
    np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=1e-5)
    for got, want in zip(sharded["weights"], single["weights"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sharded["prediction"], single["prediction"], rtol=1e-4, atol=1e-5)
    assert sharded["stats"]["converged"] == 1.0
    assert sharded["stats"]["fwd_steps"] == single["stats"]["fwd_steps"]


def test_data_parallel_replicates_and_model_parallel_splits_the_kernels(results):
    assert results["single"]["devices"] == 1
    assert results["data"]["devices"] == 2
    assert results["data"]["shardings"]["deq/cell/kernel"] == "P(None, None)"  # replicated
    model = results["model"]["shardings"]
    assert model["deq/cell/kernel"] == "P(None, 'model')"
    assert model["deq/cell/injection_kernel"] == "P(None, 'model')"
    assert model["deq/cell/bias"] == "P(None,)"
