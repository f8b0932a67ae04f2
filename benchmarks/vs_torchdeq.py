"""keras_deq on TensorFlow and on JAX against TorchDEQ on the same DEQ, solver,
tolerance and budget (CPU), in one run.

    pip install torch==2.13.0 torchdeq==0.1.0   # for this benchmark only
    python benchmarks/vs_torchdeq.py [--epochs 15] [--threads 1] [--repeats 7] [--quick]

Two models on scikit-learn's digits (standardized, 80/20 stratified split, seed 0):

- `mlp`: Dense(64->128) injection, DEQ of the cell z <- tanh(z W + x U + b),
  Dense(128->10).
- `conv`: the 8x8x1 image, conv3x3 (8 channels) injection, DEQ of the cell
  z <- tanh(conv3x3(z) + x_inj), flatten, Dense(512->10). (Until 2026-11-25 the
  head was a global average pool to 8 features, which capped both libraries below
  40% accuracy; see the benchmark history in CHANGELOG.md.)

Three libraries: TorchDEQ, keras_deq on TensorFlow and keras_deq on JAX (the same
script, `KERAS_BACKEND=jax`). All start from the same initial weights (drawn once with
NumPy), use Adam 1e-3 (eps 1e-8), batch 64 and the same number of epochs, and the same
solver settings, one configuration of `CONFIGS` at a time:

- `anderson`: Anderson forward (history 6), implicit backward solved with Anderson,
  relative tolerance 1e-4 in both passes, at most 30 + 30 iterations;
- `fixed_point`: the same with a fixed-point forward;
- `anderson_defaults` (mlp only): Anderson forward and backward, 30 + 30 iterations,
  tol 1e-4, everything else TorchDEQ's defaults (its absolute stop mode);
- `torchdeq_defaults` (mlp only): TorchDEQ's defaults throughout: fixed-point forward
  of 40 steps, absolute tol 1e-3, one-step gradient.

Each run is its own subprocess with the same number of intra-op (and inter-op)
threads, one after the other in this single run.

Reported per library and configuration:

- test accuracy after the last epoch;
- forward / backward iterations: cell evaluations per solve (forward) and
  adjoint evaluations per solve (backward), averaged over the last epoch's
  batches. TorchDEQ's own `nstep` is the step of the lowest residual, so its
  solver calls are counted here with a wrapper instead;
- forward / backward relative residual: the last epoch's mean per-sample
  ||f(z)-z|| / ||f(z)|| reported by each library's solver (keras_deq's metrics,
  TorchDEQ's `rel_lowest`); on JAX keras_deq's fit logs have no solver metrics, so
  the forward steps are the layer's `solver_statistics()` averaged over the epoch's
  batches and the other solver columns are `nan`;
- test-set forward residual recomputed here the same way for both libraries on
  the returned state (mean, max, and the fraction of samples at or below tol);
- train time per epoch: median over the epochs after the first (the first
  includes tracing / compilation);
- inference time for the whole test set in one batch (`predict_on_batch` for
  keras_deq): median of `--repeats`;
- the ratios of both times to TorchDEQ's.

Peak training memory is not reported: TensorFlow's CPU allocator statistics and
PyTorch's CPU allocations (invisible to tracemalloc) have no common measure.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

WIDTH = 128
CHANNELS = 8
TOL = 1e-4
MAX_ITER = 30
WINDOW = 6
# Configurations: what each library is given. "rel" ones set every setting in both
# libraries; "*_defaults" ones set only what is listed and leave the rest to TorchDEQ's
# defaults (absolute stop mode, fixed-point forward of 40 steps, tol 1e-3, one-step
# gradient), with keras_deq given the same values.
CONFIGS = {
    "anderson": dict(f_solver="anderson", b_solver="anderson", stop="rel", tol=TOL, f_iter=30),
    "fixed_point": dict(
        f_solver="fixed_point_iter", b_solver="anderson", stop="rel", tol=TOL, f_iter=30
    ),
    "anderson_defaults": dict(
        f_solver="anderson", b_solver="anderson", stop="abs", tol=TOL, f_iter=30
    ),
    "torchdeq_defaults": dict(
        f_solver="fixed_point_iter", b_solver=None, stop="abs", tol=1e-3, f_iter=40
    ),
}
LIBRARIES = ("torchdeq", "keras_deq", "keras_deq_jax", "keras_deq_torch")
# Keras backend of each keras_deq library.
KERAS_BACKENDS = {"keras_deq": "tensorflow", "keras_deq_jax": "jax", "keras_deq_torch": "torch"}


# ------------------------------------------------------------------ processes
def set_threads(threads):
    """Intra- and inter-op threads of the running Keras backend (JAX reads its
    `XLA_FLAGS`, set by `spawn`)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    elif keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(threads)


def peak_rss_mib():
    """The process's peak resident memory so far (MiB): the operating system's
    measure, the same for every library (`ru_maxrss` is in KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- shared data
def load_digits_split(seed=0, test_fraction=0.2):
    """Standardized digits, stratified split: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype("float32"), y, test_size=test_fraction, stratify=y, random_state=seed
    )
    # Pixels that are constant in the training split keep scale 1 (a tiny epsilon
    # would blow test values up to ~1e6 and overflow float16).
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    return x_train.astype("float32"), y_train.astype("int64"), x_test.astype("float32"), y_test


def _glorot(rng, shape, fan_in, fan_out):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, shape).astype("float32")


def _orthogonal(rng, n, gain):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return (gain * q * np.sign(np.diag(r))).astype("float32")


def initial_weights(cell, seed=0):
    """The initial weights both libraries load, in Keras layouts (HWIO kernels)."""
    rng = np.random.default_rng(seed)
    if cell == "mlp":
        return {
            "inj_w": _glorot(rng, (64, WIDTH), 64, WIDTH),
            "inj_b": np.zeros(WIDTH, "float32"),
            "cell_w": _orthogonal(rng, WIDTH, 0.5),  # keras_deq.DenseCell's default
            "cell_u": _glorot(rng, (WIDTH, WIDTH), WIDTH, WIDTH),
            "cell_b": np.zeros(WIDTH, "float32"),
            "head_w": _glorot(rng, (WIDTH, 10), WIDTH, 10),
            "head_b": np.zeros(10, "float32"),
        }
    fan = 9 * CHANNELS
    return {
        "inj_w": _glorot(rng, (3, 3, 1, CHANNELS), 9, fan),
        "inj_b": np.zeros(CHANNELS, "float32"),
        # Small enough that the untrained cell is a contraction.
        "cell_w": (rng.standard_normal((3, 3, CHANNELS, CHANNELS)) * 0.5 / np.sqrt(fan)).astype(
            "float32"
        ),
        "cell_b": np.zeros(CHANNELS, "float32"),
        # Flattened state in (H, W, C) order, as keras.layers.Flatten reads it.
        "head_w": _glorot(rng, (64 * CHANNELS, 10), 64 * CHANNELS, 10),
        "head_b": np.zeros(10, "float32"),
    }


def _summary(rel, tol=TOL):
    rel = np.asarray(rel, dtype="float64")
    return {
        "test_res_mean": float(rel.mean()),
        "test_res_max": float(rel.max()),
        "test_converged": float((rel <= tol).mean()),
    }


# ------------------------------------------------------------------ keras_deq
def keras_settings(config):
    """`DEQ` arguments for a configuration of `CONFIGS`."""
    c = CONFIGS[config]
    anderson = {"window": WINDOW}
    forward = "fixed_point" if c["f_solver"] == "fixed_point_iter" else "anderson"
    settings = dict(
        solver=forward,
        max_iter=c["f_iter"],
        tol=c["tol"],
        stop_mode=c["stop"],
        solver_options=anderson if forward == "anderson" else {},
    )
    if c["b_solver"] is None:
        return {**settings, "backward": "one_step"}
    return {
        **settings,
        "backward": "implicit",
        "backward_solver": "anderson",
        "backward_max_iter": MAX_ITER,
        "backward_tol": c["tol"],
        "backward_solver_options": anderson,
    }


# `--model-jit-compile`: the value of Keras' `compile(jit_compile=...)` for each cell.
MODEL_JIT_COMPILE = {
    "auto": lambda cell: "auto",
    "true": lambda cell: True,
    "false": lambda cell: False,
    "mlp": lambda cell: True if cell == "mlp" else "auto",
}


def run_keras(
    cell,
    config,
    epochs,
    threads,
    repeats,
    seed,
    steps_per_execution=1,
    input_pipeline="numpy",
    deq_jit_compile="auto",
    model_jit_compile="auto",
):
    import keras

    set_threads(threads)
    from keras import ops

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    if cell != "mlp":
        x_train, x_test = x_train.reshape(-1, 8, 8, 1), x_test.reshape(-1, 8, 8, 1)
    deq_kwargs = dict(keras_settings(config), name="deq", jit_compile=deq_jit_compile)
    model = keras_model(cell, initial_weights(cell, seed), deq_kwargs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-8),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
        jit_compile=MODEL_JIT_COMPILE[model_jit_compile](cell),
    )

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self.steps = []
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if "deq_fwd_steps" not in (logs or {}):  # JAX: read the layer's variables
                self.steps.append(self.model.get_layer("deq").solver_statistics()["fwd_steps"])

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    rss_before_fit = peak_rss_mib()
    if input_pipeline == "tf_data" and keras.backend.backend() == "tensorflow":
        history = model.fit(
            tf_data_pipeline(x_train, y_train, seed), epochs=epochs, verbose=0, callbacks=[timer]
        )
    else:
        history = model.fit(
            x_train,
            y_train,
            batch_size=64,
            epochs=epochs,
            verbose=0,
            shuffle=True,
            callbacks=[timer],
        )
    fit_rss = peak_rss_mib() - rss_before_fit
    last = {k: v[-1] for k, v in history.history.items()}
    accuracy = float(np.mean(np.argmax(model.predict(x_test, verbose=0), -1) == y_test))
    model.predict_on_batch(x_test)
    infer_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict_on_batch(x_test)
        infer_times.append(time.perf_counter() - start)

    deq, injection = model.get_layer("deq"), model.get_layer("injection")
    x_inj = injection(ops.convert_to_tensor(x_test))
    z = deq(x_inj)
    fz = ops.convert_to_numpy(deq.cell(z, x_inj)).reshape(len(x_test), -1)
    diff = fz - ops.convert_to_numpy(z).reshape(len(x_test), -1)
    rel = np.linalg.norm(diff, axis=1) / (np.linalg.norm(fz, axis=1) + 1e-8)
    nan = float("nan")
    return {
        "accuracy": accuracy,
        "fwd_steps": float(last.get("deq_fwd_steps", np.mean(timer.steps or [nan]))),
        "bwd_steps": float(last.get("deq_bwd_steps", nan)),
        "fwd_res": float(last.get("deq_fwd_residual", nan)),
        "bwd_res": float(last.get("deq_bwd_residual", nan)),
        "epoch_times": timer.times,
        "infer_times": infer_times,
        "jit_compile": bool(model.jit_compile),
        "fit_rss_mib": fit_rss,
        **_summary(rel, CONFIGS[config]["tol"]),
    }


def keras_model(cell, w, deq_kwargs):
    """The uncompiled keras_deq model of `cell` (`"mlp"` or `"conv"`) with the initial
    weights `w` and the `DEQ` arguments `deq_kwargs`."""
    import keras

    import keras_deq

    if cell == "mlp":
        deq_cell = keras_deq.DenseCell(WIDTH)
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(WIDTH, name="injection"),
                keras_deq.DEQ(deq_cell, **deq_kwargs),
                keras.layers.Dense(10, name="classifier"),
            ]
        )
        deq_cell.set_weights([w["cell_w"], w["cell_u"], w["cell_b"]])
    else:
        deq_cell = ConvCell()
        model = keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(CHANNELS, 3, padding="same", name="injection"),
                keras_deq.DEQ(deq_cell, **deq_kwargs),
                keras.layers.Flatten(),
                keras.layers.Dense(10, name="classifier"),
            ]
        )
        deq_cell.set_weights([w["cell_w"], w["cell_b"]])
    model.get_layer("injection").set_weights([w["inj_w"], w["inj_b"]])
    model.get_layer("classifier").set_weights([w["head_w"], w["head_b"]])
    return model


def tf_data_pipeline(x, y, seed):
    """The training set as TensorFlow's input-pipeline guide builds it: cached,
    reshuffled every epoch, batched by 64, prefetched."""
    import tensorflow as tf

    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .cache()
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        .batch(64)
        .prefetch(tf.data.AUTOTUNE)
    )


def _conv_cell_class():
    import keras

    class ConvCellImpl(keras.layers.Layer):
        """z <- tanh(conv3x3(z) + x_inj)."""

        def build(self, z_shape, x_shape):
            self.conv = keras.layers.Conv2D(CHANNELS, 3, padding="same", name="conv")
            self.conv.build(z_shape)

        def call(self, z, x):
            return keras.ops.tanh(self.conv(z) + x)

        def compute_output_shape(self, z_shape, x_shape):
            return z_shape

    return ConvCellImpl


def ConvCell():  # noqa: N802 - a factory standing in for the class
    return _conv_cell_class()(name="conv_cell")


# ------------------------------------------------------------------- TorchDEQ
def run_torch(cell, config, epochs, threads, repeats, seed):
    import torch
    from torch import nn
    from torchdeq import get_deq
    from torchdeq.grad import backward_factory

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    w = initial_weights(cell, seed)
    c = CONFIGS[config]
    # Only what the configuration lists is set; the rest stays TorchDEQ's default (its
    # stop modes are absolute, its default gradient the one-step gradient).
    settings = dict(f_solver=c["f_solver"], f_max_iter=c["f_iter"], f_tol=c["tol"])
    if c["b_solver"] is not None:
        settings.update(b_solver=c["b_solver"], b_max_iter=MAX_ITER, b_tol=c["tol"], ift=True)
    if c["stop"] == "rel":
        settings.update(f_stop_mode="rel", b_stop_mode="rel")
    deq = get_deq(**settings)
    counts = {"fwd": [], "bwd": [], "fwd_res": [], "bwd_res": []}

    def counted(solve, key, extra=None):
        def run(func, x0, **kwargs):
            calls = [0]

            def g(z):
                calls[0] += 1
                return func(z)

            kwargs = {**(extra or {}), **kwargs}
            out = solve(g, x0, **kwargs)
            counts[key].append(calls[0])
            return out

        return run

    # Count the cell evaluations of both passes (TorchDEQ's `nstep` is the step of
    # the lowest residual, not the number of iterations run). Anderson's history
    # is m=6 in both passes (TorchDEQ's default).
    deq.f_solver = counted(deq.f_solver, "fwd")
    if c["b_solver"] is not None:
        deq.produce_grad[-1] = backward_factory(
            grad_type="ift",
            hook_ift=False,
            b_solver=counted(deq.b_solver, "bwd"),
            b_solver_kwargs=dict(max_iter=MAX_ITER, tol=c["tol"], stop_mode=c["stop"]),
        )

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            if cell == "mlp":
                self.inj = nn.Linear(64, WIDTH)
                self.w = nn.Linear(WIDTH, WIDTH, bias=False)
                self.u = nn.Linear(WIDTH, WIDTH)
                self.head = nn.Linear(WIDTH, 10)
                with torch.no_grad():
                    self.inj.weight.copy_(t(w["inj_w"].T))
                    self.inj.bias.copy_(t(w["inj_b"]))
                    self.w.weight.copy_(t(w["cell_w"].T))
                    self.u.weight.copy_(t(w["cell_u"].T))
                    self.u.bias.copy_(t(w["cell_b"]))
            else:
                self.inj = nn.Conv2d(1, CHANNELS, 3, padding=1)
                self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
                self.head = nn.Linear(64 * CHANNELS, 10)
                with torch.no_grad():
                    self.inj.weight.copy_(t(w["inj_w"].transpose(3, 2, 0, 1)))
                    self.inj.bias.copy_(t(w["inj_b"]))
                    self.conv.weight.copy_(t(w["cell_w"].transpose(3, 2, 0, 1)))
                    self.conv.bias.copy_(t(w["cell_b"]))
            with torch.no_grad():
                self.head.weight.copy_(t(w["head_w"].T))
                self.head.bias.copy_(t(w["head_b"]))

        def cell_fn(self, x_inj):
            if cell == "mlp":
                u = self.u(x_inj)
                return lambda z: torch.tanh(self.w(z) + u)
            return lambda z: torch.tanh(self.conv(z) + x_inj)

        def forward(self, x, writer=None):
            x_inj = self.inj(x)
            z_out, info = deq(self.cell_fn(x_inj), torch.zeros_like(x_inj), backward_writer=writer)
            z = z_out[-1]
            self.info = info
            if cell == "conv":
                z = z.permute(0, 2, 3, 1).flatten(1)  # (H, W, C) order, as in Keras
            return self.head(z), z_out[-1], x_inj

    if cell == "conv":
        x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    xtr, ytr, xte = t(x_train), torch.from_numpy(y_train), t(x_test)
    model = Model()
    deq.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-8)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)

    def writer(info):
        counts["bwd_res"].append(info["rel_lowest"].mean().item())

    epoch_times = []
    rss_before_fit = peak_rss_mib()
    n = len(xtr)
    for _ in range(epochs):
        for v in counts.values():
            v.clear()
        model.train()
        start = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 64):
            idx = perm[i : i + 64]
            opt.zero_grad(set_to_none=True)
            logits, _, _ = model(xtr[idx], writer=writer)
            loss = loss_fn(logits, ytr[idx])
            loss.backward()
            opt.step()
            counts["fwd_res"].append(model.info["rel_lowest"].mean().item())
        epoch_times.append(time.perf_counter() - start)
    fit_rss = peak_rss_mib() - rss_before_fit
    last = {k: float(np.mean(v)) for k, v in counts.items()}

    model.eval()
    infer_times = []
    with torch.no_grad():
        model(xte)
        for _ in range(repeats):
            start = time.perf_counter()
            model(xte)
            infer_times.append(time.perf_counter() - start)
        logits, z, x_inj = model(xte)
        accuracy = float((logits.argmax(-1).numpy() == y_test).mean())
        fz = model.cell_fn(x_inj)(z)
        rel = (fz - z).flatten(1).norm(dim=1) / (fz.flatten(1).norm(dim=1) + 1e-8)
    return {
        "accuracy": accuracy,
        "fwd_steps": last["fwd"],
        "bwd_steps": last["bwd"],
        "fwd_res": last["fwd_res"],
        "bwd_res": last["bwd_res"],
        "epoch_times": epoch_times,
        "infer_times": infer_times,
        "fit_rss_mib": fit_rss,
        **_summary(rel.numpy(), c["tol"]),
    }


# ---------------------------------------------------------------------- driver
def worker(args):
    common = (args.cell, args.config, args.epochs, args.threads, args.repeats, args.seed)
    if args.worker == "torchdeq":
        out = run_torch(*common)
    else:
        out = run_keras(
            *common,
            steps_per_execution=args.steps_per_execution,
            input_pipeline=args.input,
            deq_jit_compile={"auto": "auto", "true": True, "false": False}[args.deq_jit_compile],
            model_jit_compile=args.model_jit_compile,
        )
    print("RESULT " + json.dumps(out), flush=True)


def spawn(lib, cell, config, args):
    env = dict(os.environ)
    env["KERAS_BACKEND"] = KERAS_BACKENDS.get(lib, "tensorflow")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["OMP_NUM_THREADS"] = str(args.threads)
    if lib == "keras_deq_jax" and args.threads == 1:
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
            " intra_op_parallelism_threads=1"
        ).strip()
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        lib,
        "--cell",
        cell,
        "--config",
        config,
        "--epochs",
        str(args.epochs),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--seed",
        str(args.seed),
        "--steps-per-execution",
        str(args.steps_per_execution),
        "--input",
        args.input,
        "--deq-jit-compile",
        args.deq_jit_compile,
        "--model-jit-compile",
        args.model_jit_compile,
    ]
    return run_worker(cmd, env, f"{lib} {cell} {config}")


def run_worker(cmd, env, what):
    """Runs a worker process; returns the JSON its `RESULT ` line prints."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    raise RuntimeError(f"{what} failed (exit {proc.returncode})")


def epoch_time(result):
    times = result["epoch_times"]
    return statistics.median(times[1:] if len(times) > 1 else times)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 epochs, 3 repeats (smoke run)")
    parser.add_argument("--cells", nargs="+", default=["mlp", "conv"], choices=["mlp", "conv"])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        choices=list(CONFIGS),
        help="configurations (the *_defaults ones run on the mlp cell only)",
    )
    parser.add_argument(
        "--steps-per-execution",
        type=int,
        default=1,
        help="Keras' compile(steps_per_execution=...) for keras_deq (Keras' default 1)",
    )
    parser.add_argument(
        "--input",
        default="numpy",
        choices=["numpy", "tf_data"],
        help="keras_deq on TensorFlow: fit on the NumPy arrays (Keras' array adapter) or "
        "on a tf.data pipeline (cache, shuffle, batch, prefetch); JAX always takes the arrays",
    )
    parser.add_argument(
        "--deq-jit-compile",
        default="auto",
        choices=["auto", "true", "false"],
        help="keras_deq's DEQ(jit_compile=...): its solves compiled apart by XLA",
    )
    parser.add_argument(
        "--model-jit-compile",
        default="auto",
        choices=list(MODEL_JIT_COMPILE),
        help="Keras' compile(jit_compile=...) for keras_deq on TensorFlow: the whole training "
        "step compiled by XLA ('auto': Keras' default, no XLA on a CPU-only machine; 'mlp': "
        "True for the mlp cell, 'auto' for the conv cell, whose convolution gradients XLA "
        "computes slowly on CPU)",
    )
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES[:3]), choices=LIBRARIES)
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--cell", default="mlp", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="anderson", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats = 3, 3
    if args.worker:
        return worker(args)

    print(
        f"epochs={args.epochs} threads={args.threads} repeats={args.repeats} batch=64 "
        f"Adam(1e-3) steps_per_execution={args.steps_per_execution} input={args.input} "
        f"DEQ(jit_compile={args.deq_jit_compile}) compile(jit_compile={args.model_jit_compile}) "
        "(keras_deq); "
        f"configurations: {CONFIGS}",
        flush=True,
    )
    # Here, not at the top: the worker processes do not draw the bar.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from progress import Progress  # noqa: PLC0415

    # Skip the *_defaults configurations on the conv cell.
    pairs = [
        (cell, config)
        for cell in args.cells
        for config in args.configs
        if cell == "mlp" or not config.endswith("_defaults")
    ]
    rows = []
    with Progress(len(pairs) * len(args.libraries), unit_name="run") as progress:
        for cell, config in pairs:
            # Alternate the libraries so that slow drifts in machine load hit all.
            runs = {}
            for lib in args.libraries:
                runs[lib] = spawn(lib, cell, config, args)
                r = runs[lib]
                progress.advance()
                progress.print(
                    f"  done {cell:4s} {config:17s} {lib:13s} acc={r['accuracy']:.4f} "
                    f"epoch={epoch_time(r) * 1e3:.0f}ms"
                )
            rows.append((cell, config, runs))
    print_table(rows)


def print_table(rows):
    header = (
        "| cell | configuration | library | test acc | fwd iters | bwd iters | fwd rel res "
        "| bwd rel res | test res mean / max | test conv. | epoch ms | infer ms "
        "| epoch ratio | infer ratio |"
    )
    print()
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    names = {
        "torchdeq": "TorchDEQ",
        "keras_deq": "keras_deq (TF)",
        "keras_deq_jax": "keras_deq (JAX)",
        "keras_deq_torch": "keras_deq (PyTorch)",
    }
    for cell, config, runs in rows:
        base = runs.get("torchdeq")
        for lib, r in runs.items():
            ratios = "- | -"
            if base is not None:
                e_ratio = epoch_time(r) / epoch_time(base)
                i_ratio = statistics.median(r["infer_times"]) / statistics.median(
                    base["infer_times"]
                )
                ratios = f"{e_ratio:.2f} | {i_ratio:.2f}"
            print(
                f"| {cell} | {config} | {names[lib]} | {r['accuracy'] * 100:.1f}% "
                f"| {r['fwd_steps']:.1f} | {r['bwd_steps']:.1f} "
                f"| {r['fwd_res']:.1e} | {r['bwd_res']:.1e} "
                f"| {r['test_res_mean']:.1e} / {r['test_res_max']:.1e} "
                f"| {r['test_converged'] * 100:.0f}% "
                f"| {epoch_time(r) * 1e3:.0f} | {statistics.median(r['infer_times']) * 1e3:.1f} "
                f"| {ratios} |"
            )
    print()
    for cell, config, runs in rows:
        print(
            f"{cell} {config}: epoch times (s): "
            + ", ".join(
                f"{lib}=" + "/".join(f"{x:.2f}" for x in runs[lib]["epoch_times"]) for lib in runs
            )
        )


if __name__ == "__main__":
    main()
