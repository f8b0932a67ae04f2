"""The vision examples' data loader: digits offline, tensorflow-datasets mocked."""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "examples" / "vision"))
import data  # noqa: E402


def test_digits_are_standardized_nhwc_images_with_a_stratified_split():
    x_train, y_train, x_test, y_test = data.load("digits")
    assert x_train.shape[1:] == (8, 8, 1) and x_train.dtype == np.float32
    assert len(x_train) + len(x_test) == 1797
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1) < 1e-3
    assert set(np.unique(y_test)) == set(range(10))


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_path_with_mock_data(name, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        x_train, y_train, x_test, y_test = data.load(name, limit=10)
    assert x_train.shape == (10, *shape) and x_test.shape[1:] == shape
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="dataset='imagenet'"):
        data.load("imagenet")


def test_augmentation_only_in_training_and_on_for_cifar10_by_default():
    import keras

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten()], name="m")
    assert data.with_augmentation(model, "digits") is model
    augmented = data.with_augmentation(model, "cifar10")
    assert augmented is not model
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(augmented(x, training=False), model(x), rtol=1e-6)
    assert not np.allclose(augmented(x, training=True), model(x))
