"""Deep OptEq on images: the paper's 5-conv CIFAR-10 model (Xie et al., TPAMI 2023, Sec. 7).

    python examples/vision/opteq_cifar10.py                       # digits, offline, ~2 min
    python examples/vision/opteq_cifar10.py --kind dense          # digits, dense units, ~40 s
    python examples/vision/opteq_cifar10.py --prior decorrelation --prior-mode sam
    python examples/vision/opteq_cifar10.py --model explicit      # same-size explicit CNN
    python examples/vision/opteq_cifar10.py --dataset cifar10 --epochs 200 \\
        --optimizer sgd --learning-rate 0.1 --batch-size 125      # tensorflow-datasets

The CIFAR-10 model. The paper gives five 3x3 conv units with 16/32/64/128/128
channels and 199 k parameters (Table 3) but not the width of the state. Here
unit `l` has `W_l`: 3x3 conv, `m -> n_l`, its adjoint back to `m`, and `U_l`:
3x3 conv from the `m`-channel input `x`, plus a bias (`z0 = x` forces the
state and the input to share `m` channels). The block then has
`sum_l n_l (9m + 9m + 1) = 368 (18m + 1)` parameters: 199,088 for `m = 30`, the
only width that gives 199 k. Around it:

- extractor `g`: Conv3x3(3 -> 30) + ReLU (840 parameters);
- `OptEqBlock`: units 16/32/64/128/128 on 30 channels, alpha = 0.8, K = 20
  unrolled steps (199,088);
- head: global average pooling + Dense(10) (310). Total 200,238.

`--dataset digits` (the offline default, 8x8x1 images) uses the same structure
at a quarter of the widths: `m = 8`, units 4/8/16/32/32, and a Flatten head
(an 8x8 map is too small to pool). `--kind dense` swaps in dense units
(64 -> Dense(64) -> units 32/64/128/128/128 -> Dense(10)), 5x faster on a CPU.
`--model explicit` trains a feed-forward network of the same parameter count
(the extractor, five plain layers of a matched width, the same head).
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_deq  # noqa: E402
from keras_deq.layers.opteq import PRIOR_MODES, PRIORS, OptEqBlock  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import data  # noqa: E402

DATASETS = ("digits", "cifar10")
INPUT_SHAPES = {"digits": (8, 8, 1), "cifar10": (32, 32, 3)}
# (state width m, unit widths n_l, head) per dataset and kind.
ARCHITECTURES = {
    ("cifar10", "conv"): (30, (16, 32, 64, 128, 128), "gap"),
    ("digits", "conv"): (8, (4, 8, 16, 32, 32), "flatten"),
    ("digits", "dense"): (64, (32, 64, 128, 128, 128), None),
    ("cifar10", "dense"): (256, (64, 128, 256, 256, 256), None),
}
EXPLICIT_DEPTH = 5


def _architecture(dataset, kind):
    if dataset not in DATASETS:
        raise ValueError(f"`dataset` must be one of {DATASETS}. Received: dataset={dataset!r}")
    if kind not in ("conv", "dense"):
        raise ValueError(f"`kind` must be 'conv' or 'dense'. Received: kind={kind!r}")
    return ARCHITECTURES[(dataset, kind)]


def _extractor(inputs, kind, width):
    if kind == "conv":
        return keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="extractor")(
            inputs
        )
    flat = keras.layers.Flatten()(inputs)
    return keras.layers.Dense(width, activation="relu", name="extractor")(flat)


def _head(features, head, classes):
    if head == "gap":
        features = keras.layers.GlobalAveragePooling2D()(features)
    elif head == "flatten":
        features = keras.layers.Flatten()(features)
    return keras.layers.Dense(classes, name="classifier")(features)


def build_opteq_model(dataset="digits", kind="conv", classes=10, **block_kwargs):
    """The deep OptEq classifier: extractor, `OptEqBlock` (named "opteq"), head.

    Args:
        dataset: `"digits"` or `"cifar10"` (sets the input shape and widths).
        kind: `"conv"` (the paper's) or `"dense"` units.
        classes: Number of classes.
        **block_kwargs: `OptEqBlock` arguments (alpha, prior, training_mode, ...).

    Returns:
        A `keras.Model`.
    """
    width, units, head = _architecture(dataset, kind)
    block_kwargs = {"alpha": 0.8, "unroll_steps": 20, **block_kwargs}
    inputs = keras.Input(INPUT_SHAPES[dataset])
    x = _extractor(inputs, kind, width)
    z = OptEqBlock(list(units), kind=kind, name="opteq", **block_kwargs)(x)
    return keras.Model(inputs, _head(z, head, classes), name=f"opteq_{dataset}_{kind}")


def trainable_params(model):
    """The number of trainable parameters (the paper's counts; the block's DEQ also holds
    a few non-trainable scalars, its regularizer's controls)."""
    return sum(int(keras.ops.size(w)) for w in model.trainable_weights)


def _explicit_count(dataset, kind, hidden, classes):
    """Parameters of `build_explicit_model` with `hidden` channels, in closed form."""
    width, _, head = _architecture(dataset, kind)
    shape = INPUT_SHAPES[dataset]
    if kind == "conv":
        k = 9
        count = k * shape[2] * width + width + k * width * hidden + hidden
        count += (EXPLICIT_DEPTH - 1) * (k * hidden * hidden + hidden)
        features = hidden * (shape[0] * shape[1] if head == "flatten" else 1)
    else:
        inputs = shape[0] * shape[1] * shape[2]
        count = inputs * width + width + width * hidden + hidden
        count += (EXPLICIT_DEPTH - 1) * (hidden * hidden + hidden)
        features = hidden
    return count + features * classes + classes


def build_explicit_model(dataset="digits", kind="conv", classes=10, target_params=None):
    """A feed-forward network with (about) the parameter count of the OptEq model.

    The same extractor and head as `build_opteq_model`, with five plain layers
    (3x3 Conv + ReLU, or Dense + ReLU) of one width in between, the width chosen
    to match `target_params` (by default the OptEq model's count).

    Returns:
        A `keras.Model`.
    """
    width, _, head = _architecture(dataset, kind)
    if target_params is None:
        target_params = trainable_params(build_opteq_model(dataset, kind, classes))
    hidden = min(
        range(1, 1025),
        key=lambda h: abs(_explicit_count(dataset, kind, h, classes) - target_params),
    )
    inputs = keras.Input(INPUT_SHAPES[dataset])
    h = _extractor(inputs, kind, width)
    for i in range(EXPLICIT_DEPTH):
        if kind == "conv":
            h = keras.layers.Conv2D(hidden, 3, padding="same", activation="relu", name=f"conv{i}")(
                h
            )
        else:
            h = keras.layers.Dense(hidden, activation="relu", name=f"dense{i}")(h)
    return keras.Model(inputs, _head(h, head, classes), name=f"explicit_{dataset}_{kind}")


def block_options(args):
    """`OptEqBlock` arguments from the command line."""
    return {
        "alpha": args.alpha,
        "learnable_alpha": args.learnable_alpha,
        "prior": None if args.prior == "none" else args.prior,
        "prior_mode": args.prior_mode,
        "prior_strength": args.prior_strength,
        "training_mode": args.training_mode,
        "unroll_steps": args.unroll_steps,
        "solver": args.solver,
        "max_iter": args.max_iter,
        "tol": args.tol,
        "deq_options": {"on_failure": "ignore"},
    }


def make_optimizer(name, learning_rate, weight_decay, steps_per_epoch, halve_every=30):
    """Adam, or the paper's SGD (momentum 0.9) with the rate halved every 30 epochs."""
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    schedule = keras.optimizers.schedules.ExponentialDecay(
        learning_rate, steps_per_epoch * halve_every, 0.5, staircase=True
    )
    return keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=weight_decay or None)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="digits", choices=DATASETS)
    parser.add_argument("--kind", default="conv", choices=("conv", "dense"))
    parser.add_argument("--model", default="opteq", choices=("opteq", "explicit"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=3e-4, help="SGD only")
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--learnable-alpha", action="store_true")
    parser.add_argument("--prior", default="none", choices=("none", *PRIORS))
    parser.add_argument("--prior-mode", default="structural", choices=PRIOR_MODES)
    parser.add_argument("--prior-strength", type=float, default=0.01)
    parser.add_argument("--training-mode", default="unrolled", choices=("unrolled", "implicit"))
    parser.add_argument("--unroll-steps", type=int, default=20)
    parser.add_argument("--solver", default="broyden")
    parser.add_argument("--max-iter", type=int, default=50)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--limit", type=int, default=None, help="keep this many examples")
    parser.add_argument("--threads", type=int, default=0, help="0: TensorFlow's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1)
    return parser.parse_args(argv)


def train(args):
    """Trains the model the arguments describe; returns a dict of results."""
    if args.threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
            tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        except RuntimeError:  # TensorFlow already started: keep its threads
            print("note: TensorFlow was already initialized; --threads is ignored")
    keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_test, y_test = data.load(args.dataset, seed=args.seed, limit=args.limit)
    if args.model == "opteq":
        model = build_opteq_model(args.dataset, args.kind, **block_options(args))
    else:
        model = build_explicit_model(args.dataset, args.kind)
    steps = -(-len(x_train) // args.batch_size)
    model.compile(
        optimizer=make_optimizer(args.optimizer, args.learning_rate, args.weight_decay, steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # The solver columns need a DEQ layer (OptEqBlock has one in every mode); only the
    # implicit mode has a backward solve.
    opteq = args.model == "opteq"
    implicit = opteq and args.training_mode == "implicit"
    stats = ("fwd_steps", "bwd_steps", "converged") if implicit else ("fwd_steps", "converged")
    report = keras_deq.callbacks.SolverLogger(
        metrics={"accuracy": "train acc", "val_accuracy": "test acc"},
        stats=stats if opteq else (),
    )
    start = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        verbose=0,
        callbacks=[report] if args.verbose else [],
    )
    seconds = time.perf_counter() - start
    scores = model.evaluate(x_test, y_test, batch_size=256, verbose=0, return_dict=True)
    accuracy = scores["accuracy"]
    return {
        "model": model,
        "accuracy": float(accuracy),
        "params": trainable_params(model),
        "seconds": seconds,
        "history": history.history,
    }


def main(argv=None):
    args = parse_args(argv)
    result = train(args)
    print(f"parameters: {result['params']}")
    print(f"test accuracy: {result['accuracy']:.4f}")
    return result["accuracy"]


if __name__ == "__main__":
    main()
