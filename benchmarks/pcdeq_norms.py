"""pcDEQ against an unconstrained DEQ at large recurrent weight norms (paper 003 in miniature).

    python benchmarks/pcdeq_norms.py [--seeds 0 1 2] [--threads 1]
    python benchmarks/pcdeq_norms.py --quick   # seconds: a smoke run

Claim checked (Gabor et al., ICML 2024): a positive concave DEQ `z = tanh(W z + x~)` with
`W >= 0` and a positive injection `x~ = softplus_5(h)` has a unique fixed point that plain
fixed-point iteration reaches from `z0 = 0` whatever `||W||_2` is, while an unconstrained
DEQ `z = tanh(z W + h)` whose `||W||_2` is well above 1 is expansive and its iteration does
not converge.

1. Weight-norm sweep. For each target `||W||_2` and seed, the recurrent kernel of a width-64
   cell is set to a random matrix with exactly that spectral norm, and the layer's forward
   solve runs on the 360 digits test images (`h = x U`, `U` a seeded Glorot-uniform
   injection shared by every model), plain fixed-point iteration, `max_iter` 200, relative
   `tol` 1e-4. Models:

   - `pcdeq`: `keras_deq.PcDEQ(units=64)` (variant 1, tanh), `W` uniform in [0, 1) scaled
     to the norm.
   - `deq`: `keras_deq.DEQ(DenseCell(64, use_injection=False))`, `W` Gaussian scaled to
     the norm (the same `h`, a zero bias).
   - controls: `deq-anderson` (the same Gaussian `W`, Anderson instead of plain
     iteration), `deq-nonneg` (the plain DEQ with pcdeq's nonnegative `W`, signed
     injection `h`) and `pcdeq-signed` (the pcDEQ cell, positive injection, with the
     Gaussian `W`: outside the theorem).

   Columns: `conv` the fraction of samples whose residual met `tol`; `steps` the iterations
   the solver ran on the batch (until every sample met `tol`, or 200); `res` the mean
   relative residual returned; `sat` the mean `tanh'` at the returned state, `1 - z^2`
   (near 0: saturated units); `ratio` the plain DEQ's steps over pcDEQ's (`>` when the
   plain DEQ hit the cap).

2. Training. Dense(64) injection -> the DEQ -> Dense(10) on digits (1,437 train / 360
   test), Adam, both layers solved by fixed-point iteration forward and in the implicit
   backward (200 iterations, tol 1e-4), from the recurrent kernel the layer initializes
   itself (`init`: tiny nonnegative for pcDEQ, orthogonal with gain 0.5 for the DEQ) and
   from kernels with `||W||_2` 4 and 8 as in the sweep. Columns: fwd / bwd steps per train
   step (first and last epoch), the converged fraction in the last epoch and on the test
   set, test accuracy, `||W||_2` at the start and the end (paper's Fig. 4: pcDEQ's norm is
   not bounded by 1), and whether the weights became non-finite.
"""

import os
import pathlib
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import norm_sweep  # noqa: E402
from norm_sweep import scaled  # noqa: E402

import keras_deq  # noqa: E402

WIDTH = 64
SWEEP_MODELS = ("pcdeq", "deq", "deq-anderson", "deq-nonneg", "pcdeq-signed")
# Read by norm_sweep.main, with sweep, print_sweep, build_model and spectral_norm below.
TRAIN_MODELS = ("pcdeq", "deq")
START_LABEL = "start ‖W‖₂"  # the training table's first column
QUICK_START = "4"
QUICK_HELP = "norms 1 and 8, seed 0, one start, 1 epoch on 256 images"
SETTINGS = f"width {WIDTH}"  # printed first


def kernels(rng, norm):
    """A nonnegative (uniform) and a Gaussian `WIDTH x WIDTH` kernel, both of norm `norm`."""
    nonneg = scaled(rng.uniform(0.0, 1.0, (WIDTH, WIDTH)), norm)
    gaussian = scaled(rng.normal(size=(WIDTH, WIDTH)), norm)
    return nonneg, gaussian


def make_layer(model, args, name="deq"):
    """The DEQ layer of `model` (a `SWEEP_MODELS` name), not built."""
    common = dict(max_iter=args.max_iter, tol=args.tol, on_failure="ignore", name=name)
    if model.startswith("pcdeq"):
        return keras_deq.PcDEQ(units=WIDTH, variant=1, activation="tanh", **common)
    solver = "anderson" if model == "deq-anderson" else "fixed_point"
    cell = keras_deq.layers.DenseCell(WIDTH, use_injection=False)
    return keras_deq.DEQ(cell, solver=solver, **common)


def spectral_norm(layer):
    return float(np.linalg.norm(keras.ops.convert_to_numpy(layer.cell.kernel), 2))


def solve(model, kernel, h, args):
    """One forward solve of `model` with recurrent `kernel` on injections `h`."""
    layer = make_layer(model, args)
    layer.build(h.shape)
    layer.cell.kernel.assign(kernel)
    for metric in layer.metrics:
        metric.reset_state()
    z = keras.ops.convert_to_numpy(layer(h))
    stats = layer.solver_statistics()
    return {
        "conv": stats["converged"],
        "steps": stats["fwd_steps"],
        "res": stats["fwd_residual"],
        "sat": float(np.mean(1.0 - z**2)),
    }


def sweep(x_test, args, progress):
    """Rows `(norm, seed, {model: stats})` of the weight-norm sweep."""

    def point(norm, seed, rng, injection):
        h = x_test @ injection
        nonneg, gaussian = kernels(rng, norm)
        chosen = {"pcdeq": nonneg, "deq-nonneg": nonneg}
        return norm, seed, {m: solve(m, chosen.get(m, gaussian), h, args) for m in SWEEP_MODELS}

    return norm_sweep.sweep(x_test, WIDTH, args, progress, point, "||W||")


def build_model(model, start, seed, args):
    """Dense injection -> the DEQ -> Dense(10), the recurrent kernel set per `start`."""
    keras.utils.set_random_seed(seed)
    layer = make_layer(model, args)
    net = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(WIDTH, name="injection"),
            layer,
            keras.layers.Dense(10),
        ]
    )
    if start != "init":
        nonneg, gaussian = kernels(np.random.default_rng([seed, 2]), float(start))
        layer.cell.kernel.assign(nonneg if model == "pcdeq" else gaussian)
    net.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return net, layer


def ratio(deq, pcdeq):
    capped = deq["conv"] < 1.0
    return f"{'>' if capped else ''}{deq['steps'] / max(pcdeq['steps'], 1.0):.1f}"


def print_sweep(rows):
    print("| ‖W‖₂ | seed | pcDEQ conv | steps | res | sat | DEQ conv | steps | res | sat | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for norm, seed, s in rows:
        p, d = s["pcdeq"], s["deq"]
        print(
            f"| {norm:g} | {seed} | {p['conv']:.2f} | {p['steps']:.0f} | {p['res']:.1e} | "
            f"{p['sat']:.3f} | {d['conv']:.2f} | {d['steps']:.0f} | {d['res']:.1e} | "
            f"{d['sat']:.3f} | {ratio(d, p)} |"
        )
    print()
    controls = SWEEP_MODELS[2:]
    print("| ‖W‖₂ | seed | " + " | ".join(f"{m} conv | steps" for m in controls) + " |")
    print("|---:|---:|" + "---:|---:|" * len(controls))
    for norm, seed, s in rows:
        cells = " | ".join(f"{s[m]['conv']:.2f} | {s[m]['steps']:.0f}" for m in controls)
        print(f"| {norm:g} | {seed} | {cells} |")


def main(argv=None):
    return norm_sweep.main(argv, globals())


if __name__ == "__main__":
    main()
