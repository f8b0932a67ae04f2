"""Draws the documentation's figures from their data files (matplotlib, Agg).

Each figure `NAME` has its data in `docs/images/NAME.json` (written by `make_figures.py`,
which runs the experiments) and its picture in `docs/images/NAME.png`, drawn here from that
file alone. Drawing is deterministic (fixed size, dpi, fonts and style, no timestamp), so
`tests/test_figures.py` can redraw every PNG from its JSON and compare: a committed PNG never
shows other numbers than its data file.

    python docs/figures/render.py            # redraw every PNG from its JSON (a second)
"""

import json
import pathlib
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

IMAGES = pathlib.Path(__file__).resolve().parents[1] / "images"
DPI = 100
# One style for every figure, independent of the user's matplotlibrc.
STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.framealpha": 0.9,
    "savefig.dpi": DPI,
    "figure.dpi": DPI,
    "path.simplify": False,
}
COLORS = {
    "fixed_point": "C0",
    "anderson": "C2",
    "anderson (window 3)": "C1",
    "anderson (window 5)": "C2",
    "anderson (window 8)": "C4",
    "broyden (memory 20)": "C3",
    "plain": "C0",
    "regularized": "C3",
    "implicit": "C2",
    "unrolled": "C3",
    "mdeq": "C0",
    "lipschitz": "C2",
}


def _save(fig, path):
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)


def solver_residuals(record, path):
    """Relative residual of each iterate, per solver, on the trained digits map."""
    data = record["data"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, stat, title in zip(
        axes, ("max", "median"), ("worst of the test samples", "median test sample"), strict=True
    ):
        for name, trace in data["traces"].items():
            steps = range(1, len(trace[stat]) + 1)
            ax.semilogy(steps, trace[stat], label=name, color=COLORS.get(name), lw=1.4)
        for tol in data["tols"]:
            ax.axhline(tol, color="0.4", ls="--", lw=0.8)
            ax.text(len(trace[stat]), tol, f" tol {tol:g}", va="bottom", ha="right", fontsize=7)
        ax.set_title(f"relative residual, {title}")
        ax.set_xlabel("iteration (evaluations of f)")
    axes[0].set_ylabel(r"$\|f(z_k) - z_k\| \,/\, \|f(z_k)\|$")
    axes[1].legend(loc="upper right")
    fig.tight_layout()
    _save(fig, path)


def solver_trace(record, path):
    """`DEQ.solver_trace`: each sample's relative residual per iteration, and the batch mean."""
    data = record["data"]
    traces = data["traces"]
    fig, axes = plt.subplots(1, len(traces), figsize=(9, 3.2), sharey=True)
    for ax, (name, trace) in zip(axes, traces.items(), strict=True):
        rows = np.array([[np.nan if v is None else v for v in r] for r in trace["per_sample"]])
        steps = np.arange(rows.shape[1])
        for i, row in enumerate(rows):
            ax.semilogy(steps, row, color="0.75", lw=0.7, label="each sample" if i == 0 else None)
        ax.semilogy(steps, rows.mean(axis=0), color=COLORS.get(name), lw=2, label="batch mean")
        ax.axhline(data["tol"], color="0.4", ls="--", lw=0.8)
        ax.set_title(f"{name}: {trace['steps']} iterations, {data['samples']} samples")
        ax.set_xlabel("iteration k")
        ax.legend(loc="upper right")
    axes[0].set_ylabel(r"$\|f(z_k) - z_k\| \,/\, \|f(z_k)\|$")
    fig.tight_layout()
    _save(fig, path)


def jacobian_regularization(record, path):
    """Forward and backward steps, ||J||_F^2 / d and test accuracy per epoch, with and
    without the Jacobian penalty."""
    data = record["data"]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    for name, run in data["runs"].items():
        epochs = range(1, len(run["fwd_steps"]) + 1)
        style = {"color": COLORS.get(name), "marker": "o", "ms": 3, "lw": 1.4}
        axes[0].plot(epochs, run["fwd_steps"], label=f"{run['label']}: forward", **style)
        axes[0].plot(epochs, run["bwd_steps"], label=f"{run['label']}: backward", ls=":", **style)
        axes[1].semilogy(epochs, run["jacobian_frobenius"], label=run["label"], **style)
        axes[2].plot(epochs, [100 * a for a in run["test_accuracy"]], label=run["label"], **style)
    axes[0].set_title("solver steps per train batch (mean)")
    axes[0].set_ylim(bottom=0)
    axes[1].set_title(r"$\|J\|_F^2 / d$ at $z^\star$, test set")
    axes[2].set_title("test accuracy (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="lower left" if ax is axes[0] else "best")
    fig.tight_layout()
    _save(fig, path)


def _memory_axes(ax, results, xlabel, labels):
    for mode, label in labels.items():
        rows = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["iters"])
        x = [r["iters"] for r in rows]
        peak = [r["peak"] for r in rows]
        low = [r["peak"] - r["low"] for r in rows]
        high = [r["high"] - r["peak"] for r in rows]
        ax.errorbar(
            x, peak, yerr=[low, high], label=label, color=COLORS[mode], marker="o", ms=4, capsize=3
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("peak MiB of one training step")
    ax.set_ylim(bottom=0)
    ax.legend()


def memory_dense(record, path):
    """Peak training memory against solver iterations, implicit vs unrolled backward."""
    data = record["data"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    _memory_axes(
        ax,
        data["results"],
        "solver iterations N (forward; and adjoint, implicit)",
        {"implicit": "DEQ (implicit backward)", "unrolled": "unrolled backprop"},
    )
    ax.set_title(f"Dense DEQ, width {data['width']}, batch {data['batch']}, fixed point")
    fig.tight_layout()
    _save(fig, path)


def memory_transformer(record, path):
    """Peak training memory against depth: DEQ-Transformer vs explicit Transformer."""
    data = record["data"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    _memory_axes(
        ax,
        data["results"],
        "depth / solver iterations N",
        {"implicit": "DEQ-Transformer (implicit)", "unrolled": "explicit weight-tied Transformer"},
    )
    ax.set_title(
        f"DEQTransformerLM, d_model {data['width']}, {data['batch']} x {data['seq_len']} tokens"
    )
    fig.tight_layout()
    _save(fig, path)


def _seed_style(k):
    """The marker and line style of the `k`-th seed's curves."""
    return {"marker": "osd^v"[k % 5], "ls": ("-", "--", ":", "-.")[k % 4]}


def multiscale_lipschitz(record, path):
    """Solver steps and test accuracy per epoch, plain MDEQ vs Lipschitz multiscale DEQ, for
    each seed, and each seed's speed-ups."""
    data = record["data"]
    runs = data["runs"]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.3))
    labels = {"mdeq": "MDEQ", "lipschitz": "Lipschitz MDEQ"}
    for k, run_ in enumerate(runs):
        for name, records in run_["epochs"].items():
            run = {key: [epoch[key] for epoch in records] for key in records[0]}
            epochs = range(1, len(records) + 1)
            style = {"color": COLORS.get(name), "ms": 3, "lw": 1.2, **_seed_style(k)}
            label = labels[name] + (f", seed {run_['seed']}" if len(runs) > 1 else "")
            axes[0].plot(epochs, run["fwd_steps"], label=label, **style)
            axes[1].plot(epochs, run["bwd_steps"], label=label, **style)
            axes[2].plot(epochs, [100 * a for a in run["test_accuracy"]], label=label, **style)
    axes[0].axhline(data["max_iter"], color="0.4", ls="--", lw=0.8)
    axes[1].axhline(data["backward_max_iter"], color="0.4", ls="--", lw=0.8)
    axes[0].set_title(f"forward steps per batch (cap {data['max_iter']})")
    axes[1].set_title(f"adjoint steps per batch (cap {data['backward_max_iter']})")
    axes[2].set_title("test accuracy (%)")
    for ax in axes[:2]:
        ax.set_ylim(bottom=0)
    for ax in axes[:3]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=7)
    _speedups(axes[3], runs, data["medians"])
    fig.tight_layout()
    _save(fig, path)


def _speedups(ax, runs, medians):
    """MDEQ / Lipschitz ratios per seed (points) and their median (bar)."""
    keys = {
        "step": "train\nstep",
        "infer": "inference",
        "fwd": "forward\nsteps",
        "bwd": "adjoint\nsteps",
    }
    ax.bar(range(len(keys)), [medians[k] for k in keys], color="C2", alpha=0.35, label="median")
    for k, run_ in enumerate(runs):
        x = np.arange(len(keys)) + 0.12 * (k - (len(runs) - 1) / 2)
        marker = _seed_style(k)["marker"]
        ax.plot(
            x,
            [run_["ratios"][key] for key in keys],
            marker,
            color="C2",
            ms=4,
            label=f"seed {run_['seed']}",
        )
    ax.axhline(1, color="0.4", lw=0.8)
    ax.set_xticks(range(len(keys)), list(keys.values()), fontsize=8)
    ax.set_title("speed-up, MDEQ / Lipschitz (×)")
    ax.legend(fontsize=7)


def synthetic_fits(record, path):
    """Target and learned functions on the 1-D synthetic tasks: DEQ vs FNN."""
    data = record["data"]
    tasks = data["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.2))
    for ax, (task, fits) in zip(axes, tasks.items(), strict=True):
        ax.plot(fits["x"], fits["target"], color="0.6", lw=2.5, label="target")
        for name, fit in fits["models"].items():
            ax.plot(
                fits["x"], fit["prediction"], lw=1.2, label=f"{name} (MSE {fit['test_mse']:.2g})"
            )
        ax.set_xscale(fits["xscale"])
        ax.set_title(task)
        ax.set_xlabel("x" + (" (log scale)" if fits["xscale"] == "log" else ""))
        ax.legend(loc="upper right")
    fig.tight_layout()
    _save(fig, path)


def pcdeq_norms(record, path):
    """Converged fraction and forward iterations against the recurrent weight's norm:
    pcDEQ against unconstrained DEQs (median over the seeds, their range as bars)."""
    rows = record["data"]["sweep"]
    labels = {
        "pcdeq": "pcDEQ",
        "deq": "DEQ, fixed point",
        "deq-anderson": "DEQ, Anderson",
        "deq-nonneg": "DEQ, pcDEQ's W >= 0",
        "pcdeq-signed": "pcDEQ cell, signed W",
    }
    norms = sorted({r["norm"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for k, model in enumerate(labels):
        for ax, key, scale in zip(axes, ("conv", "steps"), (100, 1), strict=True):
            values = [
                [scale * r["models"][model][key] for r in rows if r["norm"] == n] for n in norms
            ]
            mid = np.array([np.median(v) for v in values])
            err = np.array([mid - [min(v) for v in values], [max(v) for v in values] - mid])
            style = {
                "lw": 2.2 if model == "pcdeq" else 1.2,
                "color": f"C{(3, 0, 1, 2, 4)[k]}",
            }
            ax.errorbar(
                norms, mid, yerr=err, marker="o", ms=3.5, capsize=2, label=labels[model], **style
            )
    axes[0].set_title("samples converged to tol (%)")
    axes[1].set_title(f"forward iterations (cap {record['data']['max_iter']})")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("||W||_2 at the start")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def steep_separation(record, path):
    """Max |weight| and relative L∞ error against the input dimension d: DEQ vs FNNs
    (paper 004's Fig. 4 in our stand-in), median over the seeds with their range."""
    runs = record["data"]["runs"]
    models = sorted(
        {(r["model"], r["match"], r["width"] if r["match"] == "none" else 0) for r in runs}
    )
    models.sort(key=lambda m: (m[0] != "deq", m[1] == "none", m[0]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in zip(
        axes,
        ("max_weight", "linf"),
        ("max |weight| (trainable weights)", "relative L∞ test error"),
        strict=True,
    ):
        fnn_colors = iter(("C0", "C1", "C2", "C4", "C5", "C6"))
        for model, match, width in models:
            mine = [r for r in runs if (r["model"], r["match"]) == (model, match)]
            mine = [r for r in mine if match != "none" or r["width"] == width]
            dims = sorted({r["d"] for r in mine})
            values = [[r[key] for r in mine if r["d"] == d] for d in dims]
            mid = np.array([np.median(v) for v in values])
            err = np.array([mid - [min(v) for v in values], [max(v) for v in values] - mid])
            label = "DEQ" if model == "deq" else model.replace("fnn-L", "FNN depth ")
            label += (
                f", width {width}" if match == "none" else (" (params)" if match != "-" else "")
            )
            deq = model == "deq"
            style = {"lw": 2.2 if deq else 1.2, "color": "C3" if deq else next(fnn_colors)}
            ax.errorbar(dims, mid, yerr=err, marker="o", ms=3.5, capsize=2, label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("input dimension d")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylim(0, 1.5 * axes[0].get_ylim()[1])  # room for the legend
    axes[1].set_yscale("log")
    axes[0].legend(loc="upper left", ncol=2)
    fig.tight_layout()
    _save(fig, path)


def jacobian_steps(record, path):
    """Solver steps and validation quality over training, with and without the Jacobian
    regularizer: the DEQ-Transformer (top, each seed) and the MDEQ on digits (bottom,
    each seed)."""
    data = record["data"]
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 6.6))
    lm = data["lm"]["seeds"]
    parts = [("lm", "deq", "bpc", "step", {seed: run["curves"] for seed, run in lm.items()})]
    parts.append(("vision", "mdeq", "accuracy", "epoch", {}))
    parts[1][4].update({seed: run["curves"] for seed, run in data["vision"]["seeds"].items()})
    caps = {"lm": next(iter(lm.values()))["args"]["max_iter"]}
    caps["vision"] = data["vision"]["args"]["vision_max_iter"]
    for row, (part, base, key, unit, seeds) in zip(axes, parts, strict=True):
        for k, (seed, curves) in enumerate(seeds.items()):
            for name, curve in curves.items():
                x = [r["at"] for r in curve]
                jr = name != base
                color = COLORS["regularized" if jr else "plain"]
                style = {"color": color, "lw": 1.2, "ms": 3, **_seed_style(k)}
                label = ("with" if jr else "without") + f" regularizer, seed {seed}"
                row[0].plot(x, [r["fwd"] for r in curve], label=label, **style)
                row[1].plot(x, [r["bwd"] for r in curve], label=label, **style)
                quality = [r[key] * (100 if key == "accuracy" else 1) for r in curve]
                row[2].plot(x, quality, label=label, **style)
        name = "DEQ-Transformer" if part == "lm" else "MDEQ, digits"
        row[0].set_title(f"{name}: forward steps (cap {caps[part]})")
        row[1].set_title(f"adjoint steps (cap {caps[part]}), per batch")
        row[2].set_title("validation bits per character" if part == "lm" else "test accuracy (%)")
        for ax in row:
            ax.set_xlabel(f"training {unit}")
        row[2].legend(fontsize=6.5)
        for ax in row[:2]:
            ax.axhline(caps[part], color="0.4", ls=":", lw=0.8)
            ax.set_ylim(bottom=0)
    fig.tight_layout()
    _save(fig, path)


def expressivity_recipe(record, path):
    """The 32-piece sawtooth and, per model and recipe, the fit of the seed best on
    validation (its test MSE / variance in the title): the recipes of
    benchmarks/expressivity_recipe.py, DEQs (red) and FNNs (blue)."""
    data = record["data"]
    fits = data["fits"]
    columns = 3
    rows = -(-len(fits) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(11, 1.9 * rows), squeeze=False)
    for ax, (key, fit) in zip(axes.flat, fits.items(), strict=False):
        model, recipe = key.split("|")
        run = next(
            r
            for r in data["rows"]
            if (r["model"], r["recipe"], r["seed"]) == (model, recipe, fit["seed"])
        )
        ax.plot(data["x"], data["target"], color="0.6", lw=1.6)
        ax.plot(data["x"], fit["y"], color="C3" if model == "deq" else "C0", lw=1.0)
        name = "DEQ" if model == "deq" else model.replace("fnn-L", "FNN depth ")
        ax.set_title(
            f"{name}, {recipe}: test MSE/var {run['test']:.3g} (seed {fit['seed']})", fontsize=8
        )
        ax.tick_params(labelsize=7)
        ax.set_ylim(-0.1, 1.1)
    for ax in list(axes.flat)[len(fits) :]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def opteq_seeds(record, path):
    """OptEq on digits over seeds: the prior chosen on validation and its paired test
    difference to no prior (top); Table 8 in miniature, accuracy and cost against the
    training method (bottom)."""
    data = record["data"]
    prior, tables = data["prior"], data["table8"]
    fig, axes = plt.subplots(2, 2, figsize=(10.5, 6.6))
    ax = axes[0, 0]
    names = list(prior["results"])
    for i, name in enumerate(names):
        for j, split in enumerate(("val", "test")):
            values = 100 * np.asarray(prior["results"][name][split])
            x = i + (j - 0.5) * 0.3
            ax.plot(np.full(len(values), x), values, "o", ms=3, alpha=0.5, color=f"C{j}")
            ax.plot(
                [x - 0.1, x + 0.1],
                [values.mean()] * 2,
                color=f"C{j}",
                lw=2,
                label=("validation" if j == 0 else "test") + " (mean)" if i == 0 else None,
            )
    ax.set_xticks(
        range(len(names)),
        [n.replace(":", "\n") + ("\n(chosen)" if n == prior["chosen"] else "") for n in names],
        fontsize=7,
    )
    ax.set_title(f"accuracy per seed (%), {len(prior['results']['none']['val'])} seeds")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    base, best = (np.asarray(prior["results"][n]["test"]) for n in ("none", prior["chosen"]))
    diff, paired = 100 * (best - base), prior["paired"]
    ax.bar(range(len(diff)), diff, color="C2")
    ax.axhspan(
        100 * paired["low"],
        100 * paired["high"],
        color="C3",
        alpha=0.15,
        label="95% t-interval of the mean",
    )
    ax.axhline(100 * paired["mean"], color="C3", lw=1.5, label=f"mean {100 * paired['mean']:+.2f}")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(range(len(diff)))
    ax.set_xlabel("seed")
    ax.set_title(f"test accuracy, {prior['chosen']} - no prior (points)", fontsize=9)
    ax.legend(fontsize=7)
    methods = [row["method"] for row in tables[0]]
    x = np.arange(len(methods))
    ax = axes[1, 0]
    for k, table in enumerate(tables):
        accuracy = [100 * row["accuracy"] for row in table]
        ax.plot(x, accuracy, _seed_style(k)["marker"] + "-", ms=4, lw=1, label=f"seed {k}")
    ax.set_title("Table 8: test accuracy (%) by training method")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    for j, (key, label) in enumerate(
        (("inference_x_k20", "inference"), ("backprop_x_k20", "back-prop"))
    ):
        values = [np.median([table[i][key] for table in tables]) for i in range(len(methods))]
        ax.bar(x + (j - 0.5) * 0.38, values, width=0.38, color=f"C{j}", label=label)
    ax.axhline(1, color="0.4", lw=0.8)
    ax.set_title("time × unrolled K=20 (median over seeds)")
    ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xticks(x, [m.replace(" ", "\n", 1) for m in methods], fontsize=7)
    fig.tight_layout()
    _save(fig, path)


FIGURES = {
    "solver_residuals": solver_residuals,
    "solver_trace": solver_trace,
    "jacobian_regularization": jacobian_regularization,
    "memory_dense": memory_dense,
    "memory_transformer": memory_transformer,
    "multiscale_lipschitz": multiscale_lipschitz,
    "synthetic_fits": synthetic_fits,
    "steep_separation": steep_separation,
    "pcdeq_norms": pcdeq_norms,
    "jacobian_steps": jacobian_steps,
    "expressivity_recipe": expressivity_recipe,
    "opteq_seeds": opteq_seeds,
}


def render(name, images=IMAGES, out=None):
    """Draws figure `name` from `images/name.json` into `out` (default `images/name.png`)."""
    record = json.loads((pathlib.Path(images) / f"{name}.json").read_text())
    out = pathlib.Path(out) if out else pathlib.Path(images) / f"{name}.png"
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(STYLE)
        FIGURES[name](record, out)
    return out


if __name__ == "__main__":
    for figure in sys.argv[1:] or FIGURES:
        print(render(figure))
