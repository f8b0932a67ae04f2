"""The driver that the two weight-norm benchmarks share, pcdeq_norms.py and mondeq_norms.py.

Both sweep the norm of a DEQ's recurrent weights over the digits test images, then train
a small classifier from its own and from large-norm starts. This module holds what is the
same in both: the command line (`parse_args`), the sweep's loop over norms and seeds
(`sweep`), the training loop and its table (`train`, `print_training`), and the order of
`main`. Each benchmark keeps its models, its sweep point, labels and tables.
"""

import argparse
import time
import types

import keras
import numpy as np
import tensorflow as tf
from progress import Progress
from vs_torchdeq import load_digits_split


def scaled(matrix, norm):
    """`matrix` scaled to spectral norm `norm` (float32)."""
    return (matrix * (norm / np.linalg.norm(matrix, 2))).astype("float32")


def parse_args(argv, description, quick_start, quick_help):
    """The shared command line; `--quick` runs norms 1 and 8, seed 0, the one training
    start `quick_start` and 1 epoch (on 256 images: see `load_data`)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--norms", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-starts", nargs="*", default=["init", "4", "8"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument(
        "--threads", type=int, default=1, help="TensorFlow threads (0: leave TensorFlow's)"
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    if args.quick:
        args.norms, args.seeds, args.train_starts, args.epochs = [1.0, 8.0], [0], [quick_start], 1
    return args


def load_data(args):
    """The digits split `(x_train, y_train, x_test, y_test)`; `--quick` trains on 256 images."""
    data = load_digits_split(0)
    if args.quick:
        data = (data[0][:256], data[1][:256], data[2], data[3])
    return data


def sweep(x_test, width, args, progress, point, label):
    """Rows of the weight-norm sweep, one per norm and seed: `point(norm, seed, rng,
    injection)` returns the row, its last item `{model: stats}`. `rng` is the point's
    generator after drawing `injection` (a Glorot-uniform `inputs x width` matrix);
    `label` names the norm in the progress lines."""
    rows = []
    for norm in args.norms:
        for seed in args.seeds:
            rng = np.random.default_rng([seed, 1])
            limit = np.sqrt(6.0 / (x_test.shape[1] + width))
            injection = rng.uniform(-limit, limit, (x_test.shape[1], width)).astype("float32")
            rows.append(point(norm, seed, rng, injection))
            progress.advance()
            progress.print(
                f"  {label} {norm:g}, seed {seed}: "
                + ", ".join(
                    f"{m} conv {s['conv']:.2f} steps {s['steps']:.0f}"
                    for m, s in rows[-1][-1].items()
                )
            )
    return rows


def train(data, args, progress, models, build_model, spectral_norm):
    """Rows of the training table, one per start, seed and model (of `models`);
    `build_model(model, start, seed, args)` returns `(net, layer)` and `spectral_norm(layer)`
    the norm of the layer's recurrent weights."""
    x_train, y_train, x_test, y_test = data
    rows = []
    for start in args.train_starts:
        for seed in args.seeds:
            for model in models:
                net, layer = build_model(model, start, seed, args)
                norm_start = spectral_norm(layer)
                began = time.perf_counter()
                history = net.fit(
                    x_train,
                    y_train,
                    batch_size=args.batch_size,
                    epochs=args.epochs,
                    shuffle=True,
                    verbose=0,
                ).history
                seconds = time.perf_counter() - began
                test = net.evaluate(x_test, y_test, verbose=0, return_dict=True)
                finite = all(np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in net.weights)
                rows.append(
                    {
                        "start": start,
                        "seed": seed,
                        "model": model,
                        "fwd": (history["deq_fwd_steps"][0], history["deq_fwd_steps"][-1]),
                        "bwd": (history["deq_bwd_steps"][0], history["deq_bwd_steps"][-1]),
                        "conv": history["deq_converged"][-1],
                        "test_conv": test["deq_converged"],
                        "acc": test["accuracy"],
                        "norm": (norm_start, spectral_norm(layer)),
                        "finite": finite,
                        "seconds": seconds,
                    }
                )
                progress.advance()
                r = rows[-1]
                progress.print(
                    f"  start {start}, seed {seed}, {model}: test acc {r['acc']:.3f}, "
                    f"conv {r['conv']:.2f}, ||W|| {r['norm'][0]:.2f} -> {r['norm'][1]:.2f} "
                    f"({seconds:.0f} s)"
                )
    return rows


def print_training(rows, start_label):
    """The training table; `start_label` heads the first column."""
    print(
        f"| {start_label} | seed | model | fwd steps (first → last epoch) | bwd steps | "
        "conv (last epoch) | test conv | test acc | ‖W‖₂ start → end | finite |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['start']} | {r['seed']} | {r['model']} | {r['fwd'][0]:.1f} → {r['fwd'][1]:.1f} | "
            f"{r['bwd'][0]:.1f} → {r['bwd'][1]:.1f} | {r['conv']:.2f} | {r['test_conv']:.2f} | "
            f"{r['acc']:.3f} | {r['norm'][0]:.2f} → {r['norm'][1]:.2f} | "
            f"{'yes' if r['finite'] else 'no'} |"
        )


def main(argv, bench):
    """Parses `argv`, runs the sweep and the trainings of a benchmark, prints their tables;
    returns `{"sweep": rows, "train": rows}`. `bench` is the benchmark module's `globals()`
    (the scripts run as modules that `sys.modules` may not hold), which provide:

    - `__doc__`, the command line's description; `QUICK_START`, the training start of
      `--quick`, and `QUICK_HELP`, its help;
    - `SETTINGS`, the model's settings, first in the line of settings printed first;
    - `sweep(x_test, args, progress)`, the sweep's rows (see `sweep`), and
      `print_sweep(rows)`, their tables;
    - `TRAIN_MODELS`, `build_model` and `spectral_norm`, see `train`; `START_LABEL`, the
      training table's first column.
    """
    bench = types.SimpleNamespace(**bench)
    args = parse_args(argv, bench.__doc__, bench.QUICK_START, bench.QUICK_HELP)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    data = load_data(args)
    print(
        f"{bench.SETTINGS}; norms {args.norms}; seeds {args.seeds}; max_iter {args.max_iter}, "
        f"tol {args.tol}; training from {args.train_starts}, {args.epochs} epochs, "
        f"{args.threads} thread(s)",
        flush=True,
    )
    began = time.perf_counter()
    units = len(args.norms) * len(args.seeds)
    units += len(args.train_starts) * len(args.seeds) * len(bench.TRAIN_MODELS)
    with Progress(units, unit_name="run") as progress:
        sweep_rows = bench.sweep(data[2], args, progress)
        train_rows = train(
            data, args, progress, bench.TRAIN_MODELS, bench.build_model, bench.spectral_norm
        )
    print()
    bench.print_sweep(sweep_rows)
    print()
    if train_rows:
        print_training(train_rows, bench.START_LABEL)
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    return {"sweep": sweep_rows, "train": train_rows}
