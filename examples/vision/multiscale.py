"""Train a small multiscale DEQ image classifier: MDEQ or the Lipschitz multiscale DEQ.

    python examples/vision/multiscale.py                      # Lipschitz MDEQ on digits
    python examples/vision/multiscale.py --model mdeq         # plain MDEQ on digits
    python examples/vision/multiscale.py --dataset cifar10    # needs tensorflow-datasets
    python examples/vision/multiscale.py --help

The model is a conv stem, a multiscale DEQ layer (`MultiscaleDEQ` or
`LipschitzMultiscale`, whose state is one feature map per resolution), and a
linear classifier on the flattened branches. `digits` is scikit-learn's bundled
8x8 digits (no download, the default). `mnist`, `svhn_cropped` and `cifar10` are
loaded with tensorflow-datasets (an optional extra:
`pip install "keras-deq[examples]"`), which downloads them on first use; see
`data.py`, the vision examples' shared loader. Images are standardized per
channel.

Each epoch prints the train and test accuracy, the mean forward and backward
solver steps, the fraction of samples whose forward solve converged, and the
epoch's wall time.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import backend_flag  # noqa: E402

backend_flag.apply()  # `--backend NAME`, before Keras loads

import keras  # noqa: E402

import keras_deq  # noqa: E402
from keras_deq.layers.multiscale import LipschitzMultiscale, MultiscaleDEQ  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import data  # noqa: E402  (the vision examples' shared loader)

MODELS = {"mdeq": MultiscaleDEQ, "lipschitz": LipschitzMultiscale}
NUM_CLASSES = 10  # every dataset of data.DATASETS


# ------------------------------------------------------------------------ model
def build_model(
    input_shape,
    num_classes,
    model="lipschitz",
    channels=(8, 16),
    solver="anderson",
    backward="implicit",
    max_iter=18,
    backward_max_iter=20,
    tol=1e-3,
    jacobian_weight=0.0,
):
    """Stem conv -> multiscale DEQ (layer `deq`) -> flattened branches -> Dense classifier.

    Images wider than 16 pixels are halved by a strided stem, as MDEQ does.
    """
    if model not in MODELS:
        raise ValueError(f"`model` must be one of {tuple(MODELS)}. Received: model={model!r}")
    inputs = keras.Input(input_shape)
    stride = 2 if input_shape[0] > 16 else 1
    x = keras.layers.Conv2D(channels[0], 3, strides=stride, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(name="injection")(x)
    branches = MODELS[model](
        channels=channels,
        solver=solver,
        backward=backward,
        max_iter=max_iter,
        backward_max_iter=backward_max_iter,
        tol=tol,
        jacobian_weight=jacobian_weight,
        on_failure="ignore",  # tracked by the `deq_converged` metric
        name="deq",
    )(x)
    # Each branch ends in a group normalization that centers it, so global average
    # pooling alone would keep little of the signal: flatten (fine at these sizes).
    flat = [keras.layers.Flatten()(z) for z in branches]
    features = keras.layers.Concatenate()(flat) if len(flat) > 1 else flat[0]
    logits = keras.layers.Dense(num_classes, name="classifier")(features)
    return keras.Model(inputs, logits, name=f"{model}_classifier")


def parse_channels(text):
    return tuple(int(c) for c in text.split(","))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    backend_flag.add_to(parser)
    parser.add_argument("--model", default="lipschitz", choices=tuple(MODELS))
    parser.add_argument("--dataset", default="digits", choices=data.DATASETS)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--channels", type=parse_channels, default=(8, 16), help="per branch, e.g. 8,16"
    )
    # GMRES solves affine maps only: an adjoint solver, refused as a DEQ's forward solver.
    forward_solvers = [
        n for n in keras_deq.solvers.names() if not keras_deq.solvers.get(n).affine_only
    ]
    parser.add_argument("--solver", default="anderson", choices=forward_solvers)
    parser.add_argument("--backward", default="implicit", choices=keras_deq.backward.MODES)
    parser.add_argument("--max-iter", type=int, default=18)
    parser.add_argument("--backward-max-iter", type=int, default=20)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--jacobian-weight", type=float, default=0.0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--limit", type=int, default=None, help="use only this many train and test samples"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="TensorFlow intra/inter-op threads"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pad-crop and flip augmentation (default: on for cifar10 only)",
    )
    args = parser.parse_args(argv)

    if args.threads and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_test, y_test = data.load(args.dataset, args.seed, args.limit)
    model = build_model(
        x_train.shape[1:],
        NUM_CLASSES,
        model=args.model,
        channels=args.channels,
        solver=args.solver,
        backward=args.backward,
        max_iter=args.max_iter,
        backward_max_iter=args.backward_max_iter,
        tol=args.tol,
        jacobian_weight=args.jacobian_weight,
    )
    classifier = model
    model = data.with_augmentation(classifier, args.dataset, args.augment)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    print(
        f"{args.model} on {args.dataset}: {len(x_train)} train / {len(x_test)} test images "
        f"of shape {x_train.shape[1:]}, {model.count_params()} parameters"
    )
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        verbose=0,
        callbacks=[
            keras_deq.callbacks.SolverLogger(
                metrics={"accuracy": "train acc", "val_accuracy": "test acc"},
                stats=("fwd_steps", "bwd_steps", "val_fwd_steps", "converged"),
            )
        ],
    )
    accuracy = model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
    print(f"test accuracy: {accuracy:.4f}")
    cell = classifier.get_layer("deq").cell
    if args.model == "lipschitz":
        print(f"Lipschitz bound of the cell: {float(cell.lipschitz_bound()):.3f}")
    return accuracy


if __name__ == "__main__":
    main()
