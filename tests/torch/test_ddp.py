"""A keras_deq model under PyTorch's DistributedDataParallel (Keras' PyTorch backend:
a Keras model is a `torch.nn.Module`): two CPU processes, each with half of every
batch, train to the weights of one process with the whole batch (DDP averages the
gradients). Keras' `fit` does not drive DDP; the custom loop of Keras' guide does."""

import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":
    pytest.skip("PyTorch backend tests (KERAS_BACKEND=torch)", allow_module_level=True)

CHILD = pathlib.Path(__file__).with_name("ddp_child.py")


def test_two_processes_train_to_the_weights_of_one():
    proc = subprocess.run(
        [sys.executable, str(CHILD)], capture_output=True, text=True, timeout=600, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    ddp, single, initial = result["ddp"], result["single"], result["initial"]
    assert len(ddp) == len(single) == len(initial)
    moved = 0
    for got, want, start in zip(ddp, single, initial, strict=True):
        got, want, start = np.asarray(got), np.asarray(want), np.asarray(start)
        if not np.issubdtype(want.dtype, np.floating):
            continue  # a seed generator's state
        # Each process solves its half of the batch to the solver's tolerance (1e-4),
        # the single process the whole batch: the fixed points agree to that tolerance.
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
        moved += bool(np.max(np.abs(want - start)) > 1e-3)
    assert moved == 7  # trained: injection, cell (kernel, injection kernel, bias), head
