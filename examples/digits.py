"""Train a DEQ classifier on scikit-learn's bundled 8x8 digits (no download).

    python examples/digits.py            # ~1 minute on 2 CPU cores
    python examples/digits.py --help

The model is an ordinary `keras.Sequential`: a Dense injection, a `keras_deq.DEQ`
layer around a tanh cell, and a Dense classifier. Each epoch prints the test
accuracy and the solver's statistics (mean forward/backward steps and residuals).
"""

import argparse
import os
import sys

# `--backend NAME` (tensorflow, jax, torch) wins over KERAS_BACKEND; set before Keras loads.
# (The other examples share examples/backend_flag.py; this one stays a single file.)
if "--backend" in sys.argv[:-1]:
    os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend") + 1]
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import keras_deq  # noqa: E402


def load_digits_split(seed=0, test_fraction=0.2):
    """Standardized digits, stratified train/test split (float32 features)."""
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
    return x_train.astype("float32"), y_train, x_test.astype("float32"), y_test


def build_model(
    width=128,
    solver="anderson",
    backward="implicit",
    max_iter=30,
    tol=1e-4,
    jacobian_weight=0.0,
):
    """A DEQ classifier for 64 input features and 10 classes."""
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(width, name="injection"),
            keras_deq.DEQ(
                keras_deq.DenseCell(width),
                solver=solver,
                max_iter=max_iter,
                tol=tol,
                backward=backward,
                jacobian_weight=jacobian_weight,
                name="deq",
            ),
            keras.layers.Dense(10, name="classifier"),
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backend",
        choices=("tensorflow", "jax", "torch"),
        help="Keras backend (default: $KERAS_BACKEND, else tensorflow)",
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    # GMRES solves affine maps only: an adjoint solver, refused as a DEQ's forward solver.
    forward_solvers = [
        n for n in keras_deq.solvers.names() if not keras_deq.solvers.get(n).affine_only
    ]
    parser.add_argument("--solver", default="anderson", choices=forward_solvers)
    parser.add_argument("--backward", default="implicit", choices=keras_deq.backward.MODES)
    parser.add_argument("--max-iter", type=int, default=30)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--jacobian-weight", type=float, default=0.0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_test, y_test = load_digits_split(seed=args.seed)
    model = build_model(
        args.width,
        args.solver,
        args.backward,
        args.max_iter,
        args.tol,
        args.jacobian_weight,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
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
                metrics={"accuracy": "train acc", "val_accuracy": "test acc"}
            )
        ],
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)[:2]
    print(f"test accuracy: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
