"""A `.keras` file saved on one Keras backend loads on the others, with the same output.

Every layer case (`tests/layer_cases.py`) is saved on TensorFlow, JAX and PyTorch, each in
its own process, and loaded on the two others; run from the TensorFlow suite (the
processes choose their own backend).
"""

import json
import os
import pathlib
import subprocess
import sys

import cross_backend_files
import pytest

SCRIPT = pathlib.Path(__file__).with_name("cross_backend_files.py")
BACKENDS = ("tensorflow", "jax", "torch")


def _run(backend, action, directory):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), action, str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, f"{action} on {backend}:\n{out.stderr[-3000:]}"


@pytest.mark.slow  # ~3.5 min on 2 cores: CI's three backends take ~36 min without it
@pytest.mark.tensorflow_only("starts one process per backend itself")
def test_every_layer_file_loads_on_every_other_backend_with_the_same_output(tmp_path):
    for backend in BACKENDS:
        _run(backend, "save", tmp_path)
    for backend in BACKENDS:
        _run(backend, "load", tmp_path)
    differences = {}
    for backend in BACKENDS:
        loaded = json.loads((tmp_path / f"loaded_on_{backend}.json").read_text())
        differences.update({f"{key}->{backend}": value for key, value in loaded.items()})
    # Each of the 3 backends loads the 2 others' files of every layer.
    assert len(differences) == 6 * len(cross_backend_files.LAYERS)
    worst = {k: v for k, v in differences.items() if not v <= 1e-4}
    assert not worst, worst
