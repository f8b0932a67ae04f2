"""Train a DEQ or a feed-forward network on a synthetic separation task.

    python examples/synthetic/train.py --task sawtooth5 --model deq
    python examples/synthetic/train.py --task steep10 --model fnn --depth 3 --match flops
    python examples/synthetic/train.py --help

Tasks (our stand-ins for paper 004's experiments, see `tasks.py`): `sawtooth5`,
`sawtooth10` (tent map composed 5 or 10 times), `steep5`, `steep10`
(1 / (x + δ), δ = 2^-5 or 2^-10) and `gotu` (x ∈ {±1}^10, f1 = x1 x2 + x3, train on
x1 = +1, test on the unseen x1 = -1).

The DEQ is `keras_deq.DEQ(DenseCell(width))` (width 10 by default, as in the
paper's Table 1): the state z ∈ R^width solves z = act(z W + x U + b), the input
x is the injection, and a linear `Dense(1)` reads z out. The FNN has `depth`
weight layers (depth - 1 hidden layers of the same activation plus a linear
readout); its width is set explicitly or matched to the DEQ's parameter count or
FLOPs per iteration (`--match`).

FLOP count (per sample, multiply and add counted separately): a dense map from
a to b features costs 2ab, its bias b, its activation b. One DEQ iteration is
one cell evaluation, 2 w^2 + 2 d w + w + w (readout excluded). One FNN forward
pass is the whole network, readout included.

Printed: test MSE, L∞ error (max |error| on the test set), the GOTU error on
Boolean tasks (= test MSE on the unseen half), max |weight| over all trainable
weights, and the DEQ's mean forward solver steps on the test set.
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import backend_flag  # noqa: E402

backend_flag.apply()  # `--backend NAME`, before Keras loads

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_deq  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tasks as tasks_lib  # noqa: E402

MODELS = ("deq", "fnn")
MATCH = ("none", "params", "flops")


# ----------------------------------------------------------------- counting
def deq_params(d, width):
    """DenseCell (W: w x w, U: d x w, b: w) plus the Dense(1) readout."""
    return width * width + d * width + width + width + 1


def deq_flops_per_iteration(d, width):
    """One cell evaluation: z W (2 w^2), x U (2 d w), bias (w), activation (w)."""
    return 2 * width * width + 2 * d * width + 2 * width


def fnn_sizes(d, width, depth):
    return [d] + [width] * (depth - 1) + [1]


def fnn_params(d, width, depth):
    sizes = fnn_sizes(d, width, depth)
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def fnn_flops(d, width, depth):
    """One forward pass: 2ab + b per layer, plus b for each hidden activation."""
    sizes = fnn_sizes(d, width, depth)
    flops = sum(2 * a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    return flops + width * (depth - 1)


def matched_fnn_width(d, depth, deq_width, match):
    """The FNN width whose params / FLOPs per forward are closest to the DEQ's."""
    if match == "params":
        target, count = deq_params(d, deq_width), fnn_params
    elif match == "flops":
        target, count = deq_flops_per_iteration(d, deq_width), fnn_flops
    else:
        raise ValueError(f"`match` must be 'params' or 'flops'. Received: {match!r}")
    return min(range(1, 4096), key=lambda w: (abs(count(d, w, depth) - target), w))


# ------------------------------------------------------------------- models
def build_deq(d, width=10, activation="relu", solver="anderson", max_iter=30, tol=1e-4):
    return keras.Sequential(
        [
            keras.Input((d,)),
            keras_deq.DEQ(
                keras_deq.DenseCell(width, activation=activation),
                solver=solver,
                max_iter=max_iter,
                tol=tol,
                state_shape=(width,),
                on_failure="ignore",
                name="deq",
            ),
            keras.layers.Dense(1, name="readout"),
        ]
    )


def build_fnn(d, width, depth, activation="relu"):
    if depth < 2:
        raise ValueError(f"`depth` must be at least 2. Received: depth={depth}")
    layers = [keras.Input((d,))]
    layers += [keras.layers.Dense(width, activation=activation) for _ in range(depth - 1)]
    layers.append(keras.layers.Dense(1, name="readout"))
    return keras.Sequential(layers)


def trainable_params(model):
    """Trainable parameters. `model.count_params()` also counts the DEQ layer's two
    non-trainable scalars (`jacobian_weight`, `jacobian_frequency`)."""
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def max_abs_weight(model):
    """max |w| over the trainable weights (the DEQ's non-trainable scalars excluded)."""
    return max(
        float(np.max(np.abs(keras.ops.convert_to_numpy(w)))) for w in model.trainable_weights
    )


# ---------------------------------------------------------------- training
def run(
    task="sawtooth5",
    model_type="deq",
    width=10,
    depth=3,
    match="none",
    deq_width=10,
    activation="relu",
    epochs=100,
    batch_size=256,
    learning_rate=1e-2,
    solver="anderson",
    max_iter=30,
    tol=1e-4,
    seed=0,
    n_train=4096,
    n_test=1024,
    jit_compile=False,
    verbose=0,
    return_model=False,
):
    """Trains one model on one task and returns a dict of its test statistics (and the
    trained model, `(result, model)`, with `return_model=True`)."""
    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = tasks_lib.load(task, seed, n_train, n_test)
    d = x_train.shape[1]
    if model_type == "deq":
        model = build_deq(d, width, activation, solver, max_iter, tol)
        params, flops = deq_params(d, width), deq_flops_per_iteration(d, width)
    elif model_type == "fnn":
        if match != "none":
            width = matched_fnn_width(d, depth, deq_width, match)
        model = build_fnn(d, width, depth, activation)
        params, flops = fnn_params(d, width, depth), fnn_flops(d, width, depth)
    else:
        raise ValueError(f"`model_type` must be one of {MODELS}. Received: {model_type!r}")
    assert trainable_params(model) == params, (trainable_params(model), params)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate), loss="mse", jit_compile=jit_compile
    )
    start = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=True,
        verbose=verbose,
    )
    train_time = time.perf_counter() - start
    model.evaluate(x_test, y_test, batch_size=n_test, verbose=0)
    # The test set's solver statistics (one batch): read from the layer, since JAX's
    # `evaluate` logs hold no layer metrics.
    stats = model.get_layer("deq").solver_statistics() if model_type == "deq" else {}
    pred = keras.ops.convert_to_numpy(model.predict(x_test, batch_size=n_test, verbose=0))
    err = pred.astype("float64") - y_test.astype("float64")
    train_logs = model.evaluate(
        x_train, y_train, batch_size=len(x_train), verbose=0, return_dict=True
    )
    train_mse = float(train_logs["loss"])
    result = {
        "task": task,
        "seed": seed,
        "model": model_type if model_type == "deq" else f"fnn-L{depth}",
        "match": match if model_type == "fnn" else "-",
        "width": width,
        "depth": depth if model_type == "fnn" else None,
        "params": params,
        "flops": flops,
        "train_mse": train_mse,
        "test_mse": float(np.mean(err**2)),
        "linf": float(np.max(np.abs(err))),
        "gotu": float(np.mean(err**2)) if tasks_lib.is_boolean(task) else None,
        "max_weight": max_abs_weight(model),
        "fwd_steps": stats.get("fwd_steps"),
        "converged": stats.get("converged"),
        "train_time_s": train_time,
    }
    return (result, model) if return_model else result


def format_result(r):
    lines = [
        f"task {r['task']}  model {r['model']}  width {r['width']}  match {r['match']}",
        f"params {r['params']}  FLOPs/{'iteration' if r['model'] == 'deq' else 'forward'} {r['flops']}",
        f"train MSE {r['train_mse']:.4g}  test MSE {r['test_mse']:.4g}  L∞ error {r['linf']:.4g}",
    ]
    if r["gotu"] is not None:
        lines.append(f"GOTU error (MSE on unseen x1 = -1) {r['gotu']:.4g}")
    lines.append(f"max |weight| {r['max_weight']:.4g}")
    if r["fwd_steps"] is not None:
        lines.append(f"DEQ forward steps {r['fwd_steps']:.1f}  converged {r['converged']:.3f}")
    lines.append(f"train time {r['train_time_s']:.1f} s")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    backend_flag.add_to(parser)
    parser.add_argument("--task", default="sawtooth5", choices=tasks_lib.TASKS)
    parser.add_argument("--model", default="deq", choices=MODELS)
    parser.add_argument(
        "--width", type=int, default=10, help="DEQ width, or FNN width (--match none)"
    )
    parser.add_argument("--depth", type=int, default=3, help="FNN weight layers (>= 2)")
    parser.add_argument("--match", default="none", choices=MATCH, help="FNN width matched to a DEQ")
    parser.add_argument("--deq-width", type=int, default=10, help="DEQ width that --match uses")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    # GMRES solves affine maps only: an adjoint solver, refused as a DEQ's forward solver.
    forward_solvers = [
        n for n in keras_deq.solvers.names() if not keras_deq.solvers.get(n).affine_only
    ]
    parser.add_argument("--solver", default="anderson", choices=forward_solvers)
    parser.add_argument("--max-iter", type=int, default=30)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--n-test", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run(
        task=args.task,
        model_type=args.model,
        width=args.width,
        depth=args.depth,
        match=args.match,
        deq_width=args.deq_width,
        activation=args.activation,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        solver=args.solver,
        max_iter=args.max_iter,
        tol=args.tol,
        seed=args.seed,
        n_train=args.n_train,
        n_test=args.n_test,
    )
    print(format_result(result), flush=True)
    return result


if __name__ == "__main__":
    main()
