"""`--backend NAME` of the examples (examples/backend_flag.py): read before Keras loads, it
wins over `KERAS_BACKEND`; the digits example trains offline on JAX and PyTorch with it."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
import backend_flag  # noqa: E402


def test_the_flag_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    assert backend_flag.requested(["--epochs", "2", "--backend", "jax"]) == "jax"
    assert backend_flag.requested(["--backend=torch"]) == "torch"
    assert backend_flag.requested(["--epochs", "2"]) is None
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert backend_flag.apply(["--backend", "jax"]) == "jax"
    assert os.environ["KERAS_BACKEND"] == "jax"
    assert backend_flag.apply([]) == "jax"  # then the environment's
    with pytest.raises(SystemExit, match="--backend must be one of"):
        backend_flag.apply(["--backend", "numpy"])


@pytest.mark.parametrize(
    # JAX's run (22 s on 2 cores) with the slow tests; the JAX suite runs the example's code.
    "backend",
    [pytest.param("jax", marks=pytest.mark.slow), "torch"],
)
def test_digits_example_trains_on_the_backend_it_is_given(backend):
    code = (
        "import runpy, sys; "
        f"sys.argv = ['digits.py', '--backend', '{backend}', '--epochs', '1', '--width', '16']; "
        f"runpy.run_path({str(EXAMPLES / 'digits.py')!r}, run_name='__main__'); "
        "import keras; print('backend:', keras.backend.backend())"
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"backend: {backend}" in proc.stdout
    assert "test accuracy:" in proc.stdout
