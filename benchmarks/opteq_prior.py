"""OptEq: does a prior help? The prior chosen on a validation split, then a paired test.

    python benchmarks/opteq_prior.py [--seeds 8] [--epochs 10] [--threads 1]
    python benchmarks/opteq_prior.py --quick      # seconds: a smoke run

The must-show of `benchmarks/opteq_unroll.py` compared OptEq with and without a
prior chosen from a sweep scored on the test set. Here the test set plays no part
in the choice:

1. A validation split (`--validation` of the training digits, stratified, fixed
   seed `--split-seed`) is held out; every model trains on the rest.
2. Every candidate of `--grid` (prior, mode, strength) and the model without
   prior are trained with seeds 0 .. `--seeds` - 1 (the same seed gives the same
   initialization and batch order to every candidate).
3. The candidate with the highest mean validation accuracy is chosen.
4. The chosen prior's test accuracy is compared with the no-prior model's, seed
   by seed: the mean paired difference with a 95% t-interval, the sign test and
   the Wilcoxon signed-rank test (scipy).

The model is the dense digits OptEq of `examples/vision/opteq_cifar10.py` (alpha
0.8, unrolled K = 20), as in the must-show.
"""

import argparse
import math
import os
import pathlib
import re
import sys
import types

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "vision"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import data  # noqa: E402
import opteq_unroll  # noqa: E402
from progress import Progress  # noqa: E402

GRID = (  # the must-show's prior, and the next two of its exploratory sweep
    "decorrelation:sam:0.05",
    "decorrelation:structural:0.05",
    "l2:structural:0.3",
)
NO_PRIOR = "none"


def parse_candidate(text):
    """`prior:mode:strength` as `OptEqBlock` arguments."""
    try:
        prior, mode, strength = text.split(":")
        return {"prior": prior, "prior_mode": mode, "prior_strength": float(strength)}
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"a candidate is prior:mode:strength, e.g. decorrelation:sam:0.05; got {text!r}"
        ) from error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--validation", type=float, default=0.2, help="of the training digits")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--grid", nargs="+", default=list(GRID), help="prior:mode:strength")
    parser.add_argument("--threads", type=int, default=1, help="0: leave TensorFlow's")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1 epoch, 1 candidate")
    parser.add_argument(
        "--skip-baseline",
        action="store_true",
        help="train the grid only (no report): to share a run between processes, see --merge",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="LOG",
        help="no training: the report from the per-run lines of these runs' outputs",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.grid = 2, 1, args.grid[:1]
    for text in args.grid:
        try:
            parse_candidate(text)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    # What `opteq_unroll.build` reads besides the block options.
    args.kind, args.solver, args.max_iter, args.kernel_gain = "dense", "broyden", 50, None
    return args


def splits(args):
    """`(fit, validation, test)`, each a pair `(x, y)`; validation is stratified."""
    x_train, y_train, x_test, y_test = data.load("digits", seed=0)
    x_fit, x_val, y_fit, y_val = train_test_split(
        x_train,
        y_train,
        test_size=args.validation,
        stratify=y_train,
        random_state=args.split_seed,
    )
    return (x_fit, y_fit), (x_val, y_val), (x_test, y_test)


def train_candidates(args, fit_set, val_set, test_set, progress):
    """`{candidate: {"val": [...], "test": [...]}}`, one accuracy per seed."""
    results = {}
    for name in args.grid if args.skip_baseline else [NO_PRIOR, *args.grid]:
        options = {} if name == NO_PRIOR else parse_candidate(name)
        results[name] = {"val": [], "test": []}
        for seed in range(args.seeds):
            model = opteq_unroll.build(args, seed, **options)
            val, seconds = opteq_unroll.fit(model, (*fit_set, *val_set), args, seed, progress)
            test = model.evaluate(*test_set, batch_size=256, verbose=0)[1]
            results[name]["val"].append(val)
            results[name]["test"].append(test)
            progress.print(
                f"  {name}, seed {seed}: val {val:.4f}, test {test:.4f} ({seconds:.0f} s)"
            )
    return results


def paired(differences):
    """Mean, 95% t-interval, sign test and Wilcoxon p-values of paired differences."""
    from scipy import stats

    d = np.asarray(differences, dtype=np.float64)
    n, mean = len(d), float(d.mean())
    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    sign_p = float(stats.binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0
    wilcoxon_p = float(stats.wilcoxon(d).pvalue) if wins + losses else 1.0
    return {
        "mean": mean,
        "low": mean - half,
        "high": mean + half,
        "wins": wins,
        "ties": n - wins - losses,
        "losses": losses,
        "sign_p": sign_p,
        "wilcoxon_p": wilcoxon_p,
    }


def _percent(values):
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1 if len(values) > 1 else 0):.2f}"


def report(results, progress):
    """Prints the selection table and the paired test; returns the chosen and the test."""
    candidates = [name for name in results if name != NO_PRIOR]
    chosen = max(candidates, key=lambda name: np.mean(results[name]["val"]))  # first on ties
    progress.print()
    progress.print("| Model | Validation acc. (mean ± std) | Test acc. (mean ± std) | Chosen |")
    progress.print("|---|---|---|---|")
    for name, r in results.items():
        mark = "yes" if name == chosen else ""
        progress.print(f"| {name} | {_percent(r['val'])}% | {_percent(r['test'])}% | {mark} |")
    base, best = results[NO_PRIOR]["test"], results[chosen]["test"]
    test = paired([b - a for a, b in zip(base, best, strict=True)])
    progress.print()
    progress.print("| Seed | No prior | " + chosen + " | Difference |")
    progress.print("|---|---|---|---|")
    for seed, (a, b) in enumerate(zip(base, best, strict=True)):
        progress.print(f"| {seed} | {100 * a:.2f}% | {100 * b:.2f}% | {100 * (b - a):+.2f} |")
    progress.print()
    progress.print(
        f"chosen on validation: {chosen}; test accuracy, chosen - no prior over "
        f"{len(base)} seeds: mean {100 * test['mean']:+.2f} points, 95% t-interval "
        f"[{100 * test['low']:+.2f}, {100 * test['high']:+.2f}]; "
        f"wins/ties/losses {test['wins']}/{test['ties']}/{test['losses']}, "
        f"sign test p = {test['sign_p']:.3f}, Wilcoxon p = {test['wilcoxon_p']:.3f}"
    )
    return chosen, test


def merge(paths):
    """`train_candidates`' results from the per-run lines of saved outputs."""
    pattern = re.compile(r"^  (\S+), seed (\d+): val ([\d.]+), test ([\d.]+)", re.MULTILINE)
    runs = {}
    for path in paths:
        for name, seed, val, test in pattern.findall(pathlib.Path(path).read_text()):
            runs.setdefault(name, {})[int(seed)] = (float(val), float(test))
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in runs.values())))
    return {  # the seeds every candidate has, no prior first
        name: {"val": [by_seed[s][0] for s in seeds], "test": [by_seed[s][1] for s in seeds]}
        for name, by_seed in sorted(runs.items(), key=lambda item: item[0] != NO_PRIOR)
    }


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        results = merge(args.merge)
        print(
            f"merged from {', '.join(args.merge)}: "
            + ", ".join(f"{name} ({len(r['val'])} seeds)" for name, r in results.items())
        )
        chosen, test = report(results, types.SimpleNamespace(print=print))
        return {"results": results, "chosen": chosen, "paired": test}
    opteq_unroll.set_threads(args.threads)
    fit_set, val_set, test_set = splits(args)
    print(
        f"digits: {len(fit_set[0])} fit / {len(val_set[0])} validation (stratified, split seed "
        f"{args.split_seed}) / {len(test_set[0])} test; dense OptEq, alpha={args.alpha}, "
        f"{args.epochs} epochs, seeds 0-{args.seeds - 1}, threads={args.threads}"
    )
    batches = -(-len(fit_set[0]) // args.batch_size) * args.epochs
    with Progress((1 + len(args.grid)) * args.seeds * batches, unit_name="step") as progress:
        results = train_candidates(args, fit_set, val_set, test_set, progress)
        if args.skip_baseline:
            return {"results": results}
        chosen, test = report(results, progress)
    return {"results": results, "chosen": chosen, "paired": test}


if __name__ == "__main__":
    main()
