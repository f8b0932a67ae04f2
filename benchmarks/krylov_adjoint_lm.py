"""The implicit adjoint solved by Anderson or by GMRES on the DEQ-Transformer language
model (issue 15, item 7): `python benchmarks/krylov_adjoint.py --model lm`.

The model is `benchmarks/language.py`'s `deq`: `keras_deq.models.DEQTransformerLM`
(d_model 64, 4 heads, FFN 256, pre-LN, no dropout) on character-level Shakespeare
(`examples/language/text_data.py`, windows of 64 characters, batch 32, Adam 2e-3 with
clipnorm 1), the forward pass solved by Anderson (window 5), `max_iter` 12 and relative
`tol` 1e-3 for both solves, each position its own sample (`solver_batch_dims=2`: a
tolerance per position). The adjoint is Anderson's (window 5, the model's default) or
GMRES's, set with `backward=Implicit(solver=...)`. Under `solver_batch_dims=2` GMRES runs
one Krylov process per window, over its positions (which attention couples), and tests
the tolerance per position (`keras_deq.solvers.common.per_entry(joint=True)`).

1. Training. One model per adjoint from the same initial weights, `--steps` steps over
   the same batches in order, interleaved: each step trains every model on the batch
   (alternating their order), so that the machine's load falls on all alike. Columns:
   the adjoint's evaluations (VJPs) per training step over the first and the last
   quarter of the steps, its mean relative residual (per position) over the last
   quarter, the forward steps, the median time per training step (from the 4th on),
   and the validation bits per character and the forward steps there.

2. Adjoint solves alone. On the model trained with the Anderson adjoint, the adjoint of
   the loss's gradient at `--solve-windows` validation windows, solved per position by
   each solver, compiled with XLA as `DEQ` compiles its adjoint on CPU, to the relative
   `tol`s of `--solve-tols` (budget `--solve-max-iter`); GMRES with each of
   `--solve-restarts`, and `gmres(r) apart`: one Krylov process per position (the
   fixed-point solvers' `per_entry`), which reads the other positions' probes.
   Columns as in the digits benchmark; the fractions are of positions.
"""

import argparse
import pathlib
import sys
import time

import keras
import numpy as np
import tensorflow as tf

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples" / "language"))
sys.path.insert(0, str(HERE))
import krylov_adjoint as shared  # noqa: E402
import language  # noqa: E402
import text_data  # noqa: E402

import keras_deq  # noqa: E402
from keras_deq.models import BitsPerCharacter, DEQTransformerLM  # noqa: E402
from keras_deq.solvers import common  # noqa: E402

# The settings of `benchmarks/language.py` that the shared options leave to the model.
DEFAULTS = {
    "batch_size": 32,
    "learning_rate": 2e-3,
    "max_iter": 12,
    "tol": 1e-3,
    "threads": 2,
    "scales": [1.0],
    "solve_tols": [1e-3, 1e-6],
}


def add_arguments(parser):
    """The options of the language model only."""
    group = parser.add_argument_group("--model lm")
    group.add_argument("--steps", type=int, default=200)
    group.add_argument("--seq-len", type=int, default=64)
    group.add_argument("--d-model", type=int, default=64)
    group.add_argument("--heads", type=int, default=4)
    group.add_argument("--valid-batches", type=int, default=10)
    group.add_argument("--dataset", choices=text_data.DATASETS, default="shakespeare")
    group.add_argument(
        "--solve-windows", type=int, default=32, help="validation windows of the adjoint solves"
    )


def build(adjoint, vocab_size, args):
    """`language.py`'s `deq` model with the adjoint solver `adjoint`, from seed `--seeds[0]`."""
    settings = argparse.Namespace(
        d_model=args.d_model,
        heads=args.heads,
        norm="pre",
        max_iter=args.max_iter,
        tol=args.tol,
        solver_batch_dims=2,
        depth=4,
        jac_weight=0.0,
        jac_frequency=0.0,
    )
    options = language.variants(settings)["deq"]
    solver = shared.adjoint_solver(adjoint, args, args.max_iter, args.tol)
    options.update(backward=keras_deq.backward.Implicit(solver=solver), on_failure="ignore")
    # DEQ's default on CPU: its solves compiled apart with XLA (not in --quick).
    options["deq_options"] = {**options["deq_options"], "jit_compile": args.compile and "auto"}
    keras.utils.set_random_seed(args.seeds[0])
    model = DEQTransformerLM(vocab_size, **options)
    model.build((None, None))  # same seed, same architecture: same initial weights
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate, clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[BitsPerCharacter()],
    )
    return model


def train(corpus, valid, args, progress):
    """Rows of the training table and the trained models, one per adjoint solver."""
    models = {name: build(name, len(corpus.vocab), args) for name in args.adjoints}
    logs = {name: [] for name in models}
    seconds = {name: [] for name in models}
    n = min(args.steps, len(corpus.train_x) // args.batch_size)
    for step in range(n):
        batch = slice(step * args.batch_size, (step + 1) * args.batch_size)
        x, y = corpus.train_x[batch], corpus.train_y[batch]
        for name in list(models)[:: 1 if step % 2 == 0 else -1]:
            began = time.perf_counter()
            logs[name].append(models[name].train_on_batch(x, y, return_dict=True))
            seconds[name].append(time.perf_counter() - began)
        progress.advance()
    quarter = max(1, n // 4)
    rows = []
    for name, model in models.items():
        first, last = logs[name][:quarter], logs[name][-quarter:]

        def mean(key, part):
            return float(np.mean([log[key] for log in part]))

        val = model.evaluate(*valid, batch_size=args.batch_size, verbose=0, return_dict=True)
        rows.append(
            {
                "adjoint": name,
                "bwd": (mean("deq_bwd_steps", first), mean("deq_bwd_steps", last)),
                "bwd_res": mean("deq_bwd_residual", last),
                "fwd": mean("deq_fwd_steps", last),
                "ms_per_step": 1000.0 * float(np.median(seconds[name][3:] or seconds[name])),
                "train_bpc": mean("bpc", last),
                "val_bpc": val["bpc"],
                "val_fwd": val["deq_fwd_steps"],
            }
        )
        r = rows[-1]
        progress.print(
            f"  {name}: bwd steps {r['bwd'][0]:.1f} -> {r['bwd'][1]:.1f}, "
            f"{r['ms_per_step']:.0f} ms/step, val bpc {r['val_bpc']:.3f}"
        )
    return rows, models


def adjoint_problem(model, tokens, targets):
    """`(vjp, g)` at the model's fixed point for the windows `tokens`: the cell's VJP at
    `z*` `(windows, T, d)` and the gradient `g = dL/dz*` of the mean cross-entropy."""
    x = model.inject(tokens)
    z_star = tf.stop_gradient(model.deq(x))
    embeddings = model.embedding.embeddings
    with tf.GradientTape() as tape:
        tape.watch(z_star)
        logits = tf.matmul(model.final_norm(z_star), embeddings, transpose_b=True)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            targets, logits + model.output_bias
        )
    g = tape.gradient(loss, z_star)

    def vjp(u):
        with tf.GradientTape() as inner:
            inner.watch(z_star)
            fz = model.cell(z_star, x)
        return inner.gradient(fz, z_star, output_gradients=u)

    return vjp, g


def solve_specs(args):
    """`[(label, name, options, joint)]`: GMRES once per `--solve-restarts` value, and
    with one process per position (`apart`) at the first."""
    specs = []
    for name in args.adjoints:
        if name == "gmres":
            specs += [(f"gmres({r})", name, {"restart": r}, True) for r in args.solve_restarts]
            r = args.solve_restarts[0]
            specs.append((f"gmres({r}) apart", name, {"restart": r}, False))
        elif name == "anderson":
            specs.append((f"anderson({args.window})", name, {"window": args.window}, False))
        else:
            specs.append((name, name, {}, False))
    return specs


def solve_alone(model, corpus, args, progress):
    """Rows of the second table: each adjoint solver on the trained model's adjoint."""
    windows = min(args.solve_windows, len(corpus.valid_x))
    tokens = tf.constant(corpus.valid_x[:windows])
    vjp, g = adjoint_problem(model, tokens, tf.constant(corpus.valid_y[:windows]))
    rows = []
    for scale in args.scales:
        for tol in args.solve_tols:
            for label, name, options, joint in solve_specs(args):
                solver = keras_deq.solvers.get(
                    name, max_iter=args.solve_max_iter, tol=tol, **options
                )
                per_position = common.per_entry(solver, 2, joint=joint)

                @tf.function(jit_compile=args.compile)
                def solve(g, solve_fn=per_position, scale=scale):
                    return solve_fn(lambda u: scale * vjp(u) + g, g)

                row = shared.timed_solve(solve, g, args)
                rows.append({"scale": scale, "tol": tol, "adjoint": label, **row})
                progress.advance()
    return rows


def print_training(rows):
    print(
        "| adjoint | bwd evals / step (first → last quarter) | bwd residual (last quarter) | "
        "fwd steps (last quarter) | ms / train step | train bpc (last quarter) | val bpc | "
        "val fwd steps |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['adjoint']} | {r['bwd'][0]:.1f} → {r['bwd'][1]:.1f} | {r['bwd_res']:.1e} | "
            f"{r['fwd']:.1f} | {r['ms_per_step']:.0f} | {r['train_bpc']:.3f} | "
            f"{r['val_bpc']:.3f} | {r['val_fwd']:.1f} |"
        )


def main(args):
    """The language-model benchmark, on the options `krylov_adjoint.main` parsed."""
    if args.quick:  # a few steps of a small model on the embedded text
        args.dataset, args.steps, args.seq_len, args.batch_size = "tiny", 4, 16, 8
        args.d_model, args.heads, args.solve_windows = 16, 2, 4
    # Windows side by side, as `language.py` cuts them (--quick: every start, for a few
    # batches out of a few lines).
    corpus = text_data.load(args.dataset, args.seq_len, stride=1 if args.quick else args.seq_len)
    n_valid = min(len(corpus.valid_x), args.valid_batches * args.batch_size)
    valid = (corpus.valid_x[:n_valid], corpus.valid_y[:n_valid])
    print(
        f"{args.dataset}: DEQ-Transformer LM, d_model {args.d_model}, {args.heads} heads, "
        f"per-position solves; forward Anderson; adjoints {args.adjoints} (GMRES restart "
        f"{args.restart}, Anderson window {args.window}); max_iter {args.max_iter}, tol "
        f"{args.tol}; {args.steps} steps x batch {args.batch_size} x {args.seq_len} chars, "
        f"seed {args.seeds[0]}; validation {n_valid} windows; {args.threads} thread(s)",
        flush=True,
    )
    began = time.perf_counter()
    steps = min(args.steps, len(corpus.train_x) // args.batch_size)
    units = steps + len(args.scales) * len(args.solve_tols) * len(solve_specs(args))
    with shared.Progress(units, unit_name="unit") as progress:
        train_rows, models = train(corpus, valid, args, progress)
        reference = "anderson" if "anderson" in args.adjoints else args.adjoints[0]
        solve_rows = solve_alone(models[reference], corpus, args, progress)
    print()
    print_training(train_rows)
    print()
    windows = min(args.solve_windows, len(corpus.valid_x))
    print(
        f"Adjoint solves on the model trained with the {reference} adjoint, {windows} "
        f"validation windows ({windows * args.seq_len} positions):"
    )
    print()
    shared.print_solves(solve_rows)
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    return {"train": train_rows, "solves": solve_rows}
