"""Steep targets in dimension d: max |weight| of a DEQ against ReLU FNNs (paper 004, Fig. 4).

    python benchmarks/steep_separation.py                # d = 6, 8, ..., 20, seeds 0 1
    python benchmarks/steep_separation.py --quick        # smoke run, a few seconds per model
    python benchmarks/steep_separation.py --construction # the hand-set DEQ only
    python benchmarks/steep_separation.py --dims 6 20 --depths --weight-decay 0.1  # AdamW, no matched FNNs
    python benchmarks/steep_separation.py --delta-per-d 0.5 --dims 6 10 14 20   # δ = 2^(-d/2)

Paper 004 (Wu et al., NeurIPS 2024) shows that DEQs of polynomially bounded size and
weight magnitude approximate certain steep functions in L∞, while bounded-depth FNNs
need exponentially large weights; its Fig. 4 plots max |weight| of DEQ and FNN, at
comparable loss, for input dimensions d = 6, 8, ..., 20. Its Eq. 5 (the target) was
not available offline, so this is OUR STAND-IN:

- Target: the rescaled g_δ(x) = δ / (‖x‖² + δ) ∈ (0, 1] (the d-dimensional analogue
  of `examples/synthetic/tasks.py`'s `steep5` / `steep10`), δ = 2^-10 by default, on
  the unit ball of R^d. Its steepest slope, about 0.65 / sqrt(δ) at ‖x‖² = δ / 3,
  does not depend on d. With `--delta-per-d c`, δ = 2^(-c d) instead, so that the
  steepness grows with d (the paper's Eq. 5 may tie them; we could not read it).
- Samples: x = sqrt(t) u with u uniform on the sphere and t = ‖x‖² drawn, per sample
  with probability 1/2 each, uniformly on [0, 1] or log-uniformly on [δ / 16, 1], so
  that the steep region ‖x‖² ~ δ is seen in training and in the test set; the test
  set also holds x = 0 (the maximum, 1).
- DEQ: `keras_deq.DEQ` of `SteepCell`, the bilinear cell
  z -> z - q(x) ⊙ z + p(x), q(x) = (x ⊙ x) A + a, p(x) = x B + b, A, a >= 0, with
  `width` units and a linear readout. Its fixed point is z* = p(x) / q(x): with one
  unit, A = 1, a = δ, B = 0, b = δ and readout 1 it is exactly the target, with
  every weight at most 1 whatever δ and d (`construction`). `DenseCell` cannot form
  the product q(x) z. Plain iteration contracts at the rate max |1 - q(x)|, close to
  1 near x = 0; the map is diagonal and linear in z, so Anderson (window 5, per
  sample) solves it in about width + 1 steps. The cell has the target's form built
  in: this measures what the weights must be, not what a generic DEQ learns.
- FNNs: ReLU, depth 2, 3 and 4 (weight layers), width matched to the DEQ's
  trainable parameter count (`examples/synthetic/train.py`).
  Also a depth-3 FNN of width 32 (`--wide`), not matched, with many more
  parameters, to see the FNN's weights where its error comes near the DEQ's.
- Budget: Adam (learning rate 1e-2 with a cosine decay to 1e-4, batch 256), the same number of optimizer steps for
  every model, MSE loss, seeded.

Printed per d and model: test MSE, relative L∞ error (max |error| / max |y|), max
|weight| over the trainable weights, the DEQ's mean forward steps and converged
fraction; the median over the seeds; and the ratio FNN / DEQ of max |weight|, with
the ratio of their L∞ errors next to it (a weight ratio only means something where
the errors are comparable).
"""

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_deq  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "synthetic"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train as train_lib  # noqa: E402
from expressivity import median_result  # noqa: E402
from md_tables import fmt, markdown  # noqa: E402
from progress import Progress  # noqa: E402
from vs_torchdeq import set_threads  # noqa: E402

DIMS = (6, 8, 10, 12, 14, 16, 18, 20)
DEPTHS = (2, 3, 4)
NUMERIC = ("test_mse", "linf", "max_weight", "fwd_steps", "converged", "train_time_s")


# --------------------------------------------------------------------------- data
def steep_target(x, delta):
    """δ / (‖x‖² + δ), computed in float64 (`tasks.steep_fn` of ‖x‖², rescaled)."""
    sq = np.sum(np.asarray(x, dtype="float64") ** 2, axis=-1)
    return delta * train_lib.tasks_lib.steep_fn(sq, delta)


def ball_samples(n, d, delta, rng):
    """x = sqrt(t) u, u uniform on the sphere, t uniform on [0, 1] or log-uniform on
    [δ / 16, 1] (probability 1/2 each)."""
    u = rng.normal(size=(n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    log_t = rng.uniform(np.log(delta / 16), 0.0, size=n)
    t = np.where(rng.uniform(size=n) < 0.5, rng.uniform(size=n), np.exp(log_t))
    return np.sqrt(t)[:, None] * u


def steep_ball(d, delta, n_train=4096, n_test=1024, seed=0):
    """`(x_train, y_train, x_test, y_test)`, float32, y of shape (n, 1); x_test[0] = 0."""
    rng = np.random.default_rng(seed)
    x_train, x_test = ball_samples(n_train, d, delta, rng), ball_samples(n_test, d, delta, rng)
    x_test[0] = 0.0
    out = (
        x_train,
        steep_target(x_train, delta)[:, None],
        x_test,
        steep_target(x_test, delta)[:, None],
    )
    return tuple(a.astype("float32") for a in out)


# ------------------------------------------------------------------------- models
@keras.saving.register_keras_serializable(package="steep_separation")
class SteepCell(keras_deq.Cell):
    """z_next = z - q(x) ⊙ z + p(x), q(x) = (x ⊙ x) A + a, p(x) = x B + b.

    The map is linear in z with the diagonal Jacobian 1 - q(x); its fixed point is
    z* = p(x) / q(x). A and a are kept nonnegative, so q(x) >= a.

    Args:
        units: Width of the state z.
    """

    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def state_shape(self, input_shape):
        return (self.units,)

    def build(self, z_shape, x_shape):
        d, nonneg = x_shape[-1], keras.constraints.NonNeg()
        positive = keras.initializers.RandomUniform(0.1, 1.0)
        self.rate_kernel = self.add_weight(
            name="rate_kernel", shape=(d, self.units), initializer=positive, constraint=nonneg
        )
        self.rate_bias = self.add_weight(
            name="rate_bias", shape=(self.units,), initializer=positive, constraint=nonneg
        )
        self.input_kernel = self.add_weight(
            name="input_kernel", shape=(d, self.units), initializer="glorot_uniform"
        )
        self.input_bias = self.add_weight(
            name="input_bias", shape=(self.units,), initializer=positive
        )

    def rate(self, x):
        """q(x) = (x ⊙ x) A + a."""
        return keras.ops.matmul(x * x, self.rate_kernel) + self.rate_bias

    def call(self, z, x):
        p = keras.ops.matmul(x, self.input_kernel) + self.input_bias
        return z - self.rate(x) * z + p

    def compute_output_shape(self, z_shape, x_shape):
        return z_shape

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def deq_params(d, width):
    """SteepCell (A, B: d x w; a, b: w) plus the Dense(1) readout."""
    return 2 * d * width + 2 * width + width + 1


def build_deq(d, width=4, max_iter=30, tol=1e-5):
    return keras.Sequential(
        [
            keras.Input((d,)),
            keras_deq.DEQ(
                SteepCell(width),
                solver="anderson",
                max_iter=max_iter,
                tol=tol,
                on_failure="ignore",
                name="deq",
            ),
            # A positive start (1 / width): from a random sign, a one-unit DEQ can drive
            # A to 0 and stall at a flat fit.
            keras.layers.Dense(
                1, kernel_initializer=keras.initializers.Constant(1.0 / width), name="readout"
            ),
        ]
    )


def construction(model, delta):
    """Sets a width-1 DEQ of `build_deq` to the target: A = 1, a = δ, B = 0, b = δ,
    readout 1 and 0. Every weight is in [0, 1], whatever δ and d."""
    cell, readout = model.get_layer("deq").cell, model.get_layer("readout")
    d = cell.rate_kernel.shape[0]
    cell.rate_kernel.assign(np.ones((d, 1), "float32"))
    cell.rate_bias.assign(np.full((1,), delta, "float32"))
    cell.input_kernel.assign(np.zeros((d, 1), "float32"))
    cell.input_bias.assign(np.full((1,), delta, "float32"))
    readout.kernel.assign(np.ones((1, 1), "float32"))
    readout.bias.assign(np.zeros((1,), "float32"))
    return model


def construction_table(dims, log2_deltas, tol=1e-6):
    """The hand-set one-unit DEQ against the float64 target on each d's test set."""
    header = (
        "| d | δ | max abs weight | max abs error | max rel. error | 2^-24 / δ "
        "| fwd steps | converged |"
    )
    lines = []
    for d in dims:
        for log2_delta in log2_deltas:
            delta = 2.0**log2_delta
            model = build_deq(d, width=1, tol=tol)
            model.build((None, d))
            construction(model, delta)
            _, _, x, y = steep_ball(d, delta, 8, 1024, seed=0)
            out = keras.ops.convert_to_numpy(model(x)).astype("float64")[:, 0]
            err = np.abs(out - steep_target(x, delta))
            stats = model.get_layer("deq").solver_statistics()
            lines.append(
                f"| {d} | 2^{log2_delta:g} | {train_lib.max_abs_weight(model):g} "
                f"| {err.max():.2g} | {np.max(err / steep_target(x, delta)):.2g} "
                f"| {2.0**-24 / delta:.2g} | {stats['fwd_steps']:.1f} | {stats['converged']:.2f} |"
            )
    return markdown(header, lines)


def matched_fnn_width(d, depth, target):
    return min(range(1, 4096), key=lambda w: (abs(train_lib.fnn_params(d, w, depth) - target), w))


# ----------------------------------------------------------------------- training
def run(d, model_type, depth, seed, args, width=None):
    """Trains one model on the d-dimensional target; returns its test statistics."""
    keras.utils.set_random_seed(seed)
    match = "-" if model_type == "deq" else ("params" if width is None else "none")
    delta = delta_for(d, args)
    x_train, y_train, x_test, y_test = steep_ball(d, delta, args.n_train, 1024, seed)
    target = deq_params(d, args.deq_width)
    if model_type == "deq":
        model, width = build_deq(d, args.deq_width, args.max_iter), args.deq_width
        params = target
    else:
        width = width or matched_fnn_width(d, depth, target)
        model, params = train_lib.build_fnn(d, width, depth), train_lib.fnn_params(d, width, depth)
    assert train_lib.trainable_params(model) == params
    per_epoch = -(-args.n_train // args.batch_size)
    epochs = max(1, round(args.steps / per_epoch))
    schedule = keras.optimizers.schedules.CosineDecay(
        args.learning_rate, epochs * per_epoch, alpha=0.01
    )
    # AdamW's decay is decoupled and scaled by the schedule: w -= lr(t) weight_decay w.
    optimizer = (
        keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay)
        if args.weight_decay
        else keras.optimizers.Adam(schedule)
    )
    model.compile(optimizer=optimizer, loss="mse")
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=epochs, verbose=0)
    train_time = time.perf_counter() - start
    pred = keras.ops.convert_to_numpy(model.predict(x_test, batch_size=1024, verbose=0))
    stats = model.get_layer("deq").solver_statistics() if model_type == "deq" else {}
    err = pred.astype("float64") - y_test.astype("float64")
    return {
        "d": d,
        "delta": delta,
        "seed": seed,
        "model": "deq" if model_type == "deq" else f"fnn-L{depth}",
        "match": match,
        "width": width,
        "params": params,
        "test_mse": float(np.mean(err**2)),
        "linf": float(np.max(np.abs(err)) / np.max(np.abs(y_test))),
        "max_weight": train_lib.max_abs_weight(model),
        "fwd_steps": stats.get("fwd_steps"),
        "converged": stats.get("converged"),
        "train_time_s": train_time,
    }


def delta_for(d, args):
    """δ = 2^delta_log2, or 2^(-delta_per_d d) when the steepness grows with d."""
    return 2.0 ** (-args.delta_per_d * d if args.delta_per_d else args.delta_log2)


def configurations(wide, depths=DEPTHS):
    yield "deq", None, None
    for depth in depths:
        yield "fnn", depth, None
    for width in wide:
        yield "fnn", 3, width


def table(rows):
    deq = {r["d"]: r for r in rows if r["model"] == "deq"}
    header = (
        "| d | model | match | width | params | test MSE | rel. L∞ error | max abs weight "
        "| FNN/DEQ max abs weight | FNN/DEQ L∞ | DEQ fwd steps | DEQ converged | time s |"
    )
    lines = []
    for r in rows:
        ref = deq.get(r["d"])
        is_fnn = r["model"] != "deq" and ref is not None
        lines.append(
            f"| {r['d']} | {r['model']} | {r['match']} | {r['width']} | {r['params']} | {fmt(r['test_mse'])} "
            f"| {fmt(r['linf'])} | {fmt(r['max_weight'])} "
            f"| {fmt(r['max_weight'] / ref['max_weight'] if is_fnn else None)} "
            f"| {fmt(r['linf'] / ref['linf'] if is_fnn else None)} "
            f"| {fmt(r['fwd_steps'], '.1f')} | {fmt(r['converged'], '.2f')} "
            f"| {fmt(r['train_time_s'], '.1f')} |"
        )
    return markdown(header, lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny budget: smoke run only")
    parser.add_argument(
        "--construction", action="store_true", help="only the hand-set DEQ's table (seconds)"
    )
    parser.add_argument("--dims", nargs="+", type=int, default=list(DIMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--delta-log2", type=float, default=-10.0, help="δ = 2^this")
    parser.add_argument(
        "--delta-per-d",
        type=float,
        default=None,
        help="δ = 2^(-this d) instead: the steepness grows with d (0.5: δ = 2^-3 at d = 6, "
        "2^-10 at d = 20)",
    )
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per model")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--deq-width", type=int, default=4)
    parser.add_argument("--max-iter", type=int, default=30)
    parser.add_argument(
        "--wide", nargs="*", type=int, default=[32], help="widths of extra depth-3 FNNs"
    )
    parser.add_argument("--depths", nargs="*", type=int, default=list(DEPTHS))
    parser.add_argument(
        "--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay"
    )
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="TF threads (0: TF's own)")
    parser.add_argument("--json", help="also write every per-seed result to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.n_train, args.dims, args.seeds = 16, 512, args.dims[:1], args.seeds[:1]
    if args.threads:
        set_threads(args.threads)
    if args.construction:
        print(construction_table(args.dims, (-5, -10)))
        return None
    steepness = f"2^(-{args.delta_per_d:g} d)" if args.delta_per_d else f"2^{args.delta_log2:g}"
    print(
        f"δ = {steepness}, dims {args.dims}, seeds {args.seeds}, {args.steps} Adam "
        f"steps (lr {args.learning_rate}, batch {args.batch_size}), DEQ width {args.deq_width}, "
        f"anderson max_iter {args.max_iter}, threads {args.threads}",
        flush=True,
    )
    rows, raw, start = [], [], time.perf_counter()
    configs = list(configurations(args.wide, args.depths))
    runs = len(args.dims) * len(configs) * len(args.seeds)
    with Progress(runs, unit_name="run") as progress:
        for d in args.dims:
            for model_type, depth, width in configs:
                results = []
                for seed in args.seeds:
                    results.append(run(d, model_type, depth, seed, args, width))
                    progress.advance()
                raw.extend(results)
                row = {**median_result(results, NUMERIC), "seeds": args.seeds}
                rows.append(row)
                progress.print(
                    f"  d={d:<3d}{row['model']:7s} w={row['width']:<3d} MSE {row['test_mse']:.3g}"
                    f"  L∞ {row['linf']:.3g}  max|w| {row['max_weight']:.3g}"
                    f"  ({time.perf_counter() - start:.0f} s)"
                )
    print()
    print(table(rows))
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")
    out = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows, "runs": raw}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
