"""Runs the experiments behind the documentation's figures, then draws them.

    python docs/figures/make_figures.py                        # every figure, ~20 min on 2 cores
    python docs/figures/make_figures.py --only memory_dense    # one (or several) figures
    python docs/figures/render.py                              # only redraw PNGs from the JSON

Run from the repository root. Each figure `NAME` is computed in a fresh process (TensorFlow's
thread settings and allocator statistics need one) by the function `NAME` below, which reuses
the benchmarks' and examples' code. Its numbers go to `docs/images/NAME.json`, with the
command, date, library versions and machine; `render.py` then draws `docs/images/NAME.png`
from that file alone. `tests/test_figures.py` checks that every PNG is what its JSON draws.
"""

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGES = ROOT / "docs" / "images"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import render  # noqa: E402


def _load(relative, name):
    """The module at `ROOT / relative`, imported under `name` (the scripts are not packages)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str((ROOT / relative).parent))
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------- figures
def solver_residuals():
    """Relative residual of every iterate of each solver on the trained digits DEQ's map
    (benchmarks/solvers.py --trained: examples/digits.py trained 15 epochs, seed 0; the 360
    test samples solved from zeros, max_iter 100), recorded as the solver evaluates f."""
    import numpy as np
    from keras import ops

    from keras_deq import solvers

    bench = _load("benchmarks/solvers.py", "bench_solvers")
    cell, x = bench.trained_digits_map(epochs=15, seed=0)
    configs = {
        "fixed_point": ("fixed_point", {}),
        "anderson (window 3)": ("anderson", {"window": 3}),
        "anderson (window 5)": ("anderson", {"window": 5}),
        "anderson (window 8)": ("anderson", {"window": 8}),
        "broyden (memory 20)": ("broyden", {"memory": 20}),
    }
    tols, traces = [1e-4, 1e-6], {}
    for label, (name, options) in configs.items():
        seen = []

        def f(z, seen=seen):
            fz = cell(z)
            seen.append(ops.convert_to_numpy(ops.norm(fz - z, axis=-1) / ops.norm(fz, axis=-1)))
            return fz

        # Eager, tol out of reach: all 100 iterations run and f sees every iterate.
        solvers.get(name, max_iter=100, tol=1e-30, **options)(f, ops.zeros_like(x))
        rel = np.stack(seen).astype("float64")
        worst = rel.max(axis=1)
        traces[label] = {
            "max": worst.tolist(),
            "median": np.median(rel, axis=1).tolist(),
            "iterations_to_tol": {
                f"{t:g}": int(np.argmax(worst <= t)) + 1 if (worst <= t).any() else None
                for t in tols
            },
        }
    command = "python docs/figures/make_figures.py --only solver_residuals"
    return command, {"samples": int(x.shape[0]), "tols": tols, "traces": traces}


def solver_trace():
    """`DEQ.solver_trace` of the layer in the tutorial's "Watching convergence" section: a
    `DenseCell(32)` with an orthogonal kernel of gain 0.95 (seed 0), 16 standard normal
    inputs (numpy, seed 0), max_iter 80, tol 1e-5; fixed-point iteration and
    Anderson (window 5). Per-sample relative residuals, None after the last iteration."""
    import keras
    import numpy as np

    import keras_deq

    x = np.random.default_rng(0).normal(size=(16, 32)).astype("float32")
    keras.utils.set_random_seed(0)
    cell = keras_deq.DenseCell(32, kernel_initializer=keras.initializers.Orthogonal(0.95, seed=0))
    traces = {}
    for name in ("fixed_point", "anderson"):
        layer = keras_deq.DEQ(cell, solver=name, max_iter=80, tol=1e-5)
        trace = layer.solver_trace(x)
        rel = keras.ops.convert_to_numpy(trace.rel_residual).astype("float64")
        traces[name] = {
            "steps": int(trace.steps),
            "per_sample": [[None if np.isnan(v) else float(v) for v in row] for row in rel.T],
        }
    command = "python docs/figures/make_figures.py --only solver_trace"
    return command, {"samples": int(x.shape[0]), "tol": 1e-5, "traces": traces}


def jacobian_regularization(epochs=15):
    """examples/digits.py's model at width 64 (the Jacobian-regularization tutorial's:
    Anderson, max_iter 30, tol 1e-4, Adam 1e-2, batch 64, seed 0), trained without and with
    the penalty (weight 2, every step); after each epoch ||J||_F^2 / d is estimated at the
    test set's fixed points (10 Hutchinson probes, seed 0)."""
    import keras

    from keras_deq import jacobian

    digits = _load("examples/digits.py", "digits_example")
    x_train, y_train, x_test, y_test = digits.load_digits_split(seed=0)
    runs = {}
    for key, weight, label in (
        ("plain", 0.0, "no penalty"),
        ("regularized", 2.0, "penalty, weight 2"),
    ):
        keras.utils.set_random_seed(0)
        model = digits.build_model(width=64, jacobian_weight=weight)
        model.compile(
            keras.optimizers.Adam(1e-2),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        frobenius = []

        def measure(epoch, logs, model=model, frobenius=frobenius):
            deq = model.get_layer("deq")
            injection = model.get_layer("injection")(x_test)
            z_star = deq(injection)
            value = jacobian.hutchinson_frobenius(
                lambda z: deq.cell(z, injection), z_star, num_probes=10, seed=0
            )
            frobenius.append(float(value))

        history = model.fit(
            x_train,
            y_train,
            batch_size=64,
            epochs=epochs,
            validation_data=(x_test, y_test),
            verbose=0,
            callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=measure)],
        ).history
        runs[key] = {
            "label": label,
            "jacobian_weight": weight,
            "fwd_steps": history["deq_fwd_steps"],
            "bwd_steps": history["deq_bwd_steps"],
            "train_jac_loss": history.get("deq_jac_loss"),
            "test_fwd_steps": history.get("val_deq_fwd_steps"),
            "test_accuracy": history["val_accuracy"],
            "jacobian_frobenius": frobenius,
        }
    command = "python docs/figures/make_figures.py --only jacobian_regularization"
    return command, {"epochs": epochs, "runs": runs}


def _memory(argv):
    memory = _load("benchmarks/memory.py", "bench_memory")
    results = memory.main(argv)
    rows = [
        {"solver": solver, "mode": mode, "iters": iters, **summary}
        for (solver, mode, iters), summary in results.items()
    ]
    return "python benchmarks/memory.py " + " ".join(argv), rows


def memory_dense():
    """benchmarks/memory.py (Dense -> DEQ(DenseCell(512)) -> Dense, batch 256, fixed point,
    1 thread): peak allocator MiB of one train step at N = 10, 20, 40, 60 iterations,
    implicit vs unrolled; 2 processes x 3 measured steps per point."""
    command, rows = _memory(["--iters", "10", "20", "40", "60", "--repeats", "2", "--steps", "3"])
    return command, {"batch": 256, "width": 512, "solver": "fixed_point", "results": rows}


def memory_transformer():
    """benchmarks/memory.py --model transformer (DEQTransformerLM, d_model 128, 4 heads, 16
    windows of 64 tokens, fixed point, 1 thread) at depth N = 2, 4, 8, 16: the DEQ-Transformer
    (implicit) vs unrolled, i.e. an explicit weight-tied Transformer of depth N; 1 process x 3
    measured steps per point."""
    argv = ["--model", "transformer", "--batch", "16", "--width", "128"]
    argv += ["--iters", "2", "4", "8", "16", "--repeats", "1", "--steps", "3"]
    command, rows = _memory(argv)
    data = {"batch": 16, "seq_len": 64, "width": 128, "solver": "fixed_point", "results": rows}
    return command, data


def multiscale_lipschitz(epochs=15, seeds=(0, 1, 2)):
    """benchmarks/lipschitz_speedup.py --json: plain MDEQ vs Lipschitz multiscale DEQ on
    digits, same budget (Anderson, 18 forward / 20 adjoint iterations, tol 1e-3, Adam 1e-3,
    batch 64, 1 thread), seeds 0, 1, 2, both evaluated on the test set after every epoch;
    each seed's speed-ups (train step, inference, forward and adjoint steps)."""
    bench = _load("benchmarks/lipschitz_speedup.py", "bench_lipschitz")
    argv = ["--epochs", str(epochs), "--seeds", *map(str, seeds), "--threads", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "out.json"
        bench.main([*argv, "--json", str(path)])
        out = json.loads(path.read_text())
    data = {
        "epochs": out["epochs"],
        "rows": out["rows"],
        "max_iter": out["args"]["max_iter"],
        "backward_max_iter": out["args"]["backward_max_iter"],
        "tol": out["args"]["tol"],
        "runs": out["runs"],
        "medians": out["medians"],
    }
    return "python benchmarks/lipschitz_speedup.py " + " ".join(argv) + " --json PATH", data


def synthetic_fits():
    """benchmarks/expressivity.py's budget (Adam 1e-2, batch 256, 600 steps, seed 0) on the
    1-D tasks, for the width-10 DEQ and the depth-4 FNN matched to its parameter count; the
    learned functions are read on a grid (linear in x, log-spaced for the steep tasks)."""
    import numpy as np

    bench = _load("benchmarks/expressivity.py", "bench_expressivity")
    train_lib, tasks_lib = bench.train_lib, bench.train_lib.tasks_lib
    targets = {
        "sawtooth5": (lambda x: tasks_lib.sawtooth_fn(x, 5), "linear"),
        "steep5": (lambda x: 2.0**-5 * tasks_lib.steep_fn(x, 2.0**-5), "log"),
        "steep10": (lambda x: 2.0**-10 * tasks_lib.steep_fn(x, 2.0**-10), "log"),
    }
    models = {
        "DEQ width 10": {"model_type": "deq", "width": 10},
        "FNN depth 4": {"model_type": "fnn", "depth": 4, "match": "params", "deq_width": 10},
    }
    tasks = {}
    for task, (target, scale) in targets.items():
        grid = np.linspace(0, 1, 401) if scale == "linear" else np.geomspace(1e-4, 1, 401)
        fits = {"xscale": scale, "x": grid.tolist(), "target": target(grid).tolist(), "models": {}}
        epochs = bench.epochs_for(task, 600, 256, 4096)
        for label, config in models.items():
            result, model = train_lib.run(
                task=task, epochs=epochs, learning_rate=1e-2, seed=0, return_model=True, **config
            )
            grid_x = grid[:, None].astype("float32")
            prediction = model.predict(grid_x, batch_size=len(grid), verbose=0)
            fits["models"][f"{label}, {result['params']} params"] = {
                "prediction": [float(f"{v:.7g}") for v in prediction[:, 0]],
                **{k: result[k] for k in ("test_mse", "linf", "fwd_steps", "width", "params")},
                "epochs": epochs,
            }
        tasks[task] = fits
    return "python docs/figures/make_figures.py --only synthetic_fits", {"tasks": tasks}


def pcdeq_norms():
    """benchmarks/pcdeq_norms.py's weight-norm sweep (its defaults: norms 0.5 ... 16,
    seeds 0, 1, 2, fixed-point iteration, tol 1e-4, at most 200 iterations; no
    training): each model's converged fraction and iterations per norm and seed."""
    bench = _load("benchmarks/pcdeq_norms.py", "bench_pcdeq_norms")
    out = bench.main(["--train-starts"])
    rows = [{"norm": norm, "seed": seed, "models": stats} for norm, seed, stats in out["sweep"]]
    return "python benchmarks/pcdeq_norms.py --train-starts", {"sweep": rows, "max_iter": 200}


def steep_separation():
    """benchmarks/steep_separation.py with its defaults (δ = 2^-10, d = 6, 8, ..., 20,
    seeds 0 and 1, 800 Adam steps, one thread): every run's max |weight| and errors."""
    bench = _load("benchmarks/steep_separation.py", "bench_steep_separation")
    out = bench.main([])
    return "python benchmarks/steep_separation.py", out


def jacobian_steps(lm_seeds=(0, 1, 2)):
    """benchmarks/jacobian_steps.py, both parts (one process per language-model seed and
    one for vision, two at a time, one thread each): the DEQ-Transformer language model
    (seeds 0, 1, 2) and the plain MDEQ on digits (seeds 0, 1), with and without the
    Jacobian regularizer, solver steps and validation quality per chunk or epoch. A run
    whose `RUN.json` is already in `$JACOBIAN_STEPS_DIR` (`lm-seed0.json`, ...,
    `vision.json`, written by the benchmark's `--json` with the arguments it ran with) is
    read instead of run again; the runs' printed tables are kept in the record."""
    logs = pathlib.Path(os.environ.get("JACOBIAN_STEPS_DIR") or tempfile.mkdtemp())
    script = str(ROOT / "benchmarks" / "jacobian_steps.py")
    runs = {f"lm-seed{seed}": ["--part", "lm", "--seed", str(seed)] for seed in lm_seeds}
    runs["vision"] = ["--part", "vision"]
    waiting = [name for name in runs if not (logs / f"{name}.json").exists()]
    while waiting:
        started = {}
        for name in waiting[:2]:
            command = [sys.executable, script, *runs[name], "--json", str(logs / f"{name}.json")]
            with open(logs / f"{name}.log", "w") as log, open(logs / f"{name}.err", "w") as err:
                started[name] = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=err)
            print(f"{name}: output in {logs / name}.log", flush=True)
        for name, process in started.items():
            if process.wait() != 0:
                raise RuntimeError(f"benchmarks/jacobian_steps.py {' '.join(runs[name])} failed")
        waiting = waiting[2:]
    out, commands = {"lm": {"seeds": {}}}, []
    for name in runs:
        record = json.loads((logs / f"{name}.json").read_text())
        record["table"] = (logs / f"{name}.log").read_text()
        if name == "vision":
            out["vision"] = record
        else:
            out["lm"]["seeds"][str(record["args"]["seed"])] = record
        # The arguments it ran with (a run started by this function: its own command).
        argv = record.get("argv", [*runs[name], "--json", "PATH"])
        argv = argv[: argv.index("--json")] + argv[argv.index("--json") + 2 :]
        commands.append("python benchmarks/jacobian_steps.py " + " ".join(argv) + " --json PATH")
    return " & ".join(commands), out


def expressivity_recipe(every=4, argv=()):
    """benchmarks/expressivity_recipe.py with its defaults (the 32-piece sawtooth, seeds 0,
    1, 2, 2000 Adam steps with warm-up and cosine decay, every DEQ recipe and the FNNs): each
    run's scores, and per model and recipe the fit of the seed best on validation, read on
    every `every`-th point of the script's grid of [0, 1]."""
    import numpy as np

    bench = _load("benchmarks/expressivity_recipe.py", "bench_expressivity_recipe")
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "out.json"
        bench.main([*argv, "--json", str(path)])
        out = json.loads(path.read_text())
    grid = np.asarray(out["grid"][::every])
    fits = {
        key: {**fit, "y": [float(f"{v:.5g}") for v in fit["y"][::every]]}
        for key, fit in out["fits"].items()
    }
    data = {
        "k": out["args"]["k"],
        "steps": out["args"]["steps"],
        "seeds": out["args"]["seeds"],
        "reference": out["args"]["reference"],
        "rows": out["rows"],
        "x": grid.tolist(),
        "target": bench.tasks_lib.sawtooth_fn(grid, out["args"]["k"]).tolist(),
        "fits": fits,
    }
    return "python benchmarks/expressivity_recipe.py --json PATH", data


def opteq_seeds(seeds=8, table_seeds=3, epochs=15):
    """OptEq on digits over seeds (dense units, alpha 0.8, Adam 1e-3, batch 64, 15 epochs,
    1 thread): benchmarks/opteq_prior.py (the prior chosen on a validation split, seeds
    0-7, then its test accuracy paired with the no-prior model's) and
    benchmarks/opteq_unroll.py --table-seeds 3 (Table 8 in miniature: unrolled K = 5 ... 40
    against implicit training, seeds 0-2, accuracy and time ratios to K = 20)."""
    prior = _load("benchmarks/opteq_prior.py", "bench_opteq_prior")
    unroll = _load("benchmarks/opteq_unroll.py", "bench_opteq_unroll")
    prior_argv = ["--seeds", str(seeds), "--epochs", str(epochs), "--threads", "1"]
    unroll_argv = ["--table-seeds", str(table_seeds), "--epochs", str(epochs), "--threads", "1"]
    chosen = prior.main(prior_argv)
    tables = unroll.main(unroll_argv)["tables"]
    columns = ("method", "accuracy", "inference_x_k20", "backprop_x_k20", "residual", "train_s")
    data = {
        "epochs": epochs,
        "prior": {
            "results": chosen["results"],
            "chosen": chosen["chosen"],
            "paired": chosen["paired"],
        },
        "table8": [[dict(zip(columns, row, strict=True)) for row in table] for table in tables],
    }
    commands = [
        "python benchmarks/opteq_prior.py " + " ".join(prior_argv),
        "python benchmarks/opteq_unroll.py " + " ".join(unroll_argv),
    ]
    return " && ".join(commands), data


# ----------------------------------------------------------------------- driver
def _versions():
    import keras
    import matplotlib
    import numpy

    import keras_deq

    versions = {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "keras_deq": keras_deq.__version__,
        "numpy": numpy.__version__,
        "matplotlib": matplotlib.__version__,
        "backend": keras.backend.backend(),
    }
    if keras.backend.backend() == "tensorflow":
        import tensorflow

        versions["tensorflow"] = tensorflow.__version__
    return versions


def _machine():
    model = platform.processor()
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {"processor": model, "cpu_count": os.cpu_count(), "platform": platform.platform()}


def child(name):
    """Computes figure `name`'s data in this process, writes its JSON and draws its PNG."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    function = globals()[name]
    start = time.perf_counter()
    command, data = function()
    record = {
        "figure": name,
        "what": " ".join(function.__doc__.split()),
        "command": command,
        "figure_command": f"python docs/figures/make_figures.py --only {name}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(time.perf_counter() - start, 1),
        "versions": _versions(),
        "machine": _machine(),
        "data": data,
    }
    IMAGES.mkdir(parents=True, exist_ok=True)
    (IMAGES / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{name}: data in {record['wall_s']} s, drawn to {render.render(name)}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=list(render.FIGURES), default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child)
    for name in args.only or render.FIGURES:
        subprocess.run([sys.executable, __file__, "--child", name], cwd=ROOT, check=True)
    return None


if __name__ == "__main__":
    main()
