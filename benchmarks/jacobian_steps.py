"""Jacobian regularization and solver steps at equal quality (paper 000's "2-3x fewer steps").

    python benchmarks/jacobian_steps.py --part lm [--steps 800] [--threads 1]
    python benchmarks/jacobian_steps.py --part vision [--vision-epochs 7] [--seeds 0 1]

Trains each model twice from the same initial weights and on the same batches,
without (`deq`, `mdeq`) and with (`deq+jr`, `mdeq+jr`) the Jacobian regularizer,
with a solver cap high enough (`--max-iter`) that a growing number of solver
steps is visible rather than clipped at the cap:

- `--part lm`: the DEQ-Transformer of benchmarks/language.py on character-level
  Shakespeare (Anderson forward, implicit backward). The regularized run follows
  the recipe of the paper's pre-LN WikiText-103 DEQ-Transformer: weight 2.0 applied
  with probability 0.4, plus 0.1 ten times over the run (the recipe adds 0.1 every
  30,000 of its 300,000 steps), set by `keras_deq.callbacks.JacobianRegularizationScheduler`.
  Every `--every` steps the validation set is evaluated.
- `--part vision`: the plain MDEQ of benchmarks/lipschitz_speedup.py on digits
  (`keras_deq.MultiscaleDEQ`, Anderson both ways), with the CIFAR-10 MDEQ recipe's
  weight 0.4 and frequency 0.02 scaled up to `--vision-frequency` (0.02 of digits'
  23 steps per epoch is one penalized step every two epochs); test set after every epoch.

The "steps at equal quality" are defined as follows. The target quality is the
best validation quality that both runs reach (the larger of the two runs' best
bits per character; the smaller of the two best accuracies). For each run, the
first evaluation at which it reaches the target gives (a) its forward and
backward solver steps per training batch over the preceding chunk (epoch), and
validation's forward steps, and (b) the solver steps summed over all training
batches up to that point (its training cost to reach the target). The ratios are
unregularized / regularized: above 1 means the regularizer needs fewer steps.
"""

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "language"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "vision"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import data as vision_data  # noqa: E402
import language  # noqa: E402
import lipschitz_speedup  # noqa: E402
import text_data  # noqa: E402
from progress import Progress  # noqa: E402

from keras_deq.callbacks import JacobianRegularizationScheduler, stepwise_schedule  # noqa: E402
from keras_deq.models import BitsPerCharacter, DEQTransformerLM  # noqa: E402


# ------------------------------------------------------------------ equal quality
def matched(curves, key, higher_is_better):
    """Steps of each run at the first evaluation where it reaches the common target.

    `curves[name]` is a list of evaluation records holding `key` (the quality),
    `fwd`, `bwd` (per training batch since the last evaluation), `val_fwd` and
    `cum_steps` (forward + backward steps summed over training so far). Returns
    `(target, {name: record})`; a run that never reaches the target is absent.
    """
    best = max if higher_is_better else min
    worst = min if higher_is_better else max
    target = worst(best(r[key] for r in run) for run in curves.values())
    reached = {}
    for name, run in curves.items():
        for r in run:
            if (r[key] >= target) if higher_is_better else (r[key] <= target):
                reached[name] = r
                break
    return target, reached


def ratio_row(label, target, reached, base, regularized):
    a, b = reached[base], reached[regularized]
    fields = ("fwd", "bwd", "val_fwd", "cum_steps")
    ratios = " | ".join(f"{a[k] / b[k]:.2f}" for k in fields)
    return (
        f"| {label} | {target:.4g} | {a['at']} / {b['at']} | "
        + " | ".join(f"{a[k]:.1f} / {b[k]:.1f}" for k in fields[:3])
        + f" | {a['cum_steps']:,.0f} / {b['cum_steps']:,.0f} | {ratios} |"
    )


def print_curves(columns, runs, quality):
    """Prints every evaluation of every run, the models of one evaluation in adjacent rows.

    `columns`: the leading header cells, then the name of the evaluation set; `runs` maps
    each run's leading cells (a tuple) to its curves `{model: records}`; `quality(record)`
    gives the record's quality cells.
    """
    *lead, evaluated = columns
    print("\n| " + " | ".join(lead) + f" | fwd steps | bwd steps | {evaluated} fwd steps |")
    print("|---" * (len(lead) + 3) + "|")
    for prefix, curves in runs.items():
        for k in range(len(next(iter(curves.values())))):
            for name, curve in curves.items():
                r = curve[k]
                cells = [*map(str, prefix), name, str(r["at"]), quality(r)]
                print(
                    "| " + " | ".join(cells) + f" | {r['fwd']:.1f} | {r['bwd']:.1f} | "
                    f"{r['val_fwd']:.1f} |"
                )


RATIO_HEADER = (
    "| run | target | reached at | fwd steps | bwd steps | val fwd steps | training steps "
    "to target | ratio fwd | ratio bwd | ratio val fwd | ratio to target |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


# ------------------------------------------------------------------ language model
def lm_models(args):
    options = language.variants(args)
    return {"deq": options["deq"], "deq+jr": options["deq+jr"]}


def train_lm(name, options, corpus, valid, args, progress):
    keras.utils.set_random_seed(args.seed)
    model = DEQTransformerLM(len(corpus.vocab), **options)
    model.build((None, None))  # same seed: same initial weights
    model.compile(
        optimizer=keras.optimizers.Adam(args.lr, clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[BitsPerCharacter()],
    )
    callbacks = [progress.callback()]
    if options.get("jacobian_weight"):
        every = max(1, args.steps // 10)
        schedule = stepwise_schedule(args.jac_weight, 0.1, every=every)
        callbacks.append(JacobianRegularizationScheduler(schedule, args.jac_frequency))
    curve, cum, size = [], 0.0, args.every * args.batch_size
    for start in range(0, args.steps * args.batch_size, size):
        x = corpus.train_x[start : start + size]
        y = corpus.train_y[start : start + size]
        history = model.fit(
            x, y, batch_size=args.batch_size, epochs=1, shuffle=False, verbose=0,
            callbacks=callbacks,
        )  # fmt: skip
        logs = {k: v[-1] for k, v in history.history.items()}
        batches = -(-len(x) // args.batch_size)
        cum += batches * (logs["deq_fwd_steps"] + logs["deq_bwd_steps"])
        test = model.evaluate(*valid, batch_size=args.batch_size, verbose=0, return_dict=True)
        curve.append(
            {
                "at": int(model.optimizer.iterations.numpy()),
                "bpc": test["bpc"],
                "train_bpc": logs["bpc"],
                "fwd": logs["deq_fwd_steps"],
                "bwd": logs["deq_bwd_steps"],
                "val_fwd": test["deq_fwd_steps"],
                "cum_steps": cum,
                "jacobian_weight": float(model.get_layer("deq").jacobian_weight),
            }
        )
        progress.print(
            f"  {name} step {curve[-1]['at']}: val bpc {test['bpc']:.3f}, fwd "
            f"{logs['deq_fwd_steps']:.1f}, bwd {logs['deq_bwd_steps']:.1f}, val fwd "
            f"{test['deq_fwd_steps']:.1f}"
        )
    return curve


def run_lm(args):
    corpus = text_data.load(args.dataset, args.seq_len, stride=args.seq_len)
    n_valid = min(len(corpus.valid_x), args.valid_batches * args.batch_size)
    valid = (corpus.valid_x[:n_valid], corpus.valid_y[:n_valid])
    steps = min(args.steps, len(corpus.train_x) // args.batch_size)
    args.steps = steps
    print(
        f"lm: {args.dataset}, {steps} steps x batch {args.batch_size} x {args.seq_len} chars, "
        f"evaluated every {args.every} steps on {n_valid} windows; anderson max_iter "
        f"{args.max_iter} (forward and adjoint), tol {args.tol}; deq+jr weight "
        f"{args.jac_weight} (+0.1 every {max(1, steps // 10)} steps), frequency "
        f"{args.jac_frequency}; seed {args.seed}; {args.threads} thread(s)",
        flush=True,
    )
    models = lm_models(args)
    curves = {}
    with Progress(len(models) * steps, unit_name="step") as progress:
        for name, options in models.items():
            curves[name] = train_lm(name, options, corpus, valid, args, progress)
    columns = ["model", "step", "val bpc", "train bpc", "val"]
    print_curves(columns, {(): curves}, lambda r: f"{r['bpc']:.3f} | {r['train_bpc']:.3f}")
    target, reached = matched(curves, "bpc", higher_is_better=False)
    print(f"\nequal quality: validation bpc <= {target:.4f} (the best both reach)")
    print(RATIO_HEADER)
    print(ratio_row(f"lm, seed {args.seed}", target, reached, "deq", "deq+jr"))
    last = {name: curve[-1] for name, curve in curves.items()}
    print(ratio_row("lm, end of training", float("nan"), last, "deq", "deq+jr"))
    return {"curves": curves, "target": target, "reached": reached}


# ------------------------------------------------------------------ vision
def vision_models(args):
    base = argparse.Namespace(**vars(args))
    base.max_iter, base.backward_max_iter = args.vision_max_iter, args.vision_max_iter
    models = {}
    for name, weight in (("mdeq", 0.0), ("mdeq+jr", args.vision_jac_weight)):
        base.mdeq_jacobian_weight = weight
        model = lipschitz_speedup.build("mdeq", base)
        if weight:
            model.get_layer("deq").jacobian_frequency = args.vision_frequency
        models[name] = model
    return models


def run_vision_seed(args, seed, progress):
    args = argparse.Namespace(**{**vars(args), "epochs": args.vision_epochs, "seed": seed})
    x_train, y_train, x_test, y_test = vision_data.load("digits", seed)
    models = vision_models(args)
    curves = {name: [] for name in models}
    mean = lipschitz_speedup.weighted_mean

    def evaluate(epoch, records):
        for name, model in models.items():
            steps = [r for r in records[name] if r["epoch"] == epoch]
            test = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
            cum = sum(r["deq_fwd_steps"] + r["deq_bwd_steps"] for r in records[name])
            curves[name].append(
                {
                    "at": epoch + 1,
                    "accuracy": test["accuracy"],
                    "fwd": mean(steps, "deq_fwd_steps"),
                    "bwd": mean(steps, "deq_bwd_steps"),
                    "val_fwd": test["deq_fwd_steps"],
                    "cum_steps": cum,
                    "converged": mean(steps, "deq_converged"),
                }
            )
            r = curves[name][-1]
            progress.print(
                f"  seed {seed} {name} epoch {epoch + 1}: test acc {r['accuracy']:.4f}, fwd "
                f"{r['fwd']:.1f}, bwd {r['bwd']:.1f}, test fwd {r['val_fwd']:.1f}"
            )

    lipschitz_speedup.train(models, x_train, y_train, args, progress, evaluate)
    return curves


def run_vision(args):
    print(
        f"vision: digits, MDEQ channels {args.channels}, anderson max_iter "
        f"{args.vision_max_iter} (forward and adjoint), tol {args.tol}; mdeq+jr weight "
        f"{args.vision_jac_weight}, frequency {args.vision_frequency}; {args.vision_epochs} "
        f"epochs, batch {args.batch_size_vision}; seeds {args.seeds}; {args.threads} thread(s)",
        flush=True,
    )
    args.batch_size = args.batch_size_vision
    per_epoch = -(-1437 // args.batch_size)  # digits' training split
    seeds = {}
    with Progress(len(args.seeds) * args.vision_epochs * per_epoch, unit_name="step") as progress:
        for seed in args.seeds:
            seeds[seed] = run_vision_seed(args, seed, progress)
    columns = ["seed", "model", "epoch", "test acc", "test"]
    runs = {(seed,): curves for seed, curves in seeds.items()}
    print_curves(columns, runs, lambda r: f"{r['accuracy']:.4f}")
    print("\nequal quality: test accuracy >= the best both runs of a seed reach")
    print(RATIO_HEADER)
    out = {}
    for seed, curves in seeds.items():
        target, reached = matched(curves, "accuracy", higher_is_better=True)
        print(ratio_row(f"vision, seed {seed}", target, reached, "mdeq", "mdeq+jr"))
        last = {name: curve[-1] for name, curve in curves.items()}
        print(ratio_row(f"vision, seed {seed}, last epoch", float("nan"), last, "mdeq", "mdeq+jr"))
        out[seed] = {"curves": curves, "target": target, "reached": reached}
    return {"seeds": out}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("lm", "vision"), required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the curves and matches here")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few steps")
    lm = parser.add_argument_group("language model")
    lm.add_argument("--steps", type=int, default=800)
    lm.add_argument("--every", type=int, default=50, help="steps between evaluations")
    language.add_model_arguments(lm)
    parser.set_defaults(max_iter=40, jac_weight=2.0, jac_frequency=0.4, solver_batch_dims=1)
    vision = parser.add_argument_group("vision")
    vision.add_argument("--vision-epochs", type=int, default=7)
    vision.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    vision.add_argument("--batch-size-vision", type=int, default=64)
    vision.add_argument("--channels", type=lipschitz_speedup.parse_channels, default=(8, 16))
    vision.add_argument("--vision-max-iter", type=int, default=30)
    vision.add_argument("--vision-jac-weight", type=float, default=0.4)
    vision.add_argument("--vision-frequency", type=float, default=0.35)
    vision.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args(argv)
    args.depth, args.solver = 4, "anderson"  # read by the shared model builders
    if args.quick:
        args.steps, args.every, args.valid_batches, args.dataset = 4, 2, 1, "tiny"
        args.batch_size, args.seq_len, args.d_model, args.max_iter = 4, 16, 16, 6
        args.vision_epochs, args.seeds, args.vision_max_iter, args.channels = 1, [0], 4, (4, 4)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    result = run_lm(args) if args.part == "lm" else run_vision(args)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        pathlib.Path(args.json).write_text(
            json.dumps(
                {"args": settings, "argv": argv or sys.argv[1:], **result}, indent=1, default=str
            )
        )
    return result


if __name__ == "__main__":
    main()
