"""Fixed-point solver benchmarks: loop overhead, Anderson's bookkeeping, time to a tolerance,
and step counts on 24 test problems.

    python benchmarks/solvers.py                 # (a), (b), (c): a few minutes on CPU
    python benchmarks/solvers.py --jit off       # plain tf.function only (also: on, apart)
    python benchmarks/solvers.py --problems      # evaluations per problem and solver
    python benchmarks/solvers.py --trained       # solvers on a trained digits DEQ

Run from the repository root (it imports `keras_deq` and `tests.solvers.problems`).

(a) `loop`: the shared solver loop (`FixedPoint`, forced to `--iters` iterations by a tiny
    tolerance) against a bare `while_loop` making the same cell calls, both compiled.
(b) `bookkeeping`: Anderson's cost per iteration beyond the loop's,
    `(T_anderson - T_fixed_point) / iters`, in cell evaluations (`T_bare / iters`).
(c) `to_tol`: iterations and time for Picard and Anderson to reach `--tol` on two slowly
    contracting cells.

The cell is `z -> tanh(z W + x)` at `--batch` x `--width`. Times are medians of
`--repeats` runs, interleaved across the variants compared, in CPU time of this process
(`--clock process`, robust to other load on the machine; with `--threads 1` it is the
wall time of an idle machine) or wall time (`--clock wall`). Ratios are what to compare.
`--baseline DIR` also times the Anderson solver of another checkout (its
`keras_deq/solvers/anderson.py`, with this checkout's loop) in the same runs.
"""

import argparse
import importlib.util
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from progress import Progress  # noqa: E402

from keras_deq import solvers  # noqa: E402

TINY = 1e-30  # a tolerance no iterate meets: the solvers run exactly `max_iter` iterations


# ------------------------------------------------------------------------- utilities
def compile_fn(fn, jit):
    """`fn` compiled as a graph, or `jax.jit`. `jit`: False, a plain `tf.function`; True,
    `tf.function(jit_compile=True)`; `"apart"`, a plain `tf.function` in which `fn` runs
    as one XLA program (`keras_deq.backend.compiled_solve`, as `DEQ(jit_compile="auto")`
    runs its solves in Keras' default CPU graphs)."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    import tensorflow as tf

    if jit == "apart":
        from keras_deq.backend import tensorflow as tf_backend

        return tf.function(lambda: tf_backend.xla_call(fn), autograph=False)
    return tf.function(fn, jit_compile=jit, autograph=False)


def block(out):
    """Waits for `out` (a tensor or a nest) to be computed."""
    for t in keras.tree.flatten(out):
        ops.convert_to_numpy(t)
    return out


def median_times(fns, repeats, clock, progress):
    """`{name: median seconds}` over `repeats` interleaved runs of each `fns[name]`; each
    repeat advances `progress` by one."""
    timer = time.process_time if clock == "process" else time.perf_counter
    for fn in fns.values():
        block(fn())  # compile
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = timer()
            block(fn())
            times[name].append(timer() - start)
        progress.advance()
    return {name: statistics.median(t) for name, t in times.items()}


def tanh_cell(batch, width, kind, seed=0):
    """`z -> tanh(z W + x)` and its `z0`.

    `kind`: `"deq"` (W Gaussian, spectral norm 0.9, x ~ N(0, 1): contracting fast, for
    timing a fixed number of iterations), `"symmetric"` (W symmetric, spectral norm
    0.95, x ~ N(0, 0.1^2): slowly contracting) or `"nonsymmetric"` (W Gaussian with
    spectral radius 0.95, x ~ N(0, 0.1^2): slowly contracting, eigenvalues in a disk).
    """
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((width, width))
    if kind == "deq":
        w, scale = 0.9 * g / np.linalg.norm(g, 2), 1.0
    elif kind == "symmetric":
        s = (g + g.T) / 2
        w, scale = 0.95 * s / np.linalg.norm(s, 2), 0.1
    elif kind == "nonsymmetric":
        w, scale = 0.95 * g / np.max(np.abs(np.linalg.eigvals(g))), 0.1
    else:
        raise ValueError(f"Unknown cell kind {kind!r}")
    w = ops.convert_to_tensor(w.astype("float32"))
    x = ops.convert_to_tensor((scale * rng.standard_normal((batch, width))).astype("float32"))

    def cell(z):
        return ops.tanh(ops.matmul(z, w) + x)

    return cell, ops.zeros((batch, width), "float32")


def load_baseline(directory):
    """The `Anderson` class of another checkout's `keras_deq/solvers/anderson.py`, loaded
    as a separate module (unregistered, unnamed) that uses this checkout's `Solver`."""
    path = pathlib.Path(directory) / "keras_deq" / "solvers" / "anderson.py"
    source = path.read_text()
    source = source.replace('    name = "anderson"', "    name = None")
    source = source.replace('@keras.saving.register_keras_serializable(package="keras_deq")\n', "")
    spec = importlib.util.spec_from_loader("baseline_anderson", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module.Anderson


def jit_modes(choice):
    return {
        "off": [False],
        "on": [True],
        "apart": ["apart"],
        "both": [False, "apart", True],
    }[choice]


def mode_name(jit):
    return {False: "graph", True: "XLA", "apart": "apart"}[jit]


# ------------------------------------------------------------------- (a) and (b)
def overhead(args, progress, baseline=None):
    """(a) the loop's cost over a bare loop; (b) Anderson's bookkeeping per iteration."""
    cell, z0 = tanh_cell(args.batch, args.width, "deq")
    iters = args.iters

    def bare():
        def body(k, z):
            return k + 1, cell(z)

        return ops.while_loop(lambda k, z: k < iters, body, (0, z0))[1]

    def solve(solver):
        return lambda: solver(cell, z0).steps

    variants = {
        "bare": bare,
        "fixed_point": solve(solvers.FixedPoint(max_iter=iters, tol=TINY, stop_mode="abs")),
    }
    for window in args.windows:
        variants[f"anderson(window={window})"] = solve(
            solvers.Anderson(max_iter=iters, tol=TINY, stop_mode="abs", window=window)
        )
        if baseline is not None:
            variants[f"baseline anderson(window={window})"] = solve(
                baseline(max_iter=iters, tol=TINY, stop_mode="abs", window=window)
            )
    rows = []
    for jit in jit_modes(args.jit):
        fns = {name: compile_fn(fn, jit) for name, fn in variants.items()}
        for name, fn in fns.items():
            if name != "bare":
                steps = int(ops.convert_to_numpy(fn()))
                assert steps == iters, f"{name} ran {steps} iterations, not {iters}"
        times = median_times(fns, args.repeats, args.clock, progress)
        cell_time = times["bare"] / iters
        rows.append((mode_name(jit), times, cell_time))
    progress.print(
        f"\n(a) loop overhead and (b) Anderson's bookkeeping: batch {args.batch}, width "
        f"{args.width}, {iters} iterations, {args.repeats} repeats, {args.clock} time"
    )
    progress.print(
        f"{'mode':<6} {'variant':<30} {'us/iter':>9} {'x bare':>7} {'bookkeeping/cell':>17}"
    )
    for mode, times, cell_time in rows:
        for name, t in times.items():
            per_iter = t / iters
            extra = ""
            if name not in ("bare", "fixed_point"):
                extra = f"{(t - times['fixed_point']) / iters / cell_time:17.2f}"
            progress.print(
                f"{mode:<6} {name:<30} {per_iter * 1e6:9.1f} {t / times['bare']:7.2f} {extra}"
            )
    return rows


# ----------------------------------------------------------------------------- (c)
def to_tol(args, progress, baseline=None):
    """(c) iterations and time to `args.tol` (relative) on slowly contracting cells."""
    progress.print(
        f"\n(c) time to rel. tol {args.tol:g}: batch {args.batch}, width {args.width}, "
        f"{args.repeats} repeats, {args.clock} time"
    )
    progress.print(
        f"{'mode':<6} {'cell':<13} {'solver':<30} {'iters':>6} {'conv':>5} {'ms':>8} "
        f"{'time x':>7} {'iters /':>8}"
    )
    for kind in ("symmetric", "nonsymmetric"):
        cell, z0 = tanh_cell(args.batch, args.width, kind)
        variants = {"fixed_point": solvers.FixedPoint(max_iter=args.max_iter, tol=args.tol)}
        for window in args.windows:
            variants[f"anderson(window={window})"] = solvers.Anderson(
                max_iter=args.max_iter, tol=args.tol, window=window
            )
            if baseline is not None:
                variants[f"baseline anderson(window={window})"] = baseline(
                    max_iter=args.max_iter, tol=args.tol, window=window
                )
        for jit in jit_modes(args.jit):
            fns = {
                name: compile_fn(lambda s=s, c=cell, z=z0: s(c, z), jit)
                for name, s in variants.items()
            }
            results = {name: fn() for name, fn in fns.items()}
            times = median_times(fns, args.repeats, args.clock, progress)
            base_steps = int(ops.convert_to_numpy(results["fixed_point"].steps))
            for name, result in results.items():
                steps = int(ops.convert_to_numpy(result.steps))
                converged = float(np.mean(ops.convert_to_numpy(result.converged)))
                progress.print(
                    f"{mode_name(jit):<6} {kind:<13} {name:<30} {steps:6d} {converged:5.2f} "
                    f"{times[name] * 1e3:8.2f} {times[name] / times['fixed_point']:7.2f} "
                    f"{base_steps / steps:8.2f}"
                )


# ---------------------------------------------------------------------- --problems
def problems_table(args):
    """Evaluations of `f` per problem and solver (float64, abs. tol 1e-8)."""
    from tests.solvers import problems

    print(
        f"\nEvaluations of f to abs. tol {problems.TOL:g} (float64); '-': not converged within "
        f"{problems.PICARD_BUDGET} (fixed_point) or {problems.MAX_ITER} evaluations"
    )
    table = problems.iteration_table()
    print(problems.format_table(table))
    columns = list(problems.SOLVERS)[1:]
    totals = {c: sum(row[c] for row in table.values() if row[c] is not None) for c in columns}
    print("totals (converged runs):", totals)
    m5, m8 = "anderson_m5", "anderson_m8"
    worse = sum((row[m8] or np.inf) > (row[m5] or np.inf) for row in table.values())
    better = sum((row[m8] or np.inf) < (row[m5] or np.inf) for row in table.values())
    print(f"window 8 vs window 5: worse on {worse}, better on {better} of {len(table)}")


# ----------------------------------------------------------------------- --trained
def trained_digits_map(epochs=15, seed=0):
    """`(cell, x)`: the map `z -> f(z, x)` of the digits DEQ (examples/digits.py, trained
    `epochs` epochs from `seed`) on the injected test samples `x` (360 x 128)."""
    import tensorflow as tf

    sys.path.insert(0, str(ROOT / "examples"))
    from digits import build_model, load_digits_split

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, _ = load_digits_split()
    model = build_model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0)
    deq = model.get_layer("deq")
    x = model.get_layer("injection")(tf.constant(x_test))

    def cell(z):
        return deq.cell(z, x)

    return cell, x


def trained(args, progress, baseline=None):
    """Forward solvers on the trained digits DEQ's map (examples/digits.py)."""
    import tensorflow as tf

    cell, x = trained_digits_map(args.epochs)
    configs = [
        ("fixed_point", {}),
        ("anderson", {}),
        ("anderson", {"window": 3}),
        ("anderson", {"window": 8}),
        ("broyden", {}),
        ("broyden", {"memory": 60}),
    ]
    if baseline is not None:
        configs += [("baseline anderson", {}), ("baseline anderson", {"window": 8})]
    progress.print(f"trained digits DEQ, test batch {x.shape[0]}, cell width {x.shape[1]}")
    progress.print(
        f"{'solver':<30} {'tol':>7} {'steps':>6} {'conv':>6} {'mean rel':>9} {'max rel':>9} "
        f"{'time x':>7}"
    )
    for tol in (1e-4, 1e-6):
        fns = {}
        for name, options in configs:
            if name == "baseline anderson":
                solver = baseline(max_iter=args.max_iter, tol=tol, **options)
            else:
                solver = solvers.get(name, max_iter=args.max_iter, tol=tol, **options)
            label = name + (
                "" if not options else "(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")"
            )
            fns[label] = compile_fn(
                lambda s=solver: s(cell, tf.zeros_like(x)), jit_modes(args.jit)[-1]
            )
        results = {label: fn() for label, fn in fns.items()}
        times = median_times(fns, args.repeats, args.clock, progress)
        base = times["fixed_point"]
        for label, result in results.items():
            rel = result.rel_residual.numpy()
            progress.print(
                f"{label:<30} {tol:7.0e} {int(result.steps):6d} "
                f"{float(np.mean(result.converged.numpy())):6.3f} {rel.mean():9.2e} "
                f"{rel.max():9.2e} {times[label] / base:7.2f}"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--iters", type=int, default=30, help="iterations timed in (a), (b)")
    parser.add_argument("--windows", type=int, nargs="+", default=[5, 8])
    parser.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of (c)")
    parser.add_argument("--max-iter", type=int, default=500, help="budget of (c), --trained")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow threads (0: default)")
    parser.add_argument(
        "--jit",
        choices=["off", "on", "apart", "both"],
        default="both",
        help="graph (off), XLA (on), the solve alone in XLA inside a graph (apart), or all",
    )
    parser.add_argument("--clock", choices=["process", "wall"], default="process")
    parser.add_argument("--baseline", help="another checkout, whose Anderson is timed too")
    parser.add_argument("--skip", nargs="*", default=[], choices=["overhead", "to_tol"])
    parser.add_argument("--problems", action="store_true", help="only the problems table")
    parser.add_argument("--trained", action="store_true", help="only the trained digits DEQ")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of --trained")
    args = parser.parse_args(argv)
    if keras.backend.backend() == "tensorflow" and args.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if args.problems:
        return problems_table(args)
    baseline = load_baseline(args.baseline) if args.baseline else None
    # The bar counts the timing repeats: one round of every variant compared, per table.
    if args.trained:
        with Progress(2 * args.repeats, unit_name="repeat") as progress:
            return trained(args, progress, baseline)
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, threads {args.threads}")
    tables = ("overhead" not in args.skip) + 2 * ("to_tol" not in args.skip)
    with Progress(tables * len(jit_modes(args.jit)) * args.repeats, "repeat") as progress:
        if "overhead" not in args.skip:
            overhead(args, progress, baseline)
        if "to_tol" not in args.skip:
            to_tol(args, progress, baseline)


if __name__ == "__main__":
    main()
