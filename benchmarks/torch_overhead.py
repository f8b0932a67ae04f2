"""keras_deq's per-step overhead on PyTorch: this checkout against an earlier commit,
on the digits DEQ of `benchmarks/backends.py`, in one run.

    pip install torch==2.13.0 torchdeq==0.1.0 --no-deps  # this benchmark only
    python benchmarks/torch_overhead.py --before REF [--rounds 4] [--epochs 8] [--threads 1]
    python benchmarks/torch_overhead.py --growth [--epochs 12]
    python benchmarks/torch_overhead.py --profile [--steps 30] [--root DIR]

`REF`'s `keras_deq` package (`git archive`) and this checkout's are each imported by
their own subprocesses; with TorchDEQ's run of the same model, they take turns in
an order that rotates each round, so that a drift of the machine's load weighs on
all. Each trains `vs_torchdeq.py`'s mlp model (Anderson forward and adjoint, tol
1e-4, 30 + 30 iterations, Adam 1e-3, batch 64, the same initial weights) for
`--epochs` epochs, keras_deq eagerly on PyTorch with Keras' defaults.

Printed per version: the median over its runs of each run's median epoch time after
the first epoch, the fastest run's, the mean forward and backward solver iterations
of the last epoch and the test accuracy (the same in both keras_deq versions when
their arithmetic is), and the ratios of the medians.

`--growth` asks why the epochs lengthen: in this process, with this checkout, the
same model trains `--epochs` epochs; printed per epoch are its time, the mean forward
and backward solver iterations, and the Python objects and torch tensors alive after
a garbage collection. Then the initial weights are restored (the optimizer's state
kept) and two more epochs run.

`--profile` runs cProfile over `--steps` training steps of the same model on its
first batch (see `profile`); `--root DIR` imports `keras_deq` from `DIR` instead of
this checkout (e.g. `git archive REF keras_deq | tar -x -C DIR`).
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tarfile
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vs_torchdeq  # noqa: E402


def extract(ref, destination):
    """`ref`'s `keras_deq` package, unpacked under `destination`."""
    archive = os.path.join(destination, "before.tar")
    subprocess.run(
        ["git", "archive", "--output", archive, ref, "keras_deq"], cwd=HERE.parent, check=True
    )
    with tarfile.open(archive) as tar:
        tar.extractall(destination, filter="data")
    return destination


def train(root, args):
    """One digits run on eager PyTorch with the `keras_deq` package under `root`, or
    TorchDEQ's (`root` None)."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root or HERE.parent), str(HERE)])
    run_args = argparse.Namespace(
        epochs=args.epochs,
        threads=args.threads,
        repeats=1,
        seed=args.seed,
        steps_per_execution=1,
        input="numpy",
        deq_jit_compile="auto",
        model_jit_compile="auto",
    )
    library = "torchdeq" if root is None else "keras_deq_torch"
    return vs_torchdeq.spawn(library, "mlp", "anderson", run_args)


def summary(runs):
    epochs = [vs_torchdeq.epoch_time(r) for r in runs]
    last = runs[-1]
    return {
        "median": statistics.median(epochs),
        "fastest": min(epochs),
        "fwd": last["fwd_steps"],
        "bwd": last["bwd_steps"],
        "accuracy": last["accuracy"],
    }


def digits_model(args):
    """`(model, x, y)`: the digits model compiled with Keras' defaults on PyTorch, in
    this process, with the `keras_deq` package under `--root` (this checkout's by
    default), and the training split."""
    os.environ["KERAS_BACKEND"] = "torch"
    sys.path.insert(0, str(args.root or HERE.parent))
    import keras

    vs_torchdeq.set_threads(args.threads)
    keras.utils.set_random_seed(args.seed)
    x, y, _, _ = vs_torchdeq.load_digits_split(args.seed)
    deq_kwargs = dict(vs_torchdeq.keras_settings("anderson"), name="deq")
    w = vs_torchdeq.initial_weights("mlp", args.seed)
    model = vs_torchdeq.keras_model("mlp", w, deq_kwargs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-8),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model, x, y


def growth(args):
    """Per-epoch time, solver iterations and live objects; then two epochs from the
    initial weights again."""
    import gc
    import time

    model, x, y = digits_model(args)
    import keras
    import torch

    initial = model.get_weights()

    class Epochs(keras.callbacks.Callback):
        def __init__(self, label):
            super().__init__()
            self.label = label

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.start
            gc.collect()
            alive = gc.get_objects()
            tensors = sum(isinstance(o, torch.Tensor) for o in alive)
            print(
                f"| {self.label} {epoch} | {seconds * 1e3:.0f} | {logs['deq_fwd_steps']:.2f} "
                f"| {logs['deq_bwd_steps']:.2f} | {len(alive)} | {tensors} |",
                flush=True,
            )

    print("| epoch | ms | fwd iters | bwd iters | Python objects | torch tensors |")
    print("|---|---|---|---|---|---|")
    fit = dict(batch_size=64, verbose=0, shuffle=True)
    model.fit(x, y, epochs=args.epochs, callbacks=[Epochs("trained")], **fit)
    model.set_weights(initial)
    model.fit(x, y, epochs=2, callbacks=[Epochs("initial weights again")], **fit)


def profile(args):
    """cProfile of `--steps` eager training steps on the first batch (after 3 steps
    unprofiled): the step time without the profiler, Keras' `convert_to_tensor` calls
    per step, the step's `keras.ops` calls (the solver's, the cell's and the trainer's)
    per solver iteration, and the keras_deq functions with the most cumulative time."""
    import cProfile
    import pstats
    import time

    model, x, y = digits_model(args)
    x, y = x[:64], y[:64]
    for _ in range(3):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(args.steps):
        model.train_on_batch(x, y)
    step = (time.perf_counter() - start) / args.steps
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [model.train_on_batch(x, y) for _ in range(args.steps)])
    stats = pstats.Stats(profiler)
    calls = {}
    for (path, _, function), (_, count, *_) in stats.stats.items():
        if "keras/src/ops/" in path or (function == "convert_to_tensor" and "torch" in path):
            key = "convert_to_tensor" if "ops/" not in path else "ops"
            calls[key] = calls.get(key, 0) + count
        if function == "advance" and path.endswith("solvers/base.py"):
            iterations = count
    logs = model.get_metrics_result()
    print(
        f"step {step * 1e3:.1f} ms (unprofiled); {float(logs['deq_fwd_steps']):.1f} forward + "
        f"{float(logs['deq_bwd_steps']):.1f} backward iterations per step; "
        f"convert_to_tensor {calls['convert_to_tensor'] / args.steps:.0f} calls per step; "
        f"keras.ops calls / solver iterations {calls['ops'] / iterations:.1f}"
    )
    stats.sort_stats("cumulative").print_stats("keras_deq", 25)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", help="git ref of the earlier version")
    parser.add_argument("--growth", action="store_true", help="why the epochs lengthen")
    parser.add_argument("--profile", action="store_true", help="cProfile of training steps")
    parser.add_argument("--steps", type=int, default=30, help="--profile's steps")
    parser.add_argument("--root", help="--growth/--profile: where keras_deq is imported from")
    parser.add_argument("--rounds", type=int, default=4, help="runs per version")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.growth or args.profile:
        return growth(args) if args.growth else profile(args)
    if not args.before:
        parser.error("--before REF is required (or --growth, --profile)")
    print(f"before={args.before} rounds={args.rounds} epochs={args.epochs} threads={args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        roots = {"before": extract(args.before, tmp), "after": HERE.parent, "TorchDEQ": None}
        runs = {version: [] for version in roots}
        for i in range(args.rounds):
            order = list(roots)[i % 3 :] + list(roots)[: i % 3]
            for version in order:
                r = train(roots[version], args)
                runs[version].append(r)
                times = "/".join(f"{t:.2f}" for t in r["epoch_times"])
                print(f"round {i} {version}: epoch times (s) {times}", flush=True)
    rows = {version: summary(r) for version, r in runs.items()}
    print(
        "\n| version | median epoch ms | fastest run's epoch ms | fwd iters | bwd iters "
        "| test acc | ratio to before | ratio to TorchDEQ |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for version, s in rows.items():
        print(
            f"| {version} | {s['median'] * 1e3:.0f} | {s['fastest'] * 1e3:.0f} | {s['fwd']:.1f} "
            f"| {s['bwd']:.1f} | {s['accuracy'] * 100:.1f}% "
            f"| {s['median'] / rows['before']['median']:.2f} "
            f"| {s['median'] / rows['TorchDEQ']['median']:.2f} |"
        )
    return rows


if __name__ == "__main__":
    main()
