"""DEQ-Transformer vs an explicit (unrolled) Transformer on character-level Shakespeare.

    python benchmarks/language.py [--steps 200] [--depth 4] [--threads 2]

Trains, on the same data, batches and number of steps (the budget), and from the
same initial weights:

- `explicit`: the `DEQTransformerCell` applied `--depth` times from `z = 0`,
  differentiated by autodiff (a weight-tied `depth`-layer Transformer: exactly the
  DEQ's parameter count). It is the same `DEQTransformerLM` with
  `solver="fixed_point", max_iter=depth, tol=1e-30, backward="unrolled"`.
- `deq`: the DEQ-Transformer, Anderson forward, implicit backward.
- `deq+jr`: the same with Jacobian regularization (`--jac-weight`, applied with
  probability `--jac-frequency` per step).

Prints, per model: parameters, validation bits per character, the median train
step time and its ratio to `explicit`, the largest per-step peak of TensorFlow's
CPU allocator (MiB, steps 4 on), and the mean forward (and backward) solver steps
in the last training epoch and in validation. For memory as the depth / iteration
budget grows, run `benchmarks/memory.py --model transformer`.
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "language"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import text_data as data  # noqa: E402
from progress import Progress  # noqa: E402

from keras_deq.models import BitsPerCharacter, DEQTransformerLM  # noqa: E402


class StepTimer(keras.callbacks.Callback):
    """Wall time and peak allocator memory of every training batch.

    The peak is TensorFlow's CPU allocator statistic, reset before each step
    (see benchmarks/memory.py for what it counts); None if unavailable.
    """

    def __init__(self):
        super().__init__()
        self.times = []
        self.peaks = []

    def on_train_batch_begin(self, batch, logs=None):
        try:
            tf.config.experimental.reset_memory_stats("CPU:0")
        except ValueError:
            pass
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        try:
            self.peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20)
        except ValueError:
            pass


def variants(args):
    common = dict(d_model=args.d_model, num_heads=args.heads, norm=args.norm)
    deq = dict(
        solver="anderson",
        max_iter=args.max_iter,
        tol=args.tol,
        backward="implicit",
        deq_options={"solver_batch_dims": args.solver_batch_dims},
    )
    return {
        "explicit": dict(
            common, solver="fixed_point", max_iter=args.depth, tol=1e-30, backward="unrolled"
        ),
        "deq": dict(common, **deq),
        "deq+jr": dict(
            common,
            **deq,
            jacobian_weight=args.jac_weight,
            jacobian_frequency=args.jac_frequency,
        ),
    }


def run(name, options, corpus, valid, args, progress=None):
    keras.utils.set_random_seed(args.seed)
    model = DEQTransformerLM(len(corpus.vocab), **options)
    model.build((None, None))  # same seed, same architecture: same initial weights
    model.compile(
        optimizer=keras.optimizers.Adam(args.lr, clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[BitsPerCharacter()],
    )
    timer = StepTimer()
    n = args.steps * args.batch_size
    start = time.time()
    history = model.fit(
        corpus.train_x[:n],
        corpus.train_y[:n],
        batch_size=args.batch_size,
        epochs=1,
        shuffle=False,
        validation_data=valid,
        callbacks=[timer] + ([progress.callback()] if progress is not None else []),
        verbose=0,
    )
    logs = {k: v[-1] for k, v in history.history.items()}
    return model, {
        "name": name,
        "params": model.count_params(),
        "val_bpc": logs["val_bpc"],
        "train_bpc": logs["bpc"],
        "step_s": statistics.median(timer.times[3:]),
        "peak_mib": max(timer.peaks[3:]) if timer.peaks[3:] else float("nan"),
        "fwd": logs["deq_fwd_steps"],
        "bwd": logs["deq_bwd_steps"],
        "val_fwd": logs["val_deq_fwd_steps"],
        "wall_s": time.time() - start,
    }


def add_model_arguments(parser):
    """The data, model, solver and regularizer options (benchmarks/jacobian_steps.py too)."""
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--norm", choices=("pre", "post"), default="pre")
    parser.add_argument("--max-iter", type=int, default=12)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--jac-weight", type=float, default=1.0)
    parser.add_argument("--jac-frequency", type=float, default=0.35)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--valid-batches", type=int, default=10)
    parser.add_argument("--dataset", choices=data.DATASETS, default="shakespeare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--solver-batch-dims",
        type=int,
        choices=(1, 2),
        default=2,
        help="2 (the model's default): solve each position separately; 1: whole sequences",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="subset of the variants")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    corpus = data.load(args.dataset, args.seq_len, stride=args.seq_len)
    n_valid = min(len(corpus.valid_x), args.valid_batches * args.batch_size)
    valid = (corpus.valid_x[:n_valid], corpus.valid_y[:n_valid])
    print(
        f"{args.dataset}: {len(corpus.vocab)} chars; {args.steps} steps x batch "
        f"{args.batch_size} x {args.seq_len} chars; validation {n_valid} windows"
    )
    rows = []
    chosen = {k: v for k, v in variants(args).items() if not args.only or k in args.only}
    n_steps = -(-len(corpus.train_x[: args.steps * args.batch_size]) // args.batch_size)
    with Progress(len(chosen) * n_steps, unit_name="step") as progress:
        for name, options in chosen.items():
            _, row = run(name, options, corpus, valid, args, progress)
            rows.append(row)
            progress.print(f"  {name}: done in {row['wall_s']:.0f} s")
    base = next((r["step_s"] for r in rows if r["name"] == "explicit"), rows[0]["step_s"])
    print(
        "\n| model | params | val bpc | train bpc | step (ms) | step ratio | peak MiB | "
        "fwd steps (train / val) | bwd steps |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['params']:,} | {r['val_bpc']:.3f} | {r['train_bpc']:.3f} | "
            f"{1000 * r['step_s']:.0f} | {r['step_s'] / base:.2f} | {r['peak_mib']:.1f} | "
            f"{r['fwd']:.1f} / {r['val_fwd']:.1f} | {r['bwd']:.1f} |"
        )
    return rows


if __name__ == "__main__":
    main()
