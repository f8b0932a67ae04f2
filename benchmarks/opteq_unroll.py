"""Deep OptEq: unrolled vs implicit training on digits (the paper's Table 8 in miniature).

    python benchmarks/opteq_unroll.py                 # the table, dense units, ~3 min
    python benchmarks/opteq_unroll.py --kind conv     # the conv variant, ~10 min
    python benchmarks/opteq_unroll.py --must-show     # + prior vs no prior vs explicit, ~6 min
    python benchmarks/opteq_unroll.py --table-seeds 3 # the table per seed, then mean ± std

Table 8 of Xie et al. (TPAMI 2023) trains the same OptEq (alpha = 0.8, no
prior) by unrolling K = 5/10/20/40 fixed-point steps and by the implicit
function theorem (IFT, Broyden) with relative-residual thresholds 1e-3 and
1e-2, and reports accuracy, inference and back-propagation time, and the
relative residual `||z - T(z)|| / ||z||` of the returned state. Here every row
trains the model of `examples/vision/opteq_cifar10.py` on digits with the same
seed and budget; times are medians over `--repeats` of a compiled forward pass
and of the backward pass (a compiled forward+gradient step minus the forward)
on one batch of 125, the models timed in turn within each repeat, and are
reported as ratios to the K = 20 row of the same run.

`--must-show` then trains, for `--seeds` seeds and the same budget, the OptEq
without prior, the OptEq with `--prior` (by default decorrelation through the
SAM iteration, gamma = 0.05), and an explicit network of the same parameter
count, and prints their test accuracy.
"""

import argparse
import os
import pathlib
import re
import statistics
import sys
import time
import types

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "vision"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import data  # noqa: E402
from opteq_cifar10 import build_explicit_model, build_opteq_model, trainable_params  # noqa: E402
from progress import Progress  # noqa: E402

ROWS = (
    ("Unroll K=5", {"training_mode": "unrolled", "unroll_steps": 5}),
    ("Unroll K=10", {"training_mode": "unrolled", "unroll_steps": 10}),
    ("Unroll K=20", {"training_mode": "unrolled", "unroll_steps": 20}),
    ("Unroll K=40", {"training_mode": "unrolled", "unroll_steps": 40}),
    ("IFT thd 1e-3", {"training_mode": "implicit", "tol": 1e-3}),
    ("IFT thd 1e-2", {"training_mode": "implicit", "tol": 1e-2}),
)
BASELINE_ROW = "Unroll K=20"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", default="dense", choices=("dense", "conv"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument(
        "--kernel-gain",
        type=float,
        default=None,
        help="start every W_l orthogonal with this gain (default: the block's small start)",
    )
    parser.add_argument("--solver", default="broyden", help="IFT forward/backward solver")
    parser.add_argument("--max-iter", type=int, default=50, help="IFT solver iterations")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15, help="timing: median over these")
    parser.add_argument("--calls", type=int, default=5, help="timing: calls per measurement")
    parser.add_argument("--timing-batch", type=int, default=125)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--table-seeds",
        type=int,
        default=1,
        help="the table for seeds --seed .. --seed + N - 1, then mean ± std over them",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="LOG",
        help="no training: the table over seeds from the per-seed tables in these outputs",
    )
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--must-show", action="store_true")
    parser.add_argument("--seeds", type=int, default=5, help="must-show: seeds per model")
    parser.add_argument("--prior", default="decorrelation")
    parser.add_argument("--prior-mode", default="sam")
    parser.add_argument("--prior-strength", type=float, default=0.05)
    return parser.parse_args(argv)


def fit(model, split, args, seed, progress):
    x_train, y_train, x_test, y_test = split
    keras.utils.set_random_seed(seed)
    model.compile(
        keras.optimizers.Adam(args.learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=0,
        callbacks=[progress.callback()],
    )
    seconds = time.perf_counter() - start
    return model.evaluate(x_test, y_test, batch_size=256, verbose=0)[1], seconds


def _seconds(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        tf.nest.map_structure(lambda t: t.numpy(), fn())
    return (time.perf_counter() - start) / calls


def compiled_passes(model, x, y):
    """Compiled `(forward, forward + gradient)` functions of a model on one batch."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(autograph=False)
    def forward():
        return model(x, training=False)

    @tf.function(autograph=False)
    def forward_backward():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    forward(), forward_backward()  # trace and warm up
    return forward, forward_backward


def time_passes(passes, repeats, calls):
    """Median seconds of each model's forward pass and of its backward pass alone.

    The models are timed in turn within each repeat, so that load from other
    processes falls on all of them alike; the backward time is the median of
    (forward + gradient) minus the median forward time.
    """
    fwd = {name: [] for name in passes}
    both = {name: [] for name in passes}
    for _ in range(repeats):
        for name, (forward, forward_backward) in passes.items():
            fwd[name].append(_seconds(forward, calls))
            both[name].append(_seconds(forward_backward, calls))
    return {
        name: (
            statistics.median(fwd[name]),
            max(statistics.median(both[name]) - statistics.median(fwd[name]), 0.0),
        )
        for name in passes
    }


def relative_residual(model, x):
    """Mean over samples of `||z - T(z)|| / ||z||` at the block's output."""
    block = model.get_layer("opteq")
    features = keras.Model(model.inputs, block.input)

    @tf.function(autograph=False)
    def residuals(v):
        return block.relative_residual(features(v))

    return float(tf.reduce_mean(residuals(x)).numpy())


def build(args, seed, **options):
    keras.utils.set_random_seed(seed)
    options = {
        "alpha": args.alpha,
        "solver": args.solver,
        "max_iter": args.max_iter,
        "deq_options": {"on_failure": "ignore"},
        **options,
    }
    if args.kernel_gain is not None:
        options["kernel_initializer"] = keras.initializers.Orthogonal(gain=args.kernel_gain)
    return build_opteq_model("digits", args.kind, **options)


def unroll_table(args, split, progress, seed):
    _, _, x_test, y_test = split
    x_time = tf.constant(x_test[: args.timing_batch])
    y_time = tf.constant(y_test[: args.timing_batch])
    trained, passes = [], {}
    for name, options in ROWS:
        model = build(args, seed, **options)
        accuracy, train_seconds = fit(model, split, args, seed, progress)
        residual = relative_residual(model, tf.constant(x_test))
        trained.append((name, accuracy, residual, train_seconds))
        passes[name] = compiled_passes(model, x_time, y_time)
        progress.print(f"  trained {name}: accuracy {accuracy:.4f} in {train_seconds:.0f} s")
    times = time_passes(passes, args.repeats, args.calls)
    base_fwd, base_bwd = times[BASELINE_ROW]
    progress.print()
    progress.print(f"seed {seed}:")
    progress.print(
        "| Method | Acc. | Inference (ms) | x K=20 | Back-prop (ms) | x K=20 | Rel. residual "
        "| Train time (s) |"
    )
    progress.print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name, accuracy, residual, seconds in trained:
        fwd, bwd = times[name]
        rows.append((name, accuracy, fwd / base_fwd, bwd / base_bwd, residual, seconds))
        progress.print(
            f"| {name} | {100 * accuracy:.2f}% | {1e3 * fwd:.2f} | {fwd / base_fwd:.2f} "
            f"| {1e3 * bwd:.2f} | {bwd / base_bwd:.2f} | {residual:.2e} | {seconds:.0f} |"
        )
    return rows


def seeds_table(tables, progress):
    """Table 8 over seeds: accuracy mean ± std, medians of the time ratios and residuals."""
    progress.print()
    progress.print(f"over {len(tables)} seeds:")
    progress.print(
        "| Method | Acc. (mean ± std) | Acc. per seed | Inference x K=20 | Back-prop x K=20 "
        "| Rel. residual |"
    )
    progress.print("|---|---|---|---|---|---|")
    summary = []
    for i, (name, *_) in enumerate(tables[0]):
        accuracy, fwd, bwd, residual = (
            [table[i][column] for table in tables] for column in (1, 2, 3, 4)
        )
        summary.append((name, accuracy, fwd, bwd, residual))
        per_seed = ", ".join(f"{100 * a:.2f}" for a in accuracy)
        progress.print(
            f"| {name} | {100 * np.mean(accuracy):.2f} ± {100 * np.std(accuracy, ddof=1):.2f}% "
            f"| {per_seed} | {statistics.median(fwd):.2f} | {statistics.median(bwd):.2f} "
            f"| {statistics.median(residual):.2e} |"
        )
    return summary


def merge(paths):
    """The per-seed tables printed in saved outputs, `{seed: rows}` (as `unroll_table`'s)."""
    names = "|".join(re.escape(name) for name, _ in ROWS)
    row = re.compile(
        rf"^\| ({names}) \| ([\d.]+)% \| [\d.]+ \| ([\d.]+) \| [\d.]+ \| ([\d.]+) \| (\S+) \| (\d+) \|$"
    )
    tables = {}
    for path in paths:
        seed = None
        for line in pathlib.Path(path).read_text().splitlines():
            if match := re.match(r"^seed (\d+):$", line.strip()):
                seed = int(match[1])
                tables[seed] = []
            elif (match := row.match(line.strip())) and seed is not None:
                name, acc, fwd, bwd, residual, seconds = match.groups()
                tables[seed].append(
                    (name, float(acc) / 100, float(fwd), float(bwd), float(residual), int(seconds))
                )
    return {seed: rows for seed, rows in sorted(tables.items()) if len(rows) == len(ROWS)}


def must_show(args, split, progress):
    prior = {
        "prior": args.prior,
        "prior_mode": args.prior_mode,
        "prior_strength": args.prior_strength,
    }
    configs = (
        ("OptEq, no prior", lambda seed: build(args, seed)),
        (f"OptEq + {args.prior} ({args.prior_mode})", lambda seed: build(args, seed, **prior)),
        ("Explicit, same size", lambda seed: _explicit(args, seed)),
    )
    progress.print()
    progress.print(f"| Model | Params | Test accuracy over {args.seeds} seeds | Mean ± std |")
    progress.print("|---|---|---|---|")
    results = {}
    for name, make in configs:
        accuracies = []
        for seed in range(args.seeds):
            model = make(seed)
            accuracies.append(fit(model, split, args, seed, progress)[0])
        results[name] = accuracies
        per_seed = ", ".join(f"{100 * a:.2f}" for a in accuracies)
        progress.print(
            f"| {name} | {trainable_params(model):,} | {per_seed} "
            f"| {100 * np.mean(accuracies):.2f} ± {100 * np.std(accuracies):.2f}% |"
        )
    return results


def _explicit(args, seed):
    keras.utils.set_random_seed(seed)
    target = trainable_params(build_opteq_model("digits", args.kind))
    return build_explicit_model("digits", args.kind, target_params=target)


def set_threads(threads):
    """TensorFlow's intra- and inter-op threads (0: leave them)."""
    if not threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already started (e.g. under pytest): keep its threads
        print("note: TensorFlow was already initialized; --threads is ignored")


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        tables = merge(args.merge)
        print(f"merged from {', '.join(args.merge)}: seeds {sorted(tables)}")
        return {
            "seeds_table": seeds_table(list(tables.values()), types.SimpleNamespace(print=print))
        }
    set_threads(args.threads)
    split = data.load("digits", seed=0)
    print(
        f"digits: {len(split[0])} train / {len(split[2])} test, kind={args.kind}, "
        f"alpha={args.alpha}, epochs={args.epochs}, threads={args.threads}, "
        f"IFT solver={args.solver}, kernel gain={args.kernel_gain or 'default'}"
    )
    # The bar counts training batches: `ROWS` models, then 3 models x `--seeds`.
    trainings = (0 if args.skip_table else len(ROWS) * args.table_seeds) + (
        3 * args.seeds if args.must_show else 0
    )
    batches = -(-len(split[0]) // args.batch_size) * args.epochs
    results = {}
    with Progress(trainings * batches, unit_name="step") as progress:
        if not args.skip_table:
            seeds = range(args.seed, args.seed + args.table_seeds)
            tables = [unroll_table(args, split, progress, seed) for seed in seeds]
            results["table"] = tables[0]
            if args.table_seeds > 1:
                results["tables"] = tables
                results["seeds_table"] = seeds_table(tables, progress)
        if args.must_show:
            results["must_show"] = must_show(args, split, progress)
    return results


if __name__ == "__main__":
    main()
