"""Keras regularizers on features: decorrelation and HSIC (usable on any Keras layer).

`DecorrelationRegularizer` and `HSICRegularizer` wrap `keras_deq.features.decorrelation`
and `keras_deq.features.hsic` as `keras.regularizers.Regularizer`s, for a layer's
`activity_regularizer` or an `add_loss`; `feature_regularizer` picks one of them or
Keras' `L1` / `L2` by name. In the OptEq paper (Xie et al., TPAMI 2023) these features
enter through the priors (`keras_deq.layers.opteq_priors`); here they are plain losses.
"""

import keras

from keras_deq.features import decorrelation, hsic
from keras_deq.solvers.common import check_nonnegative_float, check_positive_float

FEATURE_REGULARIZERS = ("l1", "l2", "decorrelation", "hsic")


@keras.saving.register_keras_serializable(package="keras_deq")
class DecorrelationRegularizer(keras.regularizers.Regularizer):
    """`strength * F_Dz(features)` (Eq. 13) as a Keras regularizer.

    Use it as any layer's `activity_regularizer`, or call it on a tensor and
    `add_loss` the result. Keras divides activity-regularizer losses by the
    batch size; `F_Dz` is already a batch-level statistic, so scale `strength`
    accordingly (or use `add_loss(regularizer(z))` to avoid the division).

    Args:
        strength: The weight, >= 0.

    Example:

    ```python
    layer = keras.layers.Dense(64, activity_regularizer=DecorrelationRegularizer(0.1))
    ```
    """

    def __init__(self, strength=0.01):
        self.strength = check_nonnegative_float("strength", strength)

    def __call__(self, x):
        return self.strength * decorrelation(x)

    def get_config(self):
        return {"strength": self.strength}


@keras.saving.register_keras_serializable(package="keras_deq")
class HSICRegularizer(keras.regularizers.Regularizer):
    """`strength * sum_{i<j} HSIC(features_i, features_j)` (Section 7.2.1).

    See `hsic` for the estimator and its cost, and `DecorrelationRegularizer`
    for the batch-size note.

    Args:
        strength: The weight, >= 0.
        sigma: The RBF bandwidth, > 0.

    Example:

    ```python
    head = keras.layers.Dense(32, activity_regularizer=HSICRegularizer(0.1, sigma=1.0))
    ```
    """

    def __init__(self, strength=0.01, sigma=1.0):
        self.strength = check_nonnegative_float("strength", strength)
        self.sigma = check_positive_float("sigma", sigma, finite=False)

    def __call__(self, x):
        return self.strength * hsic(x, self.sigma)

    def get_config(self):
        return {"strength": self.strength, "sigma": self.sigma}


def feature_regularizer(name, strength=0.01, **kwargs):
    """A feature regularizer by name: Keras' `L1`/`L2`, or decorrelation / HSIC.

    Args:
        name: One of `FEATURE_REGULARIZERS`.
        strength: Its weight.
        **kwargs: Extra arguments (`sigma` for `"hsic"`).

    Returns:
        A `keras.regularizers.Regularizer`.

    Examples:
        >>> feature_regularizer("l1", 0.5).get_config()
        {'l1': 0.5}
    """
    if name not in FEATURE_REGULARIZERS:
        raise ValueError(f"`name` must be one of {FEATURE_REGULARIZERS}. Received: name={name!r}")
    if name == "l1":
        return keras.regularizers.L1(strength, **kwargs)
    if name == "l2":
        return keras.regularizers.L2(strength, **kwargs)
    if name == "decorrelation":
        return DecorrelationRegularizer(strength, **kwargs)
    return HSICRegularizer(strength, **kwargs)
