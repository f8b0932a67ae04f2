"""Saves or loads every layer case's `.keras` file on the current backend (not a test).

`python cross_backend_files.py save DIR`: for each layer case that is not a cell, a small
model, its `.keras` file and its inference output on the case's data, under DIR named after
the backend. `python cross_backend_files.py load DIR`: loads every file the other backends
saved there and writes the largest difference from the saving backend's output, per layer,
to `DIR/loaded_on_<backend>.json`. Run by `tests/backends/test_cross_backend.py`.
"""

import json
import pathlib
import sys
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

import keras  # noqa: E402
import layer_cases  # noqa: E402
import numpy as np  # noqa: E402

import keras_deq  # noqa: E402, F401 - registers the classes

BACKENDS = ("tensorflow", "jax", "torch")
# The public layers and models (their cells are inside them).
LAYERS = [name for name in layer_cases.LAYERS if layer_cases.CASES[name].kind != "cell"]


def save(directory):
    backend = keras.backend.backend()
    for name in LAYERS:
        model, _, data = layer_cases.build_model(name)
        outputs = layer_cases.predict(model, data)
        model.save(directory / f"{name}.{backend}.keras")
        inputs = data if isinstance(data, list) else [data]
        flat = np.concatenate([np.ravel(o) for o in outputs])
        np.savez(directory / f"{name}.{backend}.npz", *inputs, outputs=flat)


def load(directory):
    backend = keras.backend.backend()
    found = {}
    for source in BACKENDS:
        if source == backend:
            continue
        for name in LAYERS:
            arrays = np.load(directory / f"{name}.{source}.npz")
            inputs = [arrays[f"arr_{i}"] for i in range(len(arrays.files) - 1)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = keras.saving.load_model(directory / f"{name}.{source}.keras")
            outputs = layer_cases.predict(model, inputs if len(inputs) > 1 else inputs[0])
            got = np.concatenate([np.ravel(o) for o in outputs])
            found[f"{source}/{name}"] = float(np.max(np.abs(got - arrays["outputs"])))
    (directory / f"loaded_on_{backend}.json").write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    {"save": save, "load": load}[sys.argv[1]](pathlib.Path(sys.argv[2]))
