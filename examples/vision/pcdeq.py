"""Positive concave DEQs (pcDEQ) on images: the paper's three architectures.

    python examples/vision/pcdeq.py                      # digits, offline, ~1 min
    python examples/vision/pcdeq.py --net single_conv --variant 2
    python examples/vision/pcdeq.py --dataset mnist      # tensorflow-datasets

Architectures (Gabor et al., ICML 2024; parameter counts in tests):
- `linear`: Flatten -> Dense(80) -> BN -> PcDEQ(80) -> BN -> Dense(classes).
- `single_conv`: Conv3x3(c) -> BN -> conv PcDEQ(c) -> MaxPool(3, 1, same) -> BN
  -> AvgPool(8) -> Dense(classes); c = 82 for MNIST, 125 for SVHN/CIFAR-10.
- `multi_conv`: three stages (12/24/48 channels for MNIST, 20/50/80 otherwise);
  each a 3x3 conv (stride 2 after the first) -> BN -> conv PcDEQ -> MaxPool -> BN;
  then global average pooling -> Dense(classes).
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import backend_flag  # noqa: E402

backend_flag.apply()  # `--backend NAME`, before Keras loads

import keras  # noqa: E402

import keras_deq  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import data  # noqa: E402

# BatchNormalization(momentum=0.9) is PyTorch's default (0.1 there), used by the paper.
SINGLE_CONV_CHANNELS = {"mnist": 82, "svhn_cropped": 125, "cifar10": 125, "digits": 32}
MULTI_CONV_CHANNELS = {"mnist": (12, 24, 48), "digits": (12, 24, 48)}
DEFAULT_MULTI_CHANNELS = (20, 50, 80)


def _pcdeq(width, conv, variant, weight_norm, **deq_options):
    form = {"filters": width} if conv else {"units": width}
    return keras_deq.PcDEQ(**form, variant=variant, weight_norm=weight_norm, **deq_options)


def linear_pcdeq(input_shape, classes=10, width=80, variant=1, weight_norm=True, **deq_options):
    """The paper's linear pcDEQ (70,410 parameters on MNIST with weight norm)."""
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(width),
            keras.layers.BatchNormalization(momentum=0.9),
            _pcdeq(width, False, variant, weight_norm, **deq_options),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.Dense(classes),
        ],
        name="linear_pcdeq",
    )


def single_conv_pcdeq(
    input_shape, classes=10, channels=82, pool=8, variant=1, weight_norm=True, **deq_options
):
    """The paper's single-convolution pcDEQ (69,136 parameters on MNIST)."""
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(channels, 3, padding="same"),
            keras.layers.BatchNormalization(momentum=0.9),
            _pcdeq(channels, True, variant, weight_norm, **deq_options),
            keras.layers.MaxPooling2D(3, strides=1, padding="same"),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.AveragePooling2D(pool),
            keras.layers.Flatten(),
            keras.layers.Dense(classes),
        ],
        name="single_conv_pcdeq",
    )


def multi_conv_pcdeq(
    input_shape, classes=10, channels=(12, 24, 48), variant=1, weight_norm=True, **deq_options
):
    """The paper's three-stage convolutional pcDEQ (41,278 parameters on MNIST)."""
    layers = [keras.Input(input_shape)]
    for stage, width in enumerate(channels):
        layers += [
            keras.layers.Conv2D(width, 3, strides=1 if stage == 0 else 2, padding="same"),
            keras.layers.BatchNormalization(momentum=0.9),
            _pcdeq(width, True, variant, weight_norm, **deq_options),
            keras.layers.MaxPooling2D(3, strides=1, padding="same"),
            keras.layers.BatchNormalization(momentum=0.9),
        ]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(classes)]
    return keras.Sequential(layers, name="multi_conv_pcdeq")


def build(net, dataset, input_shape, variant=1, **deq_options):
    if net == "linear":
        return linear_pcdeq(input_shape, variant=variant, **deq_options)
    if net == "single_conv":
        pool = max(1, min(8, input_shape[0] // 2))
        channels = SINGLE_CONV_CHANNELS[dataset]
        return single_conv_pcdeq(
            input_shape, channels=channels, pool=pool, variant=variant, **deq_options
        )
    channels = MULTI_CONV_CHANNELS.get(dataset, DEFAULT_MULTI_CHANNELS)
    return multi_conv_pcdeq(input_shape, channels=channels, variant=variant, **deq_options)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    backend_flag.add_to(parser)
    parser.add_argument("--dataset", default="digits", choices=data.DATASETS)
    parser.add_argument("--net", default="linear", choices=("linear", "single_conv", "multi_conv"))
    parser.add_argument("--variant", type=int, default=1, choices=(1, 2))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1.5e-2)
    parser.add_argument("--limit", type=int, default=None, help="keep only this many examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pad-crop and flip augmentation (default: on for cifar10 only)",
    )
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_test, y_test = data.load(args.dataset, seed=args.seed, limit=args.limit)
    model = build(args.net, args.dataset, x_train.shape[1:], variant=args.variant)
    model = data.with_augmentation(model, args.dataset, args.augment)
    model.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=args.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    print(
        f"{model.name}: {model.count_params():,} parameters on {args.dataset} {x_train.shape[1:]}"
    )
    start = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        verbose=2,
    )
    logs = {k: v[-1] for k, v in history.history.items()}
    steps = {
        k: round(v, 1) for k, v in logs.items() if k.endswith("_steps") and not k.startswith("val_")
    }
    print(
        f"test accuracy {logs['val_accuracy']:.4f}; solver steps {steps}; {time.perf_counter() - start:.0f} s"
    )
    return logs["val_accuracy"]


if __name__ == "__main__":
    main()
