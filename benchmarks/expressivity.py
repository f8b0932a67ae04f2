"""Expressivity benchmark: a width-10 DEQ against FNNs on paper 004 stand-ins.

    python benchmarks/expressivity.py            # about 9-10 minutes on 2 CPU cores
    python benchmarks/expressivity.py --quick    # smoke run, about 2 minutes
    python benchmarks/expressivity.py --seeds 0 1 2   # median over seeds (slower)

Tasks (see examples/synthetic/tasks.py; our stand-ins, not the paper's exact
definitions): sawtooth with 2^5 and 2^10 linear pieces, steep 1/(x + δ) with
δ = 2^-5 and 2^-10, and Boolean GOTU (x ∈ {±1}^10, f1 = x1 x2 + x3, train on
x1 = +1, test on the unseen x1 = -1).

Models: `keras_deq.DEQ(DenseCell(10, relu))` with a linear readout, against ReLU
FNNs of depth 2, 3 and 4 (weight layers) whose width is matched to the DEQ's
(a) trainable parameter count or (b) FLOPs: one DEQ iteration (one cell
evaluation, 2w^2 + 2dw + 2w per sample, readout excluded) against one FNN
forward pass (2ab + b per dense layer a -> b, plus one FLOP per hidden
activation, readout included). All models: Adam, the same learning rate, batch
size and number of optimizer steps, MSE loss, seeded. Per task and model the
table shows the median over the seeds.
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "synthetic"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train as train_lib  # noqa: E402
from md_tables import fmt, markdown  # noqa: E402
from progress import Progress  # noqa: E402

TASKS = ("sawtooth5", "sawtooth10", "steep5", "steep10", "gotu")
DEPTHS = (2, 3, 4)
NUMERIC = (
    "train_mse",
    "test_mse",
    "linf",
    "gotu",
    "max_weight",
    "fwd_steps",
    "converged",
    "train_time_s",
)


def configurations(deq_width):
    yield {"model_type": "deq", "width": deq_width}
    for match in ("params", "flops"):
        for depth in DEPTHS:
            yield {"model_type": "fnn", "depth": depth, "match": match, "deq_width": deq_width}


def epochs_for(task, steps, batch_size, n_train):
    n = 512 if task == "gotu" else n_train
    per_epoch = -(-n // batch_size)
    return max(1, round(steps / per_epoch))


def median_result(results, keys=NUMERIC):
    """The first result with each of `keys` replaced by its median over `results`."""
    out = dict(results[0])
    for key in keys:
        values = [r[key] for r in results if r[key] is not None]
        out[key] = float(np.median(values)) if values else None
    return out


def table(rows):
    header = (
        "| task | model | match | width | params | FLOPs/iter (DEQ) or /forward (FNN) "
        "| train MSE | test MSE | L∞ error | GOTU error | max abs weight | DEQ fwd steps | DEQ converged | time s |"
    )
    lines = []
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['model']} | {r['match']} | {r['width']} | {r['params']} "
            f"| {r['flops']} | {fmt(r['train_mse'])} | {fmt(r['test_mse'])} "
            f"| {fmt(None if r['gotu'] is not None else r['linf'])} | {fmt(r['gotu'])} "
            f"| {fmt(r['max_weight'])} | {fmt(r['fwd_steps'], '.1f')} | {fmt(r['converged'], '.2f')} "
            f"| {fmt(r['train_time_s'], '.1f')} |"
        )
    return markdown(header, lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny budget: smoke run only")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per model")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--deq-width", type=int, default=10)
    parser.add_argument("--max-iter", type=int, default=30)
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--json", help="also write every per-seed result to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.n_train = 32, 1024

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(
        f"budget: {args.steps} Adam steps (lr {args.learning_rate}, batch {args.batch_size}), "
        f"seeds {args.seeds}, DEQ width {args.deq_width}, anderson max_iter {args.max_iter}",
        flush=True,
    )
    rows, raw = [], []
    start = time.perf_counter()
    runs = len(args.tasks) * len(list(configurations(args.deq_width))) * len(args.seeds)
    with Progress(runs, unit_name="run") as progress:
        for task in args.tasks:
            epochs = epochs_for(task, args.steps, args.batch_size, args.n_train)
            for config in configurations(args.deq_width):
                results = []
                for seed in args.seeds:
                    results.append(
                        train_lib.run(
                            task=task,
                            epochs=epochs,
                            batch_size=args.batch_size,
                            learning_rate=args.learning_rate,
                            max_iter=args.max_iter,
                            seed=seed,
                            n_train=args.n_train,
                            **config,
                        )
                    )
                    progress.advance()
                raw.extend(results)
                row = median_result(results)
                rows.append(row)
                progress.print(
                    f"  {task:10s} {row['model']:7s} {row['match']:6s} w={row['width']:<3d} "
                    f"test MSE {row['test_mse']:.4g}  L∞ {row['linf']:.4g}  "
                    f"max|w| {row['max_weight']:.3g}  steps {fmt(row['fwd_steps'], '.1f')}  "
                    f"({time.perf_counter() - start:.0f} s)"
                )
    print()
    print(table(rows))
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(raw, indent=1))
    return rows


if __name__ == "__main__":
    main()
