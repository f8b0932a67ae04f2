"""Plain MDEQ against the Lipschitz multiscale DEQ on digits, with the same budget.

    python benchmarks/lipschitz_speedup.py [--epochs 15] [--seeds 0 1 2] [--threads 1]
    python benchmarks/lipschitz_speedup.py --quick   # seconds: a smoke run

Builds the model of examples/vision/multiscale.py twice, once with
`MultiscaleDEQ` and once with `LipschitzMultiscale` (same stem, channels, head,
solver, tolerance and iteration caps), and trains both on scikit-learn's digits
with the same data order. The two models' train steps are interleaved batch by
batch (alternating which goes first), so that both see the same machine load
and the time ratio is measured in one run. Prints one row per model:

- fwd / bwd steps: mean forward / backward solver iterations per train step.
- converged: fraction of training samples whose forward solve met `tol`.
- step ms: median wall time of a train step (`train_on_batch`, after the first
  epoch, which includes tracing); for the Lipschitz model it includes the
  weight constraints applied after each optimizer step (also timed alone).
- train s: total wall time of all train steps, tracing included.
- test fwd: mean forward steps on the test set; infer ms: median time to
  predict one batch of 64 test images.
- test acc and the cell's Lipschitz bound (`inf` for plain MDEQ).

The speed-ups are the MDEQ / Lipschitz ratios of the medians. With several
`--seeds` (each its own digits split, initialization and batch order) a last
table gives each seed's ratios and accuracy difference, and their medians. `--json PATH` also
evaluates both models on the test set after every epoch (outside the timed steps) and
writes the per-epoch statistics and the table's rows to PATH (docs/figures uses it).
"""

import argparse
import json
import math
import os
import pathlib
import re
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "vision"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import data  # noqa: E402
from multiscale import build_model, parse_channels  # noqa: E402
from progress import Progress  # noqa: E402

MODELS = ("mdeq", "lipschitz")


def build(name, args):
    keras.utils.set_random_seed(args.seed)  # same stem and head initialization
    model = build_model(
        (8, 8, 1),
        10,
        model=name,
        channels=args.channels,
        solver=args.solver,
        max_iter=args.max_iter,
        backward_max_iter=args.backward_max_iter,
        tol=args.tol,
        jacobian_weight=args.mdeq_jacobian_weight if name == "mdeq" else 0.0,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def batches(n, batch_size, rng):
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def train(models, x, y, args, progress, on_epoch_end=None):
    """Interleaved training; returns per-model lists of step records. Calls
    `on_epoch_end(epoch, records)` after each epoch if given."""
    rng = np.random.default_rng(args.seed)
    records = {name: [] for name in models}
    for epoch in range(args.epochs):
        for k, index in enumerate(batches(len(x), args.batch_size, rng)):
            names = list(models) if k % 2 == 0 else list(models)[::-1]
            for name in names:
                start = time.perf_counter()
                logs = models[name].train_on_batch(x[index], y[index], return_dict=True)
                seconds = time.perf_counter() - start
                records[name].append(
                    {"epoch": epoch, "seconds": seconds, "size": len(index), **logs}
                )
            progress.advance()
        progress.print(
            f"epoch {epoch + 1}/{args.epochs}: "
            + ", ".join(f"{name} loss {records[name][-1]['loss']:.3f}" for name in models),
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, records)
    return records


def inference_batches(x, args):
    return range(0, len(x) - args.batch_size + 1, args.batch_size)


def inference_times(models, x, args, progress):
    """Median seconds to predict one batch, interleaved across models."""
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for i in inference_batches(x, args):
            for name, model in models.items():
                start = time.perf_counter()
                model.predict_on_batch(x[i : i + args.batch_size])
                times[name].append(time.perf_counter() - start)
            progress.advance()
    return {name: statistics.median(t[len(t) // 10 :]) for name, t in times.items()}


def constraint_time(model, repeats=20):
    """Median seconds to apply the Lipschitz cell's weight constraints (compiled)."""
    apply = tf.function(model.get_layer("deq").cell.apply_constraints, autograph=False)
    apply()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        apply()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def weighted_mean(records, key):
    return sum(r[key] * r["size"] for r in records) / sum(r["size"] for r in records)


def summarize(models, records, x_test, y_test, args, progress):
    rows = {}
    infer = inference_times(models, x_test, args, progress)
    for name, model in models.items():
        steps = records[name]
        timed = [r["seconds"] for r in steps if r["epoch"] > 0] or [r["seconds"] for r in steps]
        test = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
        rows[name] = {
            "fwd": weighted_mean(steps, "deq_fwd_steps"),
            "bwd": weighted_mean(steps, "deq_bwd_steps"),
            "converged": weighted_mean(steps, "deq_converged"),
            "step_ms": 1000 * statistics.median(timed),
            "train_s": sum(r["seconds"] for r in steps),
            "test_fwd": test["deq_fwd_steps"],
            "infer_ms": 1000 * infer[name],
            "acc": test["accuracy"],
            "bound": float(model.get_layer("deq").cell.lipschitz_bound()),
        }
    return rows


def print_table(rows):
    header = (
        f"| {'model':<9} | {'fwd steps':>9} | {'bwd steps':>9} | {'converged':>9} | "
        f"{'step ms':>7} | {'train s':>7} | {'test fwd':>8} | {'infer ms':>8} | "
        f"{'test acc':>8} | {'bound':>5} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, r in rows.items():
        print(
            f"| {name:<9} | {r['fwd']:9.2f} | {r['bwd']:9.2f} | {r['converged']:9.3f} | "
            f"{r['step_ms']:7.1f} | {r['train_s']:7.1f} | {r['test_fwd']:8.2f} | "
            f"{r['infer_ms']:8.2f} | {r['acc']:8.4f} | {r['bound']:5.3g} |"
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="0: leave TensorFlow's")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--channels", type=parse_channels, default=(8, 16))
    parser.add_argument("--solver", default="anderson")
    parser.add_argument("--max-iter", type=int, default=18)
    parser.add_argument("--backward-max-iter", type=int, default=20)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--mdeq-jacobian-weight",
        type=float,
        default=0.0,
        help="Jacobian regularization of the plain MDEQ (the paper's baseline uses it)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="passes over the test set")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="one run per seed (split, initialization and batch order); medians over them",
    )
    parser.add_argument("--json", help="also write per-epoch statistics and the rows here")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 repeat: a smoke run")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="LOG",
        help="no training: the seed table from the seed rows printed in these outputs",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats = 1, 1
    return args


def run(args, seed):
    """Trains and times both models with one seed; returns the run's record."""
    args.seed = seed
    x_train, y_train, x_test, y_test = data.load("digits", seed)
    models = {name: build(name, args) for name in MODELS}
    print(
        f"seed {seed}, digits: {len(x_train)} train / {len(x_test)} test; channels "
        f"{args.channels}; {args.solver} max_iter {args.max_iter} / backward "
        f"{args.backward_max_iter}, tol {args.tol}; {args.epochs} epochs, batch "
        f"{args.batch_size}, {args.threads} thread(s)",
        flush=True,
    )
    per_epoch = {name: [] for name in models}

    def evaluate_epoch(epoch, records):
        for name, model in models.items():
            steps = [r for r in records[name] if r["epoch"] == epoch]
            test = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
            per_epoch[name].append(
                {
                    "fwd_steps": weighted_mean(steps, "deq_fwd_steps"),
                    "bwd_steps": weighted_mean(steps, "deq_bwd_steps"),
                    "converged": weighted_mean(steps, "deq_converged"),
                    "loss": weighted_mean(steps, "loss"),
                    "train_accuracy": weighted_mean(steps, "accuracy"),
                    "test_accuracy": test["accuracy"],
                    "test_fwd_steps": test["deq_fwd_steps"],
                }
            )

    # Batch steps (each model in turn): the training's, then the inference timing's.
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    steps += args.repeats * len(inference_batches(x_test, args))
    with Progress(steps, unit_name="step") as progress:
        records = train(
            models, x_train, y_train, args, progress, evaluate_epoch if args.json else None
        )
        rows = summarize(models, records, x_test, y_test, args, progress)
    print()
    print_table(rows)
    ratios = speedups(rows)
    print()
    print(
        "speed-up (MDEQ / Lipschitz): "
        f"train step {ratios['step']:.2f}x, total train time {ratios['train']:.2f}x, "
        f"inference {ratios['infer']:.2f}x, forward steps {ratios['fwd']:.2f}x, "
        f"backward steps {ratios['bwd']:.2f}x"
    )
    constraints_ms = 1000 * constraint_time(models["lipschitz"])
    print(
        f"Lipschitz weight constraints alone: {constraints_ms:.1f} ms per step (median), "
        f"{constraints_ms / rows['lipschitz']['step_ms']:.0%} of its train step",
        flush=True,
    )
    return {
        "seed": seed,
        "rows": rows,
        "ratios": ratios,
        "epochs": per_epoch,
        "constraints_ms": constraints_ms,
    }


def speedups(rows):
    """MDEQ / Lipschitz ratios, and the accuracy difference (Lipschitz - MDEQ)."""
    mdeq, lipschitz = rows["mdeq"], rows["lipschitz"]
    ratios = {
        key: mdeq[column] / lipschitz[column]
        for key, column in (
            ("step", "step_ms"),
            ("train", "train_s"),
            ("infer", "infer_ms"),
            ("fwd", "fwd"),
            ("bwd", "bwd"),
        )
    }
    ratios["acc"] = lipschitz["acc"] - mdeq["acc"]
    return ratios


def print_seed_table(runs):
    """One row per seed and the medians."""
    print()
    print(
        "| seed | train step | inference | fwd steps | bwd steps | acc MDEQ | acc Lipschitz "
        "| acc diff (points) | Lipschitz step ms | constraints ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")

    def line(label, r, rows, constraints):
        print(
            f"| {label} | {r['step']:.2f}x | {r['infer']:.2f}x | {r['fwd']:.2f}x | "
            f"{r['bwd']:.2f}x | {100 * rows['mdeq']['acc']:.2f}% | "
            f"{100 * rows['lipschitz']['acc']:.2f}% | {100 * r['acc']:+.2f} | "
            f"{rows['lipschitz']['step_ms']:.1f} | {constraints:.1f} |"
        )

    for run_ in runs:
        line(run_["seed"], run_["ratios"], run_["rows"], run_["constraints_ms"])

    def median(get):
        return statistics.median(get(run_) for run_ in runs)

    ratios = {k: median(lambda r, k=k: r["ratios"][k]) for k in runs[0]["ratios"]}
    rows = {
        name: {k: median(lambda r, n=name, k=k: r["rows"][n][k]) for k in ("acc", "step_ms")}
        for name in MODELS
    }
    line("median", ratios, rows, median(lambda r: r["constraints_ms"]))
    return ratios


def merge(paths):
    """The runs of the seed rows printed in saved outputs (each seed's last row)."""
    number = r"([-+]?[\d.]+)"
    row = re.compile(
        rf"^\| (\d+) \| {number}x \| {number}x \| {number}x \| {number}x \| {number}% "
        rf"\| {number}% \| {number} \| {number} \| {number} \|$"
    )
    runs = {}
    for path in paths:
        for line in pathlib.Path(path).read_text().splitlines():
            if match := row.match(line.strip()):
                seed, step, infer, fwd, bwd, acc_mdeq, acc_lip, diff, step_ms, constraints = (
                    float(v) for v in match.groups()
                )
                runs[int(seed)] = {
                    "seed": int(seed),
                    "ratios": {
                        "step": step,
                        "infer": infer,
                        "fwd": fwd,
                        "bwd": bwd,
                        "acc": diff / 100,
                    },
                    "rows": {
                        "mdeq": {"acc": acc_mdeq / 100, "step_ms": math.nan},
                        "lipschitz": {"acc": acc_lip / 100, "step_ms": step_ms},
                    },
                    "constraints_ms": constraints,
                }
    return [runs[seed] for seed in sorted(runs)]


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        runs = merge(args.merge)
        print(f"merged from {', '.join(args.merge)}: seeds {[r['seed'] for r in runs]}")
        return {"runs": runs, "medians": print_seed_table(runs)}
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    runs = []
    for seed in args.seeds:  # the seed table so far after each seed
        runs.append(run(args, seed))
        medians = print_seed_table(runs)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "seed")}
        first = runs[0]  # docs/figures draws the first seed's epochs
        pathlib.Path(args.json).write_text(
            json.dumps(
                {
                    "args": {**settings, "seed": first["seed"]},
                    "rows": first["rows"],
                    "epochs": first["epochs"],
                    "constraints_ms": first["constraints_ms"],
                    "runs": runs,
                    "medians": medians,
                },
                indent=1,
            )
        )
    return {"runs": runs, "medians": medians}


if __name__ == "__main__":
    main()
