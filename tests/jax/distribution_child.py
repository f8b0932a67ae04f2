"""Trains one DEQ classifier three ways on two host devices and prints the results as
JSON: on one device, under `keras.distribution.DataParallel` (the batch split over
the two) and under `ModelParallel` (the cell's kernels split by columns). Run by
tests/jax/test_distribution.py in a fresh process: the device count is fixed when
JAX starts."""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_deq  # noqa: E402


def distribution(mode):
    devices = jax.devices()
    if mode == "data":
        return keras.distribution.DataParallel(devices=devices)
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*deq/cell/.*kernel"] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def train(mode, x, y):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, name="injection"),
            keras_deq.DEQ(keras_deq.DenseCell(32, name="cell"), max_iter=30, name="deq"),
            keras.layers.Dense(4),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    deq = model.get_layer("deq")
    return {
        "loss": history.history["loss"],
        "weights": [np.asarray(w).tolist() for w in model.get_weights()],
        "shardings": {
            v.path.split("/", 1)[1]: str(getattr(v.value.sharding, "spec", "one device"))
            for v in deq.weights
        },
        "devices": len(deq.cell.weights[0].value.sharding.device_set),
        "stats": deq.solver_statistics(),
        "prediction": np.asarray(model.predict(x[:8], verbose=0)).tolist(),
    }


def main():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype("float32")
    y = rng.integers(0, 4, size=(64,))
    results = {"single": train("single", x, y)}
    for mode in sys.argv[1:]:
        keras.distribution.set_distribution(distribution(mode))
        results[mode] = train(mode, x, y)
        keras.distribution.set_distribution(None)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
