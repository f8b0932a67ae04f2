"""Train a DEQ classifier on the digits under a `tf.distribute` strategy.

    python examples/distributed/train.py --strategy one_device
    python examples/distributed/train.py --strategy mirrored
    python examples/distributed/train.py --strategy multi_worker --workers 2
    python examples/distributed/train.py --strategy tpu --tpu local
    python examples/distributed/train.py --help

The data are scikit-learn's bundled 8x8 digits (no download); the model is a Dense
injection, a `keras_deq.DEQ` around a tanh `DenseCell` and a Dense classifier. The global
batch (`--batch-size`) is split between the replicas; batches are made with
`drop_remainder=True`, so every step has the same shape (TPUs need static shapes, and the
replicas get equal shares). The same seed gives every run the same initial weights and the
same sequence of batches, so all strategies train the same model up to the solvers'
tolerance.

Strategies:

- `one_device`: `model.fit` without a strategy (one CPU or GPU).
- `mirrored`: `model.fit` under `MirroredStrategy`: all GPUs, or, on a machine without
  GPU, the CPU split into two logical devices.
- `multi_worker`: `keras_deq.distribute.fit_distributed` under
  `MultiWorkerMirroredStrategy` (Keras 3's `fit` fails there, keras-team/keras#20585).
  Without `TF_CONFIG` in the environment, this script starts `--workers` worker processes
  on this machine itself, each with a `TF_CONFIG` naming free localhost ports, waits for
  them (at most `--timeout` seconds) and prints each worker's results. With `TF_CONFIG`
  set (by you or a cluster manager, one process per machine), the process is one worker.
- `tpu`: `model.fit` under `TPUStrategy`, with `TPUClusterResolver(tpu=--tpu)`
  (`--tpu local` on a Cloud TPU VM). It stops with a message when no TPU is found.

Each run prints one line per epoch (loss, accuracy and the DEQ solver statistics, which
are means over the replicas) and, at the end, the test loss and accuracy. With
`--output-dir`, each process also writes `result-<name>.json` (the history and test
results) and `weights-<name>.npz` (the trained weights).
"""

import argparse
import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_deq  # noqa: E402

STRATEGIES = ("one_device", "mirrored", "multi_worker", "tpu")
STATS = ("fwd_steps", "bwd_steps", "converged")  # the solver statistics of each epoch line


# ------------------------------------------------------------------ data, model
def load_digits_split(seed=0, test_fraction=0.2):
    """Standardized digits, stratified train/test split (float32 features)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype("float32"), y, test_size=test_fraction, stratify=y, random_state=seed
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def train_dataset(x, y, batch_size, seed):
    """Shuffled global batches of a static shape, in the same order in every process.

    The order is the same in every epoch: `model.fit` under a strategy iterates the dataset
    once to build the model, so with `reshuffle_each_iteration=True` its epochs would see
    other permutations than those of a run without strategy.
    """
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=False)
        .batch(batch_size, drop_remainder=True)
    )


def build_model(width, max_iter, learning_rate):
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(width, name="injection"),
            keras_deq.DEQ(keras_deq.DenseCell(width), max_iter=max_iter, name="deq"),
            keras.layers.Dense(10, name="classifier"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def weights_digest(model):
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------ strategies
def split_cpu(n):
    """Splits the CPU into `n` logical devices (before TensorFlow initializes them)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError:  # Already initialized: use the devices as they are.
        pass
    return [d.name for d in tf.config.list_logical_devices("CPU")[:n]]


def tpu_strategy(tpu):
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise SystemExit(
            f"--strategy tpu: no TPU found ({type(error).__name__}: {first_line}). Run on a "
            "machine with a TPU: `--tpu local` on a Cloud TPU VM, `--tpu NAME` (or the "
            "TPU_NAME environment variable) for a TPU node."
        ) from None
    return tf.distribute.TPUStrategy(resolver)


def make_strategy(args):
    if args.strategy == "one_device":
        return tf.distribute.get_strategy()  # The default strategy: no distribution.
    if args.strategy == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        devices = split_cpu(2)
        if len(devices) < 2:
            raise SystemExit("--strategy mirrored: could not split the CPU into 2 devices.")
        return tf.distribute.MirroredStrategy(devices)
    if args.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()  # Reads TF_CONFIG.
    return tpu_strategy(args.tpu)


# ------------------------------------------------------------------ one process
def evaluate(model, x, y):
    """Test loss and accuracy, computed here (the model's weights are the same everywhere)."""
    logits = np.asarray(model(x, training=False), dtype="float64")
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(y)), y].mean())
    return loss, float((logits.argmax(axis=1) == y).mean())


def train(args):
    """Trains in this process (one worker, for `multi_worker`); returns the results."""
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    name = f"worker-{task.get('index', 0)}" if args.strategy == "multi_worker" else args.strategy
    strategy = make_strategy(args)
    keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_test, y_test = load_digits_split(seed=args.seed)
    dataset = train_dataset(x_train, y_train, args.batch_size, args.seed)
    with strategy.scope():
        model = build_model(args.width, args.max_iter, args.learning_rate)
    initial = weights_digest(model)
    report = keras_deq.callbacks.SolverLogger(
        metrics=("loss", "accuracy"), stats=STATS, prefix=f"[{name}] "
    )
    start = time.perf_counter()
    if args.strategy == "multi_worker":
        history = keras_deq.distribute.fit_distributed(
            model, dataset, epochs=args.epochs, strategy=strategy, callbacks=[report], verbose=0
        )
    else:
        history = model.fit(
            dataset, epochs=args.epochs, callbacks=[report], shuffle=False, verbose=0
        )
    seconds = time.perf_counter() - start
    test_loss, test_accuracy = evaluate(model, x_test, y_test)
    result = {
        "name": name,
        "strategy": args.strategy,
        "replicas": strategy.num_replicas_in_sync,
        "history": {k: [float(v) for v in values] for k, values in history.history.items()},
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "initial_weights": initial,
        "final_weights": weights_digest(model),
        "seconds": seconds,
    }
    print(
        f"[{name}] replicas {result['replicas']}: test loss {test_loss:.4f}, "
        f"test accuracy {test_accuracy:.4f}, weights {result['final_weights']}",
        flush=True,
    )
    if args.output_dir:
        out = pathlib.Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"result-{name}.json").write_text(json.dumps(result, indent=1))
        np.savez(out / f"weights-{name}.npz", *model.get_weights())
    return result


# ------------------------------------------------------------------ workers
def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _log_tail(path, lines=30):
    text = pathlib.Path(path).read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def launch_workers(args):
    """Starts `args.workers` local worker processes and returns their results."""
    out = pathlib.Path(args.output_dir or tempfile.mkdtemp(prefix="deq-multi-worker-"))
    out.mkdir(parents=True, exist_ok=True)
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(args.workers)]}
    command = [
        sys.executable,
        str(pathlib.Path(__file__).resolve()),
        "--strategy=multi_worker",
        f"--epochs={args.epochs}",
        f"--batch-size={args.batch_size}",
        f"--width={args.width}",
        f"--max-iter={args.max_iter}",
        f"--learning-rate={args.learning_rate}",
        f"--seed={args.seed}",
        f"--output-dir={out}",
    ]
    print(f"starting {args.workers} workers on {', '.join(cluster['worker'])}; logs in {out}")
    processes, logs = [], []
    try:
        for index in range(args.workers):
            config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            env = dict(os.environ, TF_CONFIG=json.dumps(config))
            logs.append(out / f"worker-{index}.log")
            with open(logs[-1], "w") as log:
                processes.append(
                    subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
                )
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in processes):
            failed = [i for i, p in enumerate(processes) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                # A worker that stops leaves the others waiting in a collective: stop them.
                reason = f"worker {failed[0]} failed" if failed else f"timeout ({args.timeout} s)"
                tails = "\n".join(
                    f"--- worker {i}:\n{_log_tail(log)}" for i, log in enumerate(logs)
                )
                raise SystemExit(f"multi-worker training stopped: {reason}.\n{tails}")
            time.sleep(0.2)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in processes]
    if any(codes):
        raise SystemExit(f"multi-worker training failed: exit codes {codes}.")
    results = [
        json.loads((out / f"result-worker-{i}.json").read_text()) for i in range(args.workers)
    ]
    for result, log in zip(results, logs, strict=True):
        print(f"--- {result['name']} ({log}):")
        print("\n".join(line for line in log.read_text().splitlines() if line.startswith("[")))
    same = len({r["final_weights"] for r in results}) == 1
    print(f"workers end with identical weights: {'yes' if same else 'NO'}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strategy", choices=STRATEGIES, default="one_device")
    parser.add_argument("--workers", type=int, default=2, help="multi_worker: local workers")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--max-iter", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tpu", default=None, help="tpu: name or address ('local' on a TPU VM)")
    parser.add_argument("--output-dir", default=None, help="where to write results and weights")
    parser.add_argument("--timeout", type=float, default=600, help="multi_worker: seconds")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.epochs < 1 or args.batch_size < 1:
        parser.error("--workers, --epochs and --batch-size must be positive.")
    if args.strategy == "multi_worker" and "TF_CONFIG" not in os.environ:
        return launch_workers(args)
    return train(args)


if __name__ == "__main__":
    main()
