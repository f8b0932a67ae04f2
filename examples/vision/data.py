"""Image classification data for the vision examples.

`digits` (scikit-learn's bundled 8x8 digits) works offline and is every script's
default. `mnist`, `svhn_cropped` and `cifar10` are loaded with
tensorflow-datasets (`pip install "keras-deq[examples]"`), which downloads them on
first use.
"""

DATASETS = ("digits", "mnist", "svhn_cropped", "cifar10")


def load(name, seed=0, limit=None):
    """Returns `(x_train, y_train, x_test, y_test)`: float32 NHWC images, int labels.

    Images are standardized with the training set's per-channel mean and std.

    Args:
        name: One of `DATASETS`.
        seed: Seed of the digits train/test split.
        limit: Optional number of training (and test) examples to keep.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset. Expected one of {DATASETS}. Received: dataset={name!r}")
    if name == "digits":
        x_train, y_train, x_test, y_test = _digits(seed)
    else:
        x_train, y_train, x_test, y_test = _tfds(name)
    if limit is not None:
        x_train, y_train, x_test, y_test = (
            x_train[:limit],
            y_train[:limit],
            x_test[:limit],
            y_test[:limit],
        )
    mean = x_train.mean(axis=(0, 1, 2), keepdims=True)
    std = x_train.std(axis=(0, 1, 2), keepdims=True) + 1e-6
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def with_augmentation(model, name, enabled=None):
    """Prepends Keras' augmentation layers for CIFAR-10 (4-pixel shifts, flips).

    They are active in training only. `enabled=None` turns them on for cifar10,
    as in the papers' CIFAR-10 recipes; other datasets get none by default.

    Args:
        model: A Keras model taking images.
        name: The dataset name.
        enabled: Force augmentation on or off.

    Returns:
        The model, or a `keras.Sequential` of the augmentation layers and it.
    """
    import keras

    if enabled is None:
        enabled = name == "cifar10"
    if not enabled:
        return model
    height, width = model.input_shape[1:3]
    return keras.Sequential(
        [
            keras.Input(model.input_shape[1:]),
            # Shifts of up to 4 pixels with zero fill: the pad-4-and-crop recipe.
            keras.layers.RandomTranslation(4 / height, 4 / width, fill_mode="constant"),
            keras.layers.RandomFlip("horizontal"),
            model,
        ],
        name=f"augmented_{model.name}",
    )


def _digits(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.reshape(-1, 8, 8, 1).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed
    )
    return x_train, y_train, x_test, y_test


def _tfds(name):
    import numpy as np
    import tensorflow_datasets as tfds

    def to_arrays(split):
        dataset = tfds.load(name, split=split, as_supervised=True)
        images, labels = zip(*tfds.as_numpy(dataset), strict=True)
        return np.stack(images).astype("float32"), np.asarray(labels, dtype="int64")

    # Iterated rather than loaded with batch_size=-1, which aborts on some
    # tensorflow-datasets builds with mocked data.
    return (*to_arrays("train"), *to_arrays("test"))
