"""monDEQ against an unconstrained DEQ at large weight norms (Winston & Kolter, NeurIPS 2020).

    python benchmarks/mondeq_norms.py [--seeds 0 1 2] [--threads 1]
    python benchmarks/mondeq_norms.py --quick   # seconds: a smoke run

Claim checked: the monotone operator DEQ `z = relu(W z + U x + b)` with
`W = (1 - m) I - A^T A + B - B^T` has a unique equilibrium for every `A`, `B`, and
operator splitting (Peaceman-Rachford, forward-backward with its step `m / L^2`) converges
to it whatever their norms; plain iteration of the same equation, and an unconstrained
ReLU DEQ whose `||W||_2` is well above 1, do not converge.

1. Weight-norm sweep. For each norm `s` and seed, `A` and `B` (width 64) are Gaussian
   matrices scaled to spectral norm `s` (so `||W||_2` is about `s^2`), `m = 0.1`, and each
   model solves on the 360 test images with the same injection `x U` (`U` seeded
   Glorot-uniform, `b = 0`), by fixed-point iteration of its map (at most 200
   iterations, relative tol 1e-4):
   - `pr`: `keras_deq.MonDEQ(64)`, Peaceman-Rachford (step `1 / sqrt(m L)`);
   - `fb`: `MonDEQ(64, splitting="forward_backward")` (step `m / L^2`);
   - `same-W`: the same equation iterated as it is, `z <- relu(z W^T + x U)` (a `DEQ` of a
     `DenseCell(64, "relu")` holding the monDEQ's `W`);
   - `deq`: that `DEQ` with a Gaussian `W` of spectral norm `s` (unconstrained);
   - controls on the same equation: `same-W-anderson` (Anderson, window 5), and
     `same-W-km` (`FixedPoint(damping=alpha)` with `fb`'s step: the averaging outside the
     relu, `z + alpha (relu(W z + u) - z)`, which the theory does not cover).
   Columns: `conv` (fraction of samples whose residual met tol), `steps` (iterations the
   solver ran on the batch), `err` (the distance of the returned `z` to the equation's
   unique solution `z*`, `max |z - z*| / max |z*|`, `z*` by Peaceman-Rachford in NumPy
   float64 to 1e-13; `inf`: `z` not finite).

2. Training. `MonDEQ(64)` -> `Dense(10)` against `DEQ(DenseCell(64, "relu"))` -> `Dense(10)`
   on digits (1,437 train / 360 test), Adam 1e-3, forward and implicit backward by
   fixed-point iteration (200 iterations, tol 1e-4), from each layer's own initialization
   (`init`) and from weights of norm 4 and 8 drawn as in the sweep (`A`, `B` for monDEQ,
   `W` for the DEQ). Columns: fwd / bwd steps per train step (first and last epoch), the
   converged fraction in the last epoch and on the test set, test accuracy, `||W||_2` at
   the start and the end, and whether the weights stayed finite.
"""

import os
import pathlib
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import norm_sweep  # noqa: E402
from norm_sweep import scaled  # noqa: E402

import keras_deq  # noqa: E402

WIDTH = 64
MONOTONICITY = 0.1
SWEEP_MODELS = ("pr", "fb", "same-W", "deq", "same-W-anderson", "same-W-km")
# Read by norm_sweep.main, with sweep, print_sweep, build_model and spectral_norm below.
TRAIN_MODELS = ("mondeq", "deq")
START_LABEL = "start norm"  # the training table's first column
QUICK_START = "8"
QUICK_HELP = "norms 1 and 8, seed 0, one start (8), 1 epoch on 256 images"
SETTINGS = f"width {WIDTH}, m {MONOTONICITY}"  # printed first


def weight_matrix(a, b):
    """The monDEQ's `W` (column-vector convention), float64."""
    a, b = a.astype("float64"), b.astype("float64")
    return (1 - MONOTONICITY) * np.eye(WIDTH) - a.T @ a + b - b.T


def make_layer(model, args, damping=1.0, jit_compile="auto"):
    """The layer of `model` (a sweep or training model name), not built."""
    common = dict(
        max_iter=args.max_iter,
        tol=args.tol,
        on_failure="ignore",
        name="deq",
        jit_compile=jit_compile,
    )
    if model in ("pr", "mondeq"):
        return keras_deq.MonDEQ(WIDTH, monotonicity=MONOTONICITY, **common)
    if model == "fb":
        return keras_deq.MonDEQ(
            WIDTH, monotonicity=MONOTONICITY, splitting="forward_backward", **common
        )
    solver, options = "fixed_point", {}
    if model == "same-W-anderson":
        solver = "anderson"
    elif model == "same-W-km":
        options = {"damping": damping}
    cell = keras_deq.layers.DenseCell(WIDTH, activation="relu")
    return keras_deq.DEQ(
        cell, solver=solver, solver_options=options, state_shape=(WIDTH,), **common
    )


def spectral_norm(layer):
    """`||W||_2` of the layer's recurrent matrix."""
    if isinstance(layer, keras_deq.MonDEQ):
        kernel = layer.cell.weight_matrix()
    else:
        kernel = layer.cell.kernel
    kernel = keras.ops.convert_to_numpy(kernel)
    return float(np.linalg.norm(kernel, 2)) if np.all(np.isfinite(kernel)) else float("nan")


def forward_backward_step(a, b):
    """The forward-backward step `m / L_up^2` that `MonotoneCell` takes for `A`, `B`."""
    cell = keras_deq.layers.MonotoneCell(
        WIDTH, monotonicity=MONOTONICITY, splitting="forward_backward"
    )
    cell.build((None, WIDTH), (None, WIDTH))
    cell.kernel_a.assign(a)
    cell.kernel_b.assign(b)
    return float(cell.step_size())


def solve(model, weights, x, injection, args, damping=1.0):
    """One forward solve of `model` on `x`; `weights` are `(A, B)` or the DEQ's `W`, and
    `injection` is `U` (`b = 0`); `damping`: `same-W-km`'s. Returns the statistics and
    the returned `z`."""
    # A graph, its solve not compiled apart: one solve per layer, so XLA's compilation
    # would cost more than it saves.
    layer = make_layer(model, args, damping, jit_compile=False)
    layer.build(x.shape)
    cell = layer.cell
    cell.injection_kernel.assign(injection)
    cell.bias.assign(np.zeros(WIDTH, "float32"))
    if isinstance(layer, keras_deq.MonDEQ):
        cell.kernel_a.assign(weights[0])
        cell.kernel_b.assign(weights[1])
    else:
        cell.kernel.assign(weights)
    call = tf.function(layer)
    z = keras.ops.convert_to_numpy(call(x)).astype("float64")
    stats = layer.solver_statistics()
    return stats, z


def reference_equilibrium(w, u, max_steps=20000):
    """The unique `z = relu(W z + u)` (rows of `u`), by Peaceman-Rachford in NumPy float64
    (step `1 / sqrt(m ||I - W||_2)`) until the iterates stop moving (1e-13, relative)."""
    k = np.eye(WIDTH) - w
    alpha = 1.0 / np.sqrt(MONOTONICITY * np.linalg.norm(k, 2))
    resolvent = np.linalg.inv(np.eye(WIDTH) + alpha * k).T
    v = np.zeros_like(u)
    for _ in range(max_steps):
        reflected = 2.0 * np.maximum(v, 0.0) - v
        v_next = 2.0 * (reflected + alpha * u) @ resolvent - reflected
        done = np.abs(v_next - v).max() <= 1e-13 * np.abs(v_next).max()
        v = v_next
        if done:
            break
    z = np.maximum(v, 0.0)
    assert np.abs(z - np.maximum(z @ w.T + u, 0.0)).max() <= 1e-9 * np.abs(z).max()
    return z


def error(z, reference):
    """`max |z - z*| / max |z*|` (inf where z is not finite)."""
    if not np.all(np.isfinite(z)):
        return float("inf")
    return float(np.abs(z - reference).max() / np.abs(reference).max())


def sweep(x_test, args, progress):
    """Rows `(norm, seed, ||W||_2, {model: stats})` of the weight-norm sweep."""

    def point(norm, seed, rng, injection):
        a = scaled(rng.normal(size=(WIDTH, WIDTH)), norm)
        b = scaled(rng.normal(size=(WIDTH, WIDTH)), norm)
        gaussian = scaled(rng.normal(size=(WIDTH, WIDTH)), norm)
        w = weight_matrix(a, b)
        same = w.T.astype("float32")  # z W^T on rows
        weights = {"pr": (a, b), "fb": (a, b), "deq": gaussian}
        u = x_test.astype("float64") @ injection.astype("float64")
        reference = reference_equilibrium(w, u)
        alpha = forward_backward_step(a, b)
        stats = {}
        for model in SWEEP_MODELS:
            s, z = solve(model, weights.get(model, same), x_test, injection, args, alpha)
            stats[model] = {
                "conv": s["converged"],
                "steps": s["fwd_steps"],
                # The DEQ with a Gaussian W solves another equation.
                "err": float("nan") if model == "deq" else error(z, reference),
            }
        return norm, seed, float(np.linalg.norm(w, 2)), stats

    return norm_sweep.sweep(x_test, WIDTH, args, progress, point, "||A||, ||B||")


def build_model(model, start, seed, args):
    """The layer -> Dense(10); its recurrent weights set per `start`."""
    keras.utils.set_random_seed(seed)
    layer = make_layer(model, args)
    net = keras.Sequential([keras.Input((64,)), layer, keras.layers.Dense(10)])
    if start != "init":
        rng = np.random.default_rng([seed, 2])
        a = scaled(rng.normal(size=(WIDTH, WIDTH)), float(start))
        b = scaled(rng.normal(size=(WIDTH, WIDTH)), float(start))
        if model == "mondeq":
            layer.cell.kernel_a.assign(a)
            layer.cell.kernel_b.assign(b)
        else:
            layer.cell.kernel.assign(a)
    net.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return net, layer


def print_sweep(rows):
    main = SWEEP_MODELS[:4]
    print(
        "| ‖A‖₂ = ‖B‖₂ | seed | ‖W‖₂ | "
        + " | ".join(f"{m} conv | steps | err" for m in main)
        + " |"
    )
    print("|---:|---:|---:|" + "---:|---:|---:|" * len(main))
    for norm, seed, w_norm, s in rows:
        cells = " | ".join(
            f"{s[m]['conv']:.2f} | {s[m]['steps']:.0f} | {s[m]['err']:.1e}" for m in main
        )
        print(f"| {norm:g} | {seed} | {w_norm:.1f} | {cells} |")
    print()
    controls = SWEEP_MODELS[4:]
    print(
        "| ‖A‖₂ = ‖B‖₂ | seed | " + " | ".join(f"{m} conv | steps | err" for m in controls) + " |"
    )
    print("|---:|---:|" + "---:|---:|---:|" * len(controls))
    for norm, seed, _, s in rows:
        cells = " | ".join(
            f"{s[m]['conv']:.2f} | {s[m]['steps']:.0f} | {s[m]['err']:.1e}" for m in controls
        )
        print(f"| {norm:g} | {seed} | {cells} |")


def main(argv=None):
    return norm_sweep.main(argv, globals())


if __name__ == "__main__":
    main()
