"""Training memory vs solver iterations: a DEQ (implicit backward) against unrolled backprop.

    python benchmarks/memory.py            # about 3 minutes on 2 CPU cores (12 processes)
    python benchmarks/memory.py --check    # also assert: implicit flat, unrolled growing
    python benchmarks/memory.py --help

One training step (forward, backward and Adam update, in Keras' compiled
`train_on_batch`) of `Dense(64 -> width) -> DEQ(DenseCell(width)) -> Dense(10)`
is run with the solver forced to do N iterations (relative tol=1e-12, which the
float32 iterates do not reach; the table shows the steps actually run), for each
N in --iters, with two backward modes (--modes adds others):

- `implicit`: the DEQ. The forward solve is not recorded; the gradient solves the
  adjoint fixed point (also N iterations here). Memory should not depend on N.
- `unrolled`: autodiff through the forward solver's loop. The loop keeps the
  tensors its gradient needs at every iteration, so memory grows with N.
- `unrolled_remat` (not run by default): `Unrolled(remat=True)`, which keeps only
  each iteration's input state and recomputes the cell in the backward pass; memory
  still grows with N, by less per iteration. `--check` asserts its peak is below
  `unrolled`'s at the largest N when both run.
- `unrolled_checkpoint` (not run by default): `Unrolled(checkpoint_every=k)`, the solver
  loop run as rematerialized segments of k iterations (gradient checkpointing): the
  backward pass keeps the loop state at the N/k segment boundaries and one segment's k
  iterations at a time, so memory grows like N/k + k iterations instead of N. k is
  --checkpoint-every, by default round(sqrt(N)). `--check` asserts its peak is below
  `unrolled`'s at the largest N, and its peak ratio (largest/smallest N) below
  `unrolled`'s, when both run. `unrolled_remat_checkpoint`: both settings.

Peak memory is TensorFlow's own CPU allocator statistic
(`tf.config.experimental.get_memory_info("CPU:0")["peak"]`, reset just before the
step), read in a fresh process per configuration and repeat (this script re-runs
itself with --child). Each process runs one unmeasured warm-up step (tracing and
first run), then --steps measured steps. Columns: `peak MiB` is the median over all
measured steps of all processes, `min-max` their range, `above resting` the median
of peak minus the memory held just before the step (weights, Adam slots, batch),
`warm-up RSS+` the median rise of the process's peak RSS during the warm-up call (a
cross-check that includes tracing), `step s` the median step time. See
docs/benchmarks.md, "Training memory vs solver iterations", for why the allocator
statistic and not the RSS, and for what it does not count.
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

# Allocations below this size bypass the allocator that keeps statistics (see docs).
COUNTED_MIN_BYTES = 256 * 1024
FEATURES = 64
MIB = 2**20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        choices=("dense", "transformer"),
        default="dense",
        help="dense: Dense -> DEQ(DenseCell) -> Dense on 64 features (default); transformer: "
        "DEQTransformerLM on token windows of --seq-len (unrolled = an explicit weight-tied "
        "Transformer of depth N)",
    )
    parser.add_argument("--seq-len", type=int, default=64, help="transformer window (default 64)")
    parser.add_argument("--heads", type=int, default=4, help="transformer heads (default 4)")
    parser.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--width", type=int, default=512, help="state width (default 512)")
    parser.add_argument(
        "--iters", type=int, nargs="+", default=[10, 60], help="solver iterations (default 10 60)"
    )
    parser.add_argument(
        "--solver",
        nargs="+",
        default=["fixed_point"],
        choices=["fixed_point", "anderson", "broyden"],
        help="forward (and adjoint) solver(s) (default: fixed_point)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["implicit", "unrolled"],
        choices=[
            "implicit",
            "phantom",
            "one_step",
            "unrolled",
            "unrolled_remat",
            "unrolled_checkpoint",
            "unrolled_remat_checkpoint",
        ],
        help="backward modes (default: implicit unrolled); unrolled_remat: Unrolled(remat=True), "
        "each cell evaluation recomputed in the backward pass; unrolled_checkpoint: "
        "Unrolled(checkpoint_every=k), the solver loop in rematerialized segments of k steps; "
        "unrolled_remat_checkpoint: both",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="k of unrolled_checkpoint (default: round(sqrt(iterations)) per iteration count)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="fresh processes per configuration (default 3)"
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="measured steps per process, after one warm-up"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="TF intra- and inter-op threads (default 1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--check",
        action="store_true",
        help="fail unless every solver ran N steps, implicit's peak ratio (largest/smallest "
        "--iters) is <= 1.10 and unrolled's is > 1.5",
    )
    # Internal: measure one configuration in this process and print one JSON line.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="implicit", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch", "width", "repeats", "steps", "threads", "seq_len", "heads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.iters) < 1:
        parser.error("--iters must be >= 1")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        parser.error("--checkpoint-every must be >= 1")
    return args


def checkpoint_every(args, iters):
    """The segment length of `unrolled_checkpoint` for `iters` iterations."""
    return args.checkpoint_every or max(1, round(math.sqrt(iters)))


def backward_mode(args, iters, keras_deq):
    """The `DEQ(backward=...)` of `args.mode`."""
    if args.mode == "unrolled_remat":
        return keras_deq.backward.Unrolled(remat=True)
    if args.mode in ("unrolled_checkpoint", "unrolled_remat_checkpoint"):
        return keras_deq.backward.Unrolled(
            remat=args.mode == "unrolled_remat_checkpoint",
            checkpoint_every=checkpoint_every(args, iters),
        )
    return args.mode


def build(args, solver, iters, keras, np, tf, keras_deq):
    """The compiled model and one batch, for `args.model`."""
    deq_options = dict(
        solver=solver,
        max_iter=iters,
        tol=1e-12,  # unreachable in float32: the solver runs all `iters` steps
        backward=backward_mode(args, iters, keras_deq),
        on_failure="ignore",  # not converging is the point here
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(args.seed)
    if args.model == "transformer":
        vocab = 64
        model = keras_deq.models.DEQTransformerLM(
            vocab, d_model=args.width, num_heads=args.heads, **deq_options
        )
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        tokens = rng.integers(0, vocab, size=(args.batch, args.seq_len + 1))
        return model, tf.constant(tokens[:, :-1]), tf.constant(tokens[:, 1:])
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(args.width, name="injection"),
            keras_deq.DEQ(keras_deq.DenseCell(args.width), name="deq", **deq_options),
            keras.layers.Dense(10, name="classifier"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    x = tf.constant(rng.normal(size=(args.batch, FEATURES)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=args.batch))
    return model, x, y


# --------------------------------------------------------------------- child side
def child(args):
    """Builds the model, runs a warm-up step, then measures `args.steps` steps."""
    import resource

    import keras
    import numpy as np
    import tensorflow as tf

    import keras_deq

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(args.seed)
    (iters,) = args.iters
    (solver,) = args.solver

    def memory_info():
        try:
            return tf.config.experimental.get_memory_info("CPU:0")
        except ValueError as error:
            raise SystemExit(
                f"tf.config.experimental.get_memory_info('CPU:0') failed: {error}. CPU "
                "allocator statistics come from TensorFlow's oneDNN CPU allocator: run with "
                "TF_ENABLE_ONEDNN_OPTS=1 on an x86-64 build of TensorFlow."
            ) from error

    model, x, y = build(args, solver, iters, keras, np, tf, keras_deq)

    # Warm-up: traces and optimizes the train function, creates the optimizer
    # slots, and runs one step. Not measured by the allocator statistic; its rise
    # in peak RSS is recorded as a cross-check.
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model.train_on_batch(x, y, return_dict=True)
    warmup_s = time.perf_counter() - start
    warmup_rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024

    steps = []
    for _ in range(args.steps):
        tf.config.experimental.reset_memory_stats("CPU:0")
        resting = memory_info()["current"]
        start = time.perf_counter()
        logs = model.train_on_batch(x, y, return_dict=True)
        seconds = time.perf_counter() - start
        steps.append(
            {
                "peak": memory_info()["peak"],
                "resting": resting,
                "seconds": seconds,
                "fwd_steps": float(logs["deq_fwd_steps"]),
                "bwd_steps": float(logs["deq_bwd_steps"]),
                "loss": float(logs["loss"]),
            }
        )
    print(
        "RESULT "
        + json.dumps(
            {
                "steps": steps,
                "warmup_s": warmup_s,
                "warmup_rss_mib": warmup_rss,  # ru_maxrss is in KiB on Linux
                "tf": tf.__version__,
                "keras": keras.__version__,
            }
        ),
        flush=True,
    )


# -------------------------------------------------------------------- parent side
def run_child(args, solver, mode, iters):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        f"--mode={mode}",
        f"--solver={solver}",
        f"--iters={iters}",
        f"--batch={args.batch}",
        f"--width={args.width}",
        f"--model={args.model}",
        f"--seq-len={args.seq_len}",
        f"--heads={args.heads}",
        f"--steps={args.steps}",
        f"--threads={args.threads}",
        f"--seed={args.seed}",
    ]
    if args.checkpoint_every is not None:
        command.append(f"--checkpoint-every={args.checkpoint_every}")
    env = dict(
        os.environ,
        KERAS_BACKEND="tensorflow",
        TF_CPP_MIN_LOG_LEVEL="2",
        # The CPU allocator that keeps statistics is oneDNN's (the x86-64 default).
        TF_ENABLE_ONEDNN_OPTS="1",
    )
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"child failed (exit {done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}"
    )


def summarize(runs):
    """Pools the measured steps of all processes of one configuration."""
    steps = [s for run in runs for s in run["steps"]]
    peaks = [s["peak"] / MIB for s in steps]
    return {
        "peak": statistics.median(peaks),
        "low": min(peaks),
        "high": max(peaks),
        "above": statistics.median((s["peak"] - s["resting"]) / MIB for s in steps),
        "fwd_steps": sorted({s["fwd_steps"] for s in steps}),
        "bwd_steps": sorted({s["bwd_steps"] for s in steps}),
        "seconds": statistics.median(s["seconds"] for s in steps),
        "warmup_rss": statistics.median(run["warmup_rss_mib"] for run in runs),
        "n": len(steps),
    }


def _steps_text(values):
    return "/".join(f"{v:g}" for v in values)


def print_table(args, results):
    header = (
        f"{'solver':<12} {'backward':<19} {'iters':>5} {'fwd steps':>9} {'bwd steps':>9} "
        f"{'peak MiB':>9} {'min-max':>13} {'above resting':>13} {'warm-up RSS+':>12} {'step s':>7}"
    )
    print(header)
    print("-" * len(header))
    for (solver, mode, iters), s in results.items():
        spread = f"{s['low']:.1f}-{s['high']:.1f}"
        print(
            f"{solver:<12} {mode:<19} {iters:>5} {_steps_text(s['fwd_steps']):>9} "
            f"{_steps_text(s['bwd_steps']):>9} {s['peak']:9.1f} "
            f"{spread:>13} {s['above']:13.1f} {s['warmup_rss']:12.1f} "
            f"{s['seconds']:7.2f}"
        )
    lo, hi = min(args.iters), max(args.iters)
    ratios = {}
    if {"unrolled_checkpoint", "unrolled_remat_checkpoint"} & set(args.modes):
        segments = ", ".join(f"{n}: {checkpoint_every(args, n)}" for n in args.iters)
        print(f"\ncheckpoint segment length k per iterations: {segments}")
    if "unrolled" in args.modes and len(args.modes) > 1:
        print()
        for (solver, mode, iters), s in results.items():
            plain = results.get((solver, "unrolled", iters))
            if mode != "unrolled" and plain:
                print(
                    f"step time / unrolled's, {solver} {mode} {iters} iterations: "
                    f"{s['seconds'] / plain['seconds']:.2f}"
                )
    print()
    for solver in args.solver:
        for mode in args.modes:
            low = results[solver, mode, lo]["peak"]
            if low <= 0:  # a state too small for the allocator to show
                ratios[solver, mode] = float("nan")
                print(
                    f"peak ratio {hi}/{lo} iterations, {solver} {mode}: not measurable (peak "
                    f"{low:.1f} MiB at {lo} iterations: raise --batch or --width)"
                )
                continue
            ratio = results[solver, mode, hi]["peak"] / low
            ratios[solver, mode] = ratio
            print(f"peak ratio {hi}/{lo} iterations, {solver} {mode}: {ratio:.2f}")
    return ratios


def check(args, results, ratios):
    problems = []
    for (solver, mode, iters), s in results.items():
        if s["fwd_steps"] != [iters]:
            problems.append(f"{solver} {mode} {iters}: forward ran {s['fwd_steps']} steps")
    for (solver, mode), ratio in ratios.items():
        if math.isnan(ratio):  # not measurable
            problems.append(f"{solver} {mode}: peak too small to compare")
        elif mode == "implicit" and ratio > 1.10:
            problems.append(f"{solver} implicit: peak ratio {ratio:.2f} > 1.10")
        elif mode == "unrolled" and ratio <= 1.5:
            problems.append(f"{solver} unrolled: peak ratio {ratio:.2f} <= 1.5")
    hi = max(args.iters)
    for solver in args.solver:
        if (solver, "unrolled", hi) in results and (solver, "unrolled_remat", hi) in results:
            plain = results[solver, "unrolled", hi]["peak"]
            remat = results[solver, "unrolled_remat", hi]["peak"]
            if remat >= plain:
                problems.append(f"{solver} unrolled_remat: peak {remat:.1f} >= {plain:.1f} MiB")
        if (solver, "unrolled", hi) in results and (solver, "unrolled_checkpoint", hi) in results:
            plain = results[solver, "unrolled", hi]["peak"]
            segmented = results[solver, "unrolled_checkpoint", hi]["peak"]
            if segmented >= plain:
                problems.append(
                    f"{solver} unrolled_checkpoint: peak {segmented:.1f} >= {plain:.1f} MiB"
                )
            growth = ratios.get((solver, "unrolled_checkpoint"), float("nan"))
            if not growth < ratios.get((solver, "unrolled"), float("nan")):
                problems.append(
                    f"{solver} unrolled_checkpoint: peak ratio {growth:.2f} not below unrolled's"
                )
    if problems:
        raise SystemExit("check failed:\n  " + "\n  ".join(problems))
    print("check passed")


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child(args)
        return None
    tokens = args.seq_len if args.model == "transformer" else 1
    state_bytes = args.batch * tokens * args.width * 4
    shape = f"x {args.seq_len} tokens " if args.model == "transformer" else ""
    print(
        f"model {args.model}, batch {args.batch} {shape}width {args.width} "
        f"(one float32 state = {state_bytes / MIB:.2f} MiB), "
        f"iterations {args.iters}, {args.repeats} processes x {args.steps} measured steps each, "
        f"{args.threads} thread(s); python {platform.python_version()}",
        flush=True,
    )
    if state_bytes < COUNTED_MIN_BYTES:
        print(
            f"warning: one state is below {COUNTED_MIN_BYTES // 1024} KiB, which TensorFlow's "
            "CPU allocator statistics do not count: the figures below miss the states. "
            "Raise --batch or --width.",
            flush=True,
        )
    # Here, not at the top: the measuring child processes do not draw the bar (nor import
    # Keras before setting their threads).
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from progress import Progress  # noqa: PLC0415

    start = time.perf_counter()
    runs = {}
    versions = None
    total = len(args.solver) * len(args.modes) * len(args.iters) * args.repeats
    with Progress(total, unit_name="process") as progress:
        for solver in args.solver:
            for mode in args.modes:
                for iters in args.iters:
                    key = (solver, mode, iters)
                    runs[key] = []
                    for repeat in range(args.repeats):
                        run = run_child(args, solver, mode, iters)
                        versions = versions or (run["tf"], run["keras"])
                        runs[key].append(run)
                        progress.advance()
                        peaks = " ".join(f"{s['peak'] / MIB:.1f}" for s in run["steps"])
                        progress.print(
                            f"  {solver} {mode} {iters} #{repeat + 1}: peaks MiB {peaks} "
                            f"(warm-up {run['warmup_s']:.1f} s)",
                            file=sys.stderr,
                        )
    results = {key: summarize(value) for key, value in runs.items()}
    print(f"tensorflow {versions[0]}, keras {versions[1]}\n")
    ratios = print_table(args, results)
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")
    if args.check:
        check(args, results, ratios)
    return results


if __name__ == "__main__":
    main()
