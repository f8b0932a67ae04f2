"""Implicit bias of a diagonal linear DEQ against a diagonal linear network (paper 004).

    python benchmarks/implicit_bias.py            # about 4.5 minutes on 2 shared CPU cores
    python benchmarks/implicit_bias.py --quick    # smoke run

Paper 004 characterizes the implicit regularization of gradient flow on a diagonal
linear DEQ and shows (its Fig. 2, 20 features) that DEQs learn denser features of
more uniform magnitude than FNNs. Its exact model, data and training were not
available offline; this is OUR STAND-IN:

- Data: underdetermined regression, x ~ N(0, I_d) with d = 20 and n = 10 training
  samples, y = <theta*, x> without noise; a sparse teacher (3 nonzero entries of
  size 1) and a dense one (every entry ±1/sqrt(d/3), the same norm). Test: 2000
  fresh samples.
- Diagonal linear DEQ: `keras_deq.DEQ` of the cell z -> lambda ⊙ z + x (lambda
  trainable, |lambda_i| <= 0.9 by `keras_deq.constraints.MaxAbs`, Anderson) and a
  linear readout beta: its predictor is theta_i = beta_i / (1 - lambda_i).
- Diagonal linear network (the FNN side): y = sum_i (u_i^2 - v_i^2) x_i, the
  two-layer diagonal network of Woodworth et al. (2020): from a small init its
  gradient flow tends to the minimum-l1 interpolator (sparse).
- Linear regression: y = <theta, x>, which gradient descent from 0 takes to the
  minimum-l2 interpolator (dense).

Initial scale alpha: DEQ lambda = 0 and beta = alpha; network u = v = alpha; linear
theta = 0. Full-batch gradient descent on the MSE. Reported per model, teacher and
seed: train MSE, test MSE / E[y^2], ||theta||_1 relative to the min-l1 interpolator's,
||theta||_2 relative to the min-l2 interpolator's, and the participation ratio
(sum |theta_i|)^2 / sum theta_i^2, between 1 and d: about the number of coefficients
in use, larger is denser (the analogue of the paper's Fig. 2 heat-maps, which show
the DEQ's 20 features with more uniform magnitudes than the FNN's).
"""

import argparse
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import linprog  # noqa: E402

import keras_deq  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from md_tables import markdown  # noqa: E402

MODELS = ("deq", "diag-net", "linear")


@keras.saving.register_keras_serializable(package="implicit_bias")
class DiagonalLinearCell(keras_deq.Cell):
    """z_next = lambda ⊙ z + x: the fixed point is z* = x / (1 - lambda)."""

    def __init__(self, max_abs=0.9, **kwargs):
        super().__init__(**kwargs)
        self.max_abs = max_abs

    def build(self, z_shape, x_shape):
        self.lam = self.add_weight(
            name="lam",
            shape=(z_shape[-1],),
            initializer="zeros",
            constraint=keras_deq.constraints.MaxAbs(self.max_abs),
        )

    def call(self, z, x):
        return self.lam * z + x

    def get_config(self):
        return {**super().get_config(), "max_abs": self.max_abs}


@keras.saving.register_keras_serializable(package="implicit_bias")
class DiagonalNetwork(keras.layers.Layer):
    """y = sum_i (u_i^2 - v_i^2) x_i: the two-layer diagonal linear network of
    Woodworth et al. (2020), whose gradient flow from a small init u = v = alpha
    tends to the minimum-l1 interpolator (and to minimum-l2 from a large init)."""

    def __init__(self, init=1.0, **kwargs):
        super().__init__(**kwargs)
        self.init = init

    def build(self, input_shape):
        init = keras.initializers.Constant(self.init)
        self.u = self.add_weight(name="u", shape=(input_shape[-1],), initializer=init)
        self.v = self.add_weight(name="v", shape=(input_shape[-1],), initializer=init)

    def call(self, x):
        theta = self.u * self.u - self.v * self.v
        return keras.ops.sum(theta * x, axis=-1, keepdims=True)

    def get_config(self):
        return {**super().get_config(), "init": self.init}


def build(model_type, d, alpha):
    readout = keras.layers.Dense(
        1, use_bias=False, kernel_initializer=keras.initializers.Constant(alpha), name="readout"
    )
    if model_type == "deq":
        first = keras_deq.DEQ(
            DiagonalLinearCell(),
            solver="anderson",
            max_iter=40,
            tol=1e-6,
            state_shape=(d,),
            on_failure="ignore",
            name="deq",
        )
    elif model_type == "diag-net":
        return keras.Sequential([keras.Input((d,)), DiagonalNetwork(alpha, name="diag")])
    elif model_type == "linear":
        first = None
        readout = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros", name="readout")
    else:
        raise ValueError(f"`model_type` must be one of {MODELS}. Received: {model_type!r}")
    layers = [keras.Input((d,))] + ([first] if first is not None else []) + [readout]
    return keras.Sequential(layers)


def predictor(model, model_type):
    """The linear predictor theta the model computes, and the DEQ's 1 / (1 - lambda)."""
    if model_type == "diag-net":
        layer = model.get_layer("diag")
        u, v = (keras.ops.convert_to_numpy(w).astype("float64") for w in (layer.u, layer.v))
        return u * u - v * v, None
    beta = keras.ops.convert_to_numpy(model.get_layer("readout").kernel)[:, 0].astype("float64")
    if model_type == "deq":
        lam = keras.ops.convert_to_numpy(model.get_layer("deq").cell.lam).astype("float64")
        return beta / (1.0 - lam), 1.0 / (1.0 - lam)
    return beta, None


def teacher(kind, d, rng):
    theta = np.zeros(d)
    idx = rng.choice(d, 3, replace=False)
    if kind == "sparse":
        theta[idx] = 1.0
    else:
        theta = rng.choice([-1.0, 1.0], d) * np.sqrt(3.0 / d)
    return theta


def min_l1_interpolator(x, y):
    """argmin ||theta||_1 s.t. x theta = y, by linear programming (theta = p - q)."""
    n, d = x.shape
    res = linprog(np.ones(2 * d), A_eq=np.hstack([x, -x]), b_eq=y, bounds=(0, None))
    return res.x[:d] - res.x[d:]


def participation(theta):
    return float(np.sum(np.abs(theta)) ** 2 / max(np.sum(theta**2), 1e-300))


def run(model_type, kind, seed, args):
    rng = np.random.default_rng(seed)
    theta_star = teacher(kind, args.d, rng)
    x = rng.normal(size=(args.n, args.d))
    x_test = rng.normal(size=(2000, args.d))
    y, y_test = x @ theta_star, x_test @ theta_star
    keras.utils.set_random_seed(seed)
    model = build(model_type, args.d, args.alpha)
    model.compile(optimizer=keras.optimizers.SGD(args.learning_rate), loss="mse")
    # Full-batch gradient descent: an "epoch" is `repeat` copies of the training set,
    # unshuffled, one copy per step (fewer, longer epochs than one step each).
    repeat = 100
    start = time.perf_counter()
    model.fit(
        np.tile(x, (repeat, 1)).astype("float32"),
        np.tile(y, repeat)[:, None].astype("float32"),
        batch_size=args.n,
        epochs=max(1, args.steps // repeat),
        shuffle=False,
        verbose=0,
    )
    elapsed = time.perf_counter() - start
    theta, inverse = predictor(model, model_type)
    l2 = np.linalg.pinv(x) @ y
    l1 = min_l1_interpolator(x, y)
    return {
        "model": model_type,
        "teacher": kind,
        "seed": seed,
        "train_mse": float(np.mean((x @ theta - y) ** 2)),
        "test_mse": float(np.mean((x_test @ theta - y_test) ** 2)),
        "rel_test_mse": float(np.mean((x_test @ theta - y_test) ** 2) / np.mean(y_test**2)),
        "l1_ratio": float(np.sum(np.abs(theta)) / np.sum(np.abs(l1))),
        "l2_ratio": float(np.linalg.norm(theta) / np.linalg.norm(l2)),
        "participation": participation(theta),
        "participation_l1": participation(l1),
        "participation_l2": participation(l2),
        "max_inverse": None if inverse is None else float(np.max(inverse)),
        "time_s": elapsed,
    }


def summary(rows):
    header = (
        "| teacher | model | seeds | train MSE | test MSE / E[y^2] | ‖θ‖₁ / min-l1 "
        "| ‖θ‖₂ / min-l2 | participation (min-l1, min-l2) | ratio of test MSE to DEQ |"
    )
    lines = []
    groups = {}
    for r in rows:
        groups.setdefault((r["teacher"], r["model"]), []).append(r)
    for (kind, model_type), g in groups.items():

        def med(key, g=g):
            return float(np.median([r[key] for r in g]))

        deq = [r["rel_test_mse"] for r in groups.get((kind, "deq"), [])]
        ratio = med("rel_test_mse") / np.median(deq) if deq else float("nan")
        lines.append(
            f"| {kind} | {model_type} | {','.join(str(r['seed']) for r in g)} "
            f"| {med('train_mse'):.2g} | {med('rel_test_mse'):.3g} | {med('l1_ratio'):.3g} "
            f"| {med('l2_ratio'):.3g} | {med('participation'):.3g} "
            f"({med('participation_l1'):.3g}, {med('participation_l2'):.3g}) "
            f"| {ratio:.3g} |"
        )
    return markdown(header, lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--d", type=int, default=20)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.01, help="initial scale")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=4000, help="full-batch GD steps")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--teachers", nargs="+", default=["sparse", "dense"])
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = 200, args.seeds[:1]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(
        f"d {args.d}, n {args.n}, init scale {args.alpha}, full-batch GD lr "
        f"{args.learning_rate}, {args.steps} steps, seeds {args.seeds}",
        flush=True,
    )
    start = time.perf_counter()
    rows = []
    for kind in args.teachers:
        for model_type in MODELS:
            for seed in args.seeds:
                r = run(model_type, kind, seed, args)
                rows.append(r)
                print(
                    f"  {kind:6s} {model_type:8s} seed {seed}  train {r['train_mse']:.2g}  "
                    f"test/E[y^2] {r['rel_test_mse']:.3g}  PR {r['participation']:.3g}  "
                    f"l1 ratio {r['l1_ratio']:.3g}  ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    print()
    print(summary(rows))
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
