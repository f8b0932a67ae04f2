"""Training recipes for a width-10 ReLU DEQ on the 32-piece sawtooth, against FNNs.

    python benchmarks/expressivity_recipe.py             # full run, about 20 minutes
    python benchmarks/expressivity_recipe.py --quick     # smoke run, about 2 minutes
    python docs/figures/make_figures.py --only expressivity_recipe   # the run, table and figure
    python benchmarks/expressivity_recipe.py --recipes tied tied-curriculum --seeds 0 1 2
    python benchmarks/expressivity_recipe.py --deq-width 40 --recipes nilpotent-curriculum \
        --reference nilpotent-curriculum --seeds 0 --steps 6000   # a wider DEQ, longer

Issue 17: in `benchmarks/expressivity.py` the width-10 DEQ ends at the constant
predictor on the sawtooth t^{∘5} (test MSE = the target's variance, 1/12), although
`examples/synthetic/construction.py` shows a hand-set width-10 DEQ that is exactly
t^{∘5}. This benchmark tries recipes that move training towards that solution and
compares the DEQ with ReLU FNNs trained by the same recipe.

Every model: the same data (t^{∘k} on uniform x, 3584 train / 512 validation /
1024 test points), Adam with a linear warm-up and a cosine decay
(`keras.optimizers.schedules.CosineDecay`), batch 256, the same number of
optimizer steps, MSE loss; the first layer's (DEQ: the injection's) biases put
each neuron's kink at a uniform point of [0, 1] (b = -u s, s ~ U(0, 1)), the other
hidden biases are drawn from U(-0.5, 0.5) (the `baseline` DEQ keeps zero biases), one row per seed. Reported: validation and test MSE divided by
the target's variance on that split (1.0 = predicting the mean, 0 = exact), and
"best by validation", the test score of the seed with the lowest validation MSE
(the selection never sees the test set).

DEQ recipes (all `keras_deq.DEQ(DenseCell(10, "relu"))` with a `Dense(1)` readout):

- `baseline`: `benchmarks/expressivity.py`'s DEQ (dense W, orthogonal init,
  Anderson, 30 iterations) with zero biases, under this benchmark's schedule.
- `nilpotent`: W kept strictly upper triangular (z W, row vectors) by a Keras
  constraint, so the cell is nilpotent: every W gives a well-posed DEQ, and plain
  fixed-point iteration (`"fixed_point"`) reaches the exact fixed point in at
  most 11 steps, forward and adjoint. He-style init on the allowed entries.
- `block`: W restricted to the construction's pattern: 5 levels of 2 neurons,
  level j reads only level j - 1, only level 1 reads x. The 2x2 blocks and the
  biases are free; each block starts at the identity plus N(0, 0.1^2) noise, so
  that every level starts alive (a random block often leaves a level dead on all
  of [0, 1], and everything above it constant).
- `tied`: `block` with every level's 2x2 block and bias kept equal by a
  constraint (projection onto the tied subspace after each step): one 2-neuron
  map g applied 5 times, the weight tying a DEQ has by nature.
- `*-curriculum`: the same model trained on t^{∘1}, t^{∘2}, ..., t^{∘k} in turn
  (the final k gets half the steps, the earlier ones share the rest), one
  schedule over all phases.
- `*-levelwise`: the curriculum with the readout restricted, in phase j, to level
  j (a mask constraint switched between phases; level j starts with level j - 1's
  readout weights): level j is taught t^{∘j}. With tied levels, once g = t on the
  first levels every higher level already computes the next composition.

FNN comparators (`--fnn-depths`, ReLU, equal hidden widths, linear readout), trained
by the recipe `fnn-curriculum` (the curriculum over pieces; `fnn`: without it), with
the width matched to the DEQ's 131 trainable parameters, or to the DEQ's FLOPs per
forward pass: (solver steps) x (FLOPs of one cell evaluation, 240), the steps
measured on the test set after training the `--reference` recipe (at most 11 for
the nilpotent ones), so FLOP-matched FNNs are several times larger than
parameter-matched ones. Also `fnn (narrow)`: depth k + 1 and width 2, the FNN that
represents t^{∘k} exactly (31 parameters for k = 5); the `block` DEQ is this
network with a readout over every level.
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

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_deq  # noqa: E402

SYNTHETIC = pathlib.Path(__file__).resolve().parents[1] / "examples" / "synthetic"
sys.path.insert(0, str(SYNTHETIC))
import tasks as tasks_lib  # noqa: E402
import train as train_lib  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from md_tables import fmt, markdown  # noqa: E402

DEQ_RECIPES = (
    "baseline",
    "nilpotent",
    "nilpotent-curriculum",
    "block",
    "block-curriculum",
    "tied",
    "tied-curriculum",
    "block-levelwise",
    "tied-levelwise",
)
# The recipes of the recorded run (`block` and `tied` without a curriculum were
# tried in exploration runs and did no better).
DEFAULT_RECIPES = (
    "baseline",
    "nilpotent",
    "nilpotent-curriculum",
    "block-curriculum",
    "tied-curriculum",
    "block-levelwise",
    "tied-levelwise",
)
FNN_RECIPES = ("fnn", "fnn-curriculum")
WIDTH = 10
PER_LEVEL = 2


# -------------------------------------------------------------- constraints
@keras.saving.register_keras_serializable(package="expressivity_recipe")
class Mask(keras.constraints.Constraint):
    """Zeroes the entries of a weight outside a fixed 0/1 mask."""

    def __init__(self, mask):
        # A `keras.Variable` mask is read when the constraint runs (it may change
        # between phases of training); anything else is a constant.
        self.mask = mask if isinstance(mask, keras.Variable) else np.asarray(mask, "float32")

    def __call__(self, w):
        return w * keras.ops.cast(self.mask, w.dtype)

    def get_config(self):
        return {"mask": keras.ops.convert_to_numpy(self.mask).tolist()}


@keras.saving.register_keras_serializable(package="expressivity_recipe")
class TiedLevels(keras.constraints.Constraint):
    """Projects a weight onto 'every level the same': a chain kernel (levels*m,
    levels*m) whose level-(j-1)-to-j blocks are equal (all else 0), or a bias
    (levels*m,) whose per-level pieces are equal."""

    def __init__(self, levels, per_level):
        self.levels, self.per_level = int(levels), int(per_level)

    def __call__(self, w):
        n, m = self.levels, self.per_level
        if len(w.shape) == 1:
            mean = keras.ops.mean(keras.ops.reshape(w, (n, m)), axis=0)
            return keras.ops.tile(mean, (n,))
        blocks = [w[(j - 1) * m : j * m, j * m : (j + 1) * m] for j in range(1, n)]
        mean = sum(blocks) / float(n - 1)
        shift = np.eye(n, k=1, dtype="float32")  # level j-1 -> level j
        return keras.ops.convert_to_tensor(
            np.kron(shift, np.ones((m, m), "float32")), w.dtype
        ) * keras.ops.tile(mean, (n, n))

    def get_config(self):
        return {"levels": self.levels, "per_level": self.per_level}


def structure(recipe, width=WIDTH, per_level=PER_LEVEL):
    """(kernel mask, injection mask) of a DEQ recipe, or (None, None) for dense W."""
    if recipe.startswith("nilpotent"):
        return np.triu(np.ones((width, width), "float32"), 1), None
    if recipe.startswith(("block", "tied")):
        levels = width // per_level
        kernel = np.kron(np.eye(levels, k=1), np.ones((per_level, per_level))).astype("float32")
        injection = np.zeros((1, width), "float32")
        injection[0, :per_level] = 1.0
        return kernel, injection
    return None, None


# ------------------------------------------------------------------- models
def build_deq(recipe, seed, width=WIDTH, max_iter=None):
    kernel_mask, injection_mask = structure(recipe, width)
    nilpotent = kernel_mask is not None
    cell = keras_deq.DenseCell(width, activation="relu")
    deq = keras_deq.DEQ(
        cell,
        # A nilpotent W: plain iteration is exact after at most `width` steps (the
        # (width + 1)-th sees a zero residual); the adjoint solve likewise.
        solver="fixed_point" if nilpotent else "anderson",
        max_iter=max_iter or (width + 1 if nilpotent else 30),
        tol=1e-6 if nilpotent else 1e-4,
        stop_mode="abs" if nilpotent else "rel",
        state_shape=(width,),
        on_failure="ignore",
        name="deq",
    )
    model = keras.Sequential([keras.Input((1,)), deq, keras.layers.Dense(1, name="readout")])
    rng = np.random.default_rng(seed)
    if nilpotent:
        # He-style init on the allowed entries: each neuron's fan-in is its number of
        # incoming z-entries plus x's.
        fan_in = kernel_mask.sum(axis=0) + (1.0 if injection_mask is None else injection_mask[0])
        std = np.sqrt(2.0 / np.maximum(fan_in, 1.0))
        kernel = rng.normal(size=(width, width)) * std * kernel_mask
        if injection_mask is not None:
            # Chain of 2x2 blocks: each block starts near the identity, so every
            # level starts as a copy of the one below (ReLU keeps nonnegative
            # inputs), not as a random map that may be dead on all of [0, 1].
            levels = width // PER_LEVEL
            eye = np.kron(np.eye(levels, k=1), np.eye(PER_LEVEL))
            kernel = eye + 0.1 * rng.normal(size=(width, width)) * kernel_mask
        cell.kernel.assign(kernel)
        u = rng.normal(size=(1, width)) * std
        cell.injection_kernel.assign(u if injection_mask is None else u * injection_mask)
        cell.kernel.constraint = Mask(kernel_mask)
        if injection_mask is not None:
            cell.injection_kernel.constraint = Mask(injection_mask)
    if not recipe.startswith("baseline"):
        cell.bias.assign(kink_biases(keras.ops.convert_to_numpy(cell.injection_kernel)[0], rng))
    if recipe.startswith("tied"):
        levels, m = width // PER_LEVEL, PER_LEVEL
        tie = TiedLevels(levels, m)
        cell.kernel.constraint, cell.bias.constraint = tie, tie
        # Start tied: every level gets level 2's initial block and level 1's biases
        # (an average of independent draws would shrink the init).
        kernel = keras.ops.convert_to_numpy(cell.kernel)
        block = kernel[:m, m : 2 * m]
        cell.kernel.assign(np.kron(np.eye(levels, k=1), block).astype("float32"))
        cell.bias.assign(np.tile(keras.ops.convert_to_numpy(cell.bias)[:m], levels))
    return model


def kink_biases(u, rng):
    """Biases that put the kink of relu(u x + b) at a uniform point of [0, 1] (the
    data's range) where u != 0, and U(-0.5, 0.5) where u = 0."""
    s = rng.uniform(0.0, 1.0, size=u.shape)
    return np.where(u != 0, -u * s, rng.uniform(-0.5, 0.5, size=u.shape)).astype("float32")


def build_fnn(width, depth, seed):
    model = train_lib.build_fnn(1, width, depth)
    rng = np.random.default_rng(seed)
    first, *hidden = model.layers[:-1]
    first.bias.assign(kink_biases(keras.ops.convert_to_numpy(first.kernel)[0], rng))
    for layer in hidden:
        layer.bias.assign(rng.uniform(-0.5, 0.5, size=layer.bias.shape))
    return model


def deq_params(width=WIDTH):
    return train_lib.deq_params(1, width)


def deq_cell_flops(width=WIDTH):
    return train_lib.deq_flops_per_iteration(1, width)


def fnn_width_matching(depth, target, count):
    return min(range(1, 4096), key=lambda w: (abs(count(1, w, depth) - target), w))


# ----------------------------------------------------------------- training
def phases(k, curriculum, steps):
    """[(pieces exponent, optimizer steps)] of a run."""
    if not curriculum or k == 1:
        return [(k, steps)]
    final = steps // 2
    early = (steps - final) // (k - 1)
    return [(j, early) for j in range(1, k)] + [(k, steps - early * (k - 1))]


def split(k, seed, n_train, n_val, n_test):
    x_all, _, x_test, _ = tasks_lib.sawtooth(k, n_train + n_val, n_test, seed)
    x_train, x_val = x_all[:n_train], x_all[n_train:]
    return x_train, x_val, x_test


def target(x, k):
    return tasks_lib.sawtooth_fn(x[:, 0], k)[:, None].astype("float32")


def relative_mse(model, x, k, batch):
    pred = keras.ops.convert_to_numpy(model.predict(x, batch_size=batch, verbose=0))
    y = target(x, k).astype("float64")
    return float(np.mean((pred - y) ** 2) / np.var(y))


def readout_masks(k, width=WIDTH, per_level=PER_LEVEL):
    """Per level j = 1..k, the 0/1 mask of the readout rows that read level j."""
    masks = []
    for j in range(k):
        mask = np.zeros((width, 1), "float32")
        mask[j * per_level : (j + 1) * per_level] = 1.0
        masks.append(mask)
    return masks


def train(model, k, curriculum, seed, args, levelwise=False):
    x_train, x_val, x_test = split(k, seed, args.n_train, args.n_val, args.n_test)
    per_epoch = -(-len(x_train) // args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=args.learning_rate / 10,
        decay_steps=max(1, args.steps - args.warmup),
        alpha=0.01,
        warmup_target=args.learning_rate,
        warmup_steps=args.warmup,
    )
    if levelwise:
        # Phase j reads out level j only: the readout's mask is a variable that the
        # compiled train step reads, switched between phases; the next level starts
        # with the previous level's readout weights.
        readout = model.get_layer("readout")
        masks = readout_masks(k, model.get_layer("readout").kernel.shape[0])
        mask = keras.Variable(masks[0], trainable=False, name="readout_mask")
        readout.kernel.constraint = Mask(mask)
        readout.kernel.assign(readout.kernel * masks[0])
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")
    start, phase_scores = time.perf_counter(), []
    for j, steps in phases(k, curriculum or levelwise, args.steps):
        y_train = target(x_train, j)
        if levelwise:
            w = keras.ops.convert_to_numpy(readout.kernel)
            prev = w[masks[j - 2][:, 0] > 0] if j > 1 else w[masks[0][:, 0] > 0]
            new = np.zeros_like(w)
            new[masks[j - 1][:, 0] > 0] = prev
            mask.assign(masks[j - 1])
            readout.kernel.assign(new)
        epochs = max(1, round(steps / per_epoch))
        model.fit(x_train, y_train, batch_size=args.batch_size, epochs=epochs, verbose=0)
        phase_scores.append(relative_mse(model, x_train, j, len(x_train)))
    train_time = time.perf_counter() - start
    return {
        "train": relative_mse(model, x_train, k, len(x_train)),
        "val": relative_mse(model, x_val, k, len(x_val)),
        "test": relative_mse(model, x_test, k, len(x_test)),
        "train_time_s": train_time,
        "phases": phase_scores,
        "x_test": x_test,
    }


def run_deq(recipe, seed, args):
    keras.utils.set_random_seed(seed)
    model = build_deq(recipe, seed, width=args.deq_width)
    out = train(
        model,
        args.k,
        recipe.endswith("curriculum"),
        seed,
        args,
        levelwise=recipe.endswith("levelwise"),
    )
    # `evaluate` resets the metrics first: the statistics are the test set's (one batch).
    x_test = out["x_test"]
    model.evaluate(x_test, target(x_test, args.k), batch_size=len(x_test), verbose=0)
    stats = model.get_layer("deq").solver_statistics()
    steps = stats["fwd_steps"]
    return model, {
        "model": "deq",
        "recipe": recipe,
        "seed": seed,
        "width": args.deq_width,
        "depth": None,
        "params": deq_params(args.deq_width),
        "flops": round(steps * deq_cell_flops(args.deq_width)),
        "fwd_steps": steps,
        "converged": stats["converged"],
        **{key: out[key] for key in ("train", "val", "test", "train_time_s", "phases")},
    }


def run_fnn(recipe, seed, width, depth, match, args):
    keras.utils.set_random_seed(seed)
    model = build_fnn(width, depth, seed)
    out = train(model, args.k, recipe.endswith("curriculum"), seed, args)
    return model, {
        "model": f"fnn-L{depth}",
        "recipe": f"{recipe} ({match})",
        "seed": seed,
        "width": width,
        "depth": depth,
        "params": train_lib.fnn_params(1, width, depth),
        "flops": train_lib.fnn_flops(1, width, depth),
        "fwd_steps": None,
        "converged": None,
        **{key: out[key] for key in ("train", "val", "test", "train_time_s", "phases")},
    }


# ------------------------------------------------------------------- report
def per_seed_table(rows):
    header = (
        "| model | recipe | seed | width | params | FLOPs/forward | DEQ steps "
        "| train MSE/var | val MSE/var | test MSE/var | time s |"
    )
    lines = []
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['seed']} | {r['width']} | {r['params']} "
            f"| {r['flops']} | {fmt(r['fwd_steps'], '.0f')} | {fmt(r['train'])} "
            f"| {fmt(r['val'])} | {fmt(r['test'])} | {fmt(r['train_time_s'], '.0f')} |"
        )
    return markdown(header, lines)


def summary(rows, reference):
    """Per (model, recipe): median and min test MSE/var over seeds, the test score of
    the seed best on validation, and that score's ratio to the reference DEQ row's."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["recipe"], r["width"]), []).append(r)
    best = {key: min(g, key=lambda r: r["val"]) for key, g in groups.items()}
    ref = best.get(reference)
    header = (
        "| model | recipe | width | params | FLOPs/forward | seeds | median test MSE/var "
        "| min test MSE/var | best-by-val seed | its test MSE/var | ratio to DEQ "
        f"{reference[1]} |"
    )
    lines = []
    for key, g in groups.items():
        tests = [r["test"] for r in g]
        b = best[key]
        ratio = b["test"] / ref["test"] if ref and ref["test"] > 0 else None
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {g[0]['params']} | {g[0]['flops']} "
            f"| {','.join(str(r['seed']) for r in g)} | {np.median(tests):.3g} "
            f"| {min(tests):.3g} | {b['seed']} | {b['test']:.3g} | {fmt(ratio)} |"
        )
    return markdown(header, lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny budget: smoke run only")
    parser.add_argument("--k", type=int, default=5, help="sawtooth t^k (2^k pieces)")
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), choices=DEQ_RECIPES)
    parser.add_argument("--fnn-recipe", default="fnn-curriculum", choices=FNN_RECIPES)
    parser.add_argument("--fnn-depths", nargs="+", type=int, default=[3, 6])
    parser.add_argument(
        "--reference",
        default="nilpotent",
        help="DEQ recipe the FNNs are FLOP-matched to and the ratios refer to",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per model")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--n-train", type=int, default=3584)
    parser.add_argument("--n-val", type=int, default=512)
    parser.add_argument("--n-test", type=int, default=1024)
    parser.add_argument("--no-fnn", action="store_true", help="DEQ recipes only")
    parser.add_argument(
        "--deq-width",
        type=int,
        default=WIDTH,
        help="DEQ width (even: the block and tied recipes use levels of 2 neurons)",
    )
    parser.add_argument("--json", help="also write the rows and the best fits to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.seeds = 60, 10, args.seeds[:1]
    reference = args.reference if args.reference in args.recipes else args.recipes[-1]

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(
        f"sawtooth t^{args.k} ({2**args.k} pieces); {args.steps} Adam steps, warm-up "
        f"{args.warmup} then cosine from lr {args.learning_rate}, batch {args.batch_size}; "
        f"seeds {args.seeds}",
        flush=True,
    )
    start = time.perf_counter()
    rows, fits = [], {}
    grid = np.linspace(0.0, 1.0, 2049, dtype="float32")[:, None]

    def record(model, row):
        rows.append(row)
        print(
            f"  {row['model']:7s} {row['recipe']:24s} seed {row['seed']}  "
            f"val {row['val']:.3g}  test {row['test']:.3g}  steps {fmt(row['fwd_steps'], '.0f')}  "
            f"train MSE/var after each phase {' '.join(f'{v:.2g}' for v in row['phases'])}  "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        key = (row["model"], row["recipe"])
        if key not in fits or row["val"] < fits[key]["val"]:
            pred = keras.ops.convert_to_numpy(model.predict(grid, batch_size=len(grid), verbose=0))
            fits[key] = {"val": row["val"], "seed": row["seed"], "y": pred[:, 0].tolist()}

    for recipe in args.recipes:
        for seed in args.seeds:
            record(*run_deq(recipe, seed, args))
    if not args.no_fnn:
        ref_rows = [r for r in rows if r["recipe"] == reference] or rows
        ref_steps = float(np.median([r["fwd_steps"] for r in ref_rows]))
        flop_target = ref_steps * deq_cell_flops(args.deq_width)
        for depth in args.fnn_depths:
            for match, tgt, count in (
                ("params", deq_params(args.deq_width), train_lib.fnn_params),
                ("flops", flop_target, train_lib.fnn_flops),
            ):
                width = fnn_width_matching(depth, tgt, count)
                for seed in args.seeds:
                    record(*run_fnn(args.fnn_recipe, seed, width, depth, match, args))
        for seed in args.seeds:
            record(*run_fnn(args.fnn_recipe, seed, 2, args.k + 1, "narrow", args))

    ref_key = ("deq", reference, args.deq_width)
    print()
    print(per_seed_table(rows))
    print()
    print(summary(rows, ref_key))
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")
    if args.json:
        payload = {
            "args": {k: v for k, v in vars(args).items()},
            "rows": rows,
            "grid": grid[:, 0].tolist(),
            "fits": {f"{m}|{r}": v for (m, r), v in fits.items()},
        }
        pathlib.Path(args.json).write_text(json.dumps(payload, indent=1))
    return rows


if __name__ == "__main__":
    main()
