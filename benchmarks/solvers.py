"""Forward solvers on a trained DEQ's map: iterations and time to a tolerance.

    python benchmarks/solvers.py [--epochs 15] [--threads 1] [--repeats 5]

Trains the digits demo model (examples/digits.py), then solves the trained cell's
fixed point on the test set with each solver and prints, per solver and
tolerance: the iterations run, the fraction of samples converged, the mean and
worst relative residual, and the median solve time (a compiled tf.function)
relative to fixed-point iteration measured in the same run.
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_deq  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from digits import build_model, load_digits_split  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-iter", type=int, default=100)
    args = parser.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    keras.utils.set_random_seed(0)
    x_train, y_train, x_test, _ = load_digits_split()
    model = build_model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=0)
    deq = model.get_layer("deq")
    x = model.get_layer("injection")(tf.constant(x_test))

    def cell(z):
        return deq.cell(z, x)

    configs = [
        ("fixed_point", {}),
        ("anderson", {}),
        ("anderson", {"window": 3}),
        ("anderson", {"window": 8}),
        ("broyden", {}),
        ("broyden", {"memory": 60}),
    ]
    print(
        f"trained digits DEQ, test batch {x.shape[0]}, cell width {x.shape[1]}, threads {args.threads}"
    )
    print(
        f"{'solver':<22} {'tol':>7} {'steps':>6} {'conv':>6} {'mean rel':>9} {'max rel':>9} {'time x':>7}"
    )
    base_time = {}
    for tol in (1e-4, 1e-6):
        for name, options in configs:
            solver = keras_deq.solvers.get(name)
            run = tf.function(
                lambda s=solver, o=options, t=tol: s(
                    cell, tf.zeros_like(x), max_iter=args.max_iter, tol=t, **o
                )
            )
            result = run()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = run()
                float(result.rel_residual[0])
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            base_time.setdefault(tol, median)
            label = name + (
                "" if not options else "(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")"
            )
            print(
                f"{label:<22} {tol:7.0e} {int(result.steps):6d} "
                f"{float(tf.reduce_mean(tf.cast(result.converged, tf.float32))):6.3f} "
                f"{float(tf.reduce_mean(result.rel_residual)):9.2e} {float(tf.reduce_max(result.rel_residual)):9.2e} "
                f"{median / base_time[tol]:7.2f}"
            )


if __name__ == "__main__":
    main()
