"""The implicit adjoint solved by Anderson or by GMRES, on the digits DEQ (issue 15, item 7).

    python benchmarks/krylov_adjoint.py [--epochs 10] [--seeds 0 1] [--threads 1]
    python benchmarks/krylov_adjoint.py --quick   # seconds: a smoke run
    python benchmarks/krylov_adjoint.py --model lm [--steps 300]   # the DEQ-Transformer LM

`--model lm` runs the same comparison on the DEQ-Transformer language model, per position
(`benchmarks/krylov_adjoint_lm.py`, which describes it); what follows is the digits DEQ.

The implicit gradient solves the adjoint system `u = J^T u + g` (`J = df/dz` at the
fixed point) with one vector-Jacobian product (VJP) of the cell per solver step. It is
linear, so a Krylov method applies: `keras_deq.solvers.GMRES` minimizes the residual over
the Krylov space of the VJPs. The model is the one of `examples/digits.py`: Dense(128)
injection -> `DEQ(DenseCell(128))` (tanh) -> Dense(10), Adam 1e-3, batch 64, on the
1,437 training / 360 test digits, the forward pass solved by Anderson (window 5),
`max_iter` 30 and relative `tol` 1e-4 for both solves (the example's settings).

1. Training. One model per adjoint solver and seed, from the same initial weights,
   `--epochs` epochs of `fit` (GMRES with `--restart` 20). Columns: the adjoint's
   evaluations of `h(u) = J^T u + g` (VJPs; for GMRES one of them per restart measures
   its iterate, the others are Krylov matrix-vector products) per training step, in the
   first and last epoch; its mean relative residual in the last epoch; the time per
   training step (the median over the epochs after the first, which traces and
   compiles), test accuracy and loss.

2. Adjoint solves alone. On the model trained with the Anderson adjoint (the first seed),
   the adjoint of the test loss's gradient `g = dL/dz*` at the 360 test images is solved
   by each solver (GMRES with each of `--solve-restarts`, 20 and 50), compiled as `DEQ`
   compiles its adjoint on CPU (one XLA program), to relative `tol` 1e-4 and 1e-6
   (budget 200 evaluations). `scale` multiplies the Jacobian, `h(u) = s J^T u + g`:
   `s = 1` is the trained model's adjoint; `s = 2` a harder, synthetic one (the
   spectral radius doubled: an adjoint that fixed-point iteration does not solve).
   Columns: evaluations (VJPs) to the tolerance (the solve's `steps`: until every sample
   met it, or the budget), the fraction of samples that met it, the largest relative
   residual, the median time per solve (over up to `--repeats` solves, at least 3) and
   per evaluation.

The timings are of one process on a CPU (`--threads 1` by default); on a shared machine
they are indicative only.
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from progress import Progress  # noqa: E402
from vs_torchdeq import load_digits_split  # noqa: E402

import keras_deq  # noqa: E402

WIDTH = 128
ADJOINTS = ("anderson", "gmres", "fixed_point", "broyden")


def adjoint_solver(name, args, max_iter, tol):
    """The adjoint solver `name` with the benchmark's settings."""
    options = {"gmres": {"restart": args.restart}, "anderson": {"window": args.window}}
    return keras_deq.solvers.get(name, max_iter=max_iter, tol=tol, **options.get(name, {}))


def build_model(adjoint, seed, args):
    """The digits DEQ of `examples/digits.py` with the adjoint solver `adjoint`."""
    keras.utils.set_random_seed(seed)
    solver = adjoint_solver(adjoint, args, args.max_iter, args.tol)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(WIDTH, name="injection"),
            keras_deq.DEQ(
                keras_deq.DenseCell(WIDTH),
                solver="anderson",
                max_iter=args.max_iter,
                tol=args.tol,
                backward=keras_deq.backward.Implicit(solver=solver),
                on_failure="ignore",  # reported by the residual columns instead
                jit_compile="auto" if args.compile else False,
                name="deq",
            ),
            keras.layers.Dense(10, name="classifier"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of each epoch of `fit` (the training batches only)."""

    def __init__(self, progress=None):
        super().__init__()
        self.seconds, self.progress = [], progress

    def on_epoch_begin(self, epoch, logs=None):
        self.began = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.began)
        if self.progress is not None:
            self.progress.advance()


def train(data, args, progress):
    """Rows of the training table: one model per seed and adjoint solver."""
    x_train, y_train, x_test, y_test = data
    steps = int(np.ceil(len(x_train) / args.batch_size))
    rows, models = [], {}
    for seed in args.seeds:
        for adjoint in args.adjoints:
            model = build_model(adjoint, seed, args)
            timer = EpochTimer(progress)
            # The timer runs before `fit`'s validation, which it does not count.
            history = model.fit(
                x_train,
                y_train,
                batch_size=args.batch_size,
                epochs=args.epochs,
                shuffle=True,
                verbose=0,
                callbacks=[timer],
            ).history
            test = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
            later = timer.seconds[1:] or timer.seconds
            rows.append(
                {
                    "seed": seed,
                    "adjoint": adjoint,
                    "bwd": (history["deq_bwd_steps"][0], history["deq_bwd_steps"][-1]),
                    "bwd_res": history["deq_bwd_residual"][-1],
                    "fwd": history["deq_fwd_steps"][-1],
                    "ms_per_step": 1000.0 * float(np.median(later)) / steps,
                    "acc": test["accuracy"],
                    "loss": test["loss"],
                }
            )
            models[(seed, adjoint)] = model
            r = rows[-1]
            progress.print(
                f"  seed {seed}, {adjoint}: bwd steps {r['bwd'][0]:.1f} -> {r['bwd'][1]:.1f}, "
                f"{r['ms_per_step']:.1f} ms/step, test acc {r['acc']:.3f}"
            )
    return rows, models


def adjoint_problem(model, x, y):
    """`(vjp, g)` at the model's fixed point for the inputs `x`: the cell's VJP at `z*`
    (a function of `u`) and the test loss's gradient `g = dL/dz*`."""
    injection, layer, classifier = model.layers
    cell = layer.cell
    h = injection(x)
    z_star = tf.stop_gradient(layer(h))
    with tf.GradientTape() as tape:
        tape.watch(z_star)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, classifier(z_star))
    g = tape.gradient(loss, z_star)

    def vjp(u):
        with tf.GradientTape() as inner:
            inner.watch(z_star)
            fz = cell(z_star, h)
        return inner.gradient(fz, z_star, output_gradients=u)

    return vjp, g


def solve_specs(args):
    """`[(label, name, options)]`: the solvers of the second table (GMRES once per
    `--solve-restarts` value)."""
    specs = []
    for name in args.adjoints:
        if name == "gmres":
            specs += [(f"gmres({r})", name, {"restart": r}) for r in args.solve_restarts]
        elif name == "anderson":
            specs.append((f"anderson({args.window})", name, {"window": args.window}))
        else:
            specs.append((name, name, {}))
    return specs


def solve_alone(model, data, args, progress):
    """Rows of the second table: each adjoint solver on the trained model's adjoint."""
    _, _, x_test, y_test = data
    vjp, g = adjoint_problem(model, tf.constant(x_test), tf.constant(y_test))
    rows = []
    for scale in args.scales:
        for tol in args.solve_tols:
            for label, name, options in solve_specs(args):
                solver = keras_deq.solvers.get(
                    name, max_iter=args.solve_max_iter, tol=tol, **options
                )

                @tf.function(jit_compile=args.compile)
                def solve(g, solver=solver, scale=scale):
                    return solver(lambda u: scale * vjp(u) + g, g)

                row = timed_solve(solve, g, args)
                rows.append({"scale": scale, "tol": tol, "adjoint": label, **row})
                progress.advance()
    return rows


def timed_solve(solve, g, args):
    """The columns of a row of the table of adjoint solves: `solve(g)` (a compiled
    function returning a `SolverResult`) traced and compiled, then timed over
    `--repeats` solves, or fewer (at least 3) past 2 s."""
    result = solve(g)  # traces and compiles
    seconds, began_all = [], time.perf_counter()
    while len(seconds) < args.repeats and (
        len(seconds) < 3 or time.perf_counter() - began_all < 2.0
    ):
        began = time.perf_counter()
        result = solve(g)
        _ = result.state.numpy()
        seconds.append(time.perf_counter() - began)
    steps = int(result.steps)
    median = float(np.median(seconds))
    return {
        "steps": steps,
        "conv": float(np.mean(result.converged.numpy())),
        "res": float(np.max(result.rel_residual.numpy())),
        "ms": 1000.0 * median,
        "ms_per_eval": 1000.0 * median / max(steps, 1),
    }


def print_training(rows):
    print(
        "| seed | adjoint | bwd evals / step (first → last epoch) | bwd residual (last) | "
        "fwd steps (last) | ms / train step | test acc | test loss |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['seed']} | {r['adjoint']} | {r['bwd'][0]:.1f} → {r['bwd'][1]:.1f} | "
            f"{r['bwd_res']:.1e} | {r['fwd']:.1f} | {r['ms_per_step']:.1f} | {r['acc']:.3f} | "
            f"{r['loss']:.3f} |"
        )


def print_solves(rows):
    print("| scale | tol | adjoint | evals | met tol | max rel residual | ms / solve | ms / eval |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['scale']:g} | {r['tol']:g} | {r['adjoint']} | {r['steps']} | "
            f"{r['conv']:.2f} | {r['res']:.1e} | {r['ms']:.2f} | {r['ms_per_eval']:.3f} |"
        )


# The options whose default depends on `--model` (the language model's: `krylov_adjoint_lm`).
DIGITS_DEFAULTS = {
    "batch_size": 64,
    "learning_rate": 1e-3,
    "max_iter": 30,
    "tol": 1e-4,
    "threads": 1,
    "scales": [1.0, 2.0],
    "solve_tols": [1e-4, 1e-6],
}


def main(argv=None):
    import krylov_adjoint_lm as lm  # noqa: PLC0415 (it imports this module's helpers)

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        choices=("digits", "lm"),
        default="digits",
        help="the digits DEQ, or the DEQ-Transformer language model (benchmarks/"
        "krylov_adjoint_lm.py); the options below marked * default to the model's settings",
    )
    parser.add_argument("--adjoints", nargs="+", default=["anderson", "gmres"], choices=ADJOINTS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, help="* 64; lm: 32")
    parser.add_argument("--learning-rate", type=float, help="* 1e-3; lm: 2e-3")
    parser.add_argument("--max-iter", type=int, help="* both solves' budget: 30; lm: 12")
    parser.add_argument("--tol", type=float, help="* both solves' tolerance: 1e-4; lm: 1e-3")
    parser.add_argument("--restart", type=int, default=20, help="GMRES's Krylov vectors per cycle")
    parser.add_argument("--window", type=int, default=5, help="Anderson's window")
    parser.add_argument("--scales", type=float, nargs="+", help="* 1 2; lm: 1")
    parser.add_argument(
        "--solve-restarts",
        type=int,
        nargs="+",
        default=[20, 50],
        help="GMRES's restarts in the table of adjoint solves",
    )
    parser.add_argument("--solve-tols", type=float, nargs="+", help="* 1e-4 1e-6; lm: 1e-3 1e-6")
    parser.add_argument("--solve-max-iter", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--threads", type=int, help="* TensorFlow threads, 1; lm: 2 (0: leave TensorFlow's)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 epoch on 256 images (lm: 4 steps of a small model on a few lines of text), "
        "one scale and tolerance, 3 repeats, no XLA",
    )
    lm.add_arguments(parser)
    args = parser.parse_args(argv)
    defaults = lm.DEFAULTS if args.model == "lm" else DIGITS_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # As DEQ does on CPU: the solves compiled apart with XLA (not in --quick, to save
    # the compilations).
    args.compile = not args.quick
    if args.quick:
        args.epochs, args.seeds, args.scales, args.repeats = 1, args.seeds[:1], [1.0], 3
        args.solve_tols, args.solve_restarts = args.solve_tols[:1], [args.restart]
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if args.model == "lm":
        return lm.main(args)

    data = load_digits_split(0)
    if args.quick:
        data = (data[0][:256], data[1][:256], data[2], data[3])
    print(
        f"digits DEQ, width {WIDTH}; forward Anderson; adjoints {args.adjoints} (GMRES restart "
        f"{args.restart}, Anderson window {args.window}); max_iter {args.max_iter}, tol "
        f"{args.tol}; {args.epochs} epochs, seeds {args.seeds}; {args.threads} thread(s)",
        flush=True,
    )
    began = time.perf_counter()
    units = len(args.seeds) * len(args.adjoints) * args.epochs
    units += len(args.scales) * len(args.solve_tols) * len(solve_specs(args))
    with Progress(units, unit_name="unit") as progress:
        train_rows, models = train(data, args, progress)
        reference = "anderson" if "anderson" in args.adjoints else args.adjoints[0]
        solve_rows = solve_alone(models[(args.seeds[0], reference)], data, args, progress)
    print()
    print_training(train_rows)
    print()
    print(
        f"Adjoint solves on the model trained with the {reference} adjoint (seed {args.seeds[0]}):"
    )
    print()
    print_solves(solve_rows)
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    return {"train": train_rows, "solves": solve_rows}


if __name__ == "__main__":
    main()
