"""Argument checks and a scalar helper shared by the OptEq modules (not public API).

The checks that other layers share are in `keras_deq.solvers.common`; these are the
ones only the OptEq layers use (a choice among names, the relaxation `alpha`, the
unit widths, the optional `max_norm`), and `scalar`, which the priors and SAM use to
make exact hyper-parameter tensors.
"""

import numbers

from keras import ops

from keras_deq.solvers.common import check_positive_float, check_positive_int


def is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")
    return value


def check_alpha(alpha, learnable):
    """`alpha` in (0, 1], or in (0, 1) when it is learnable (a sigmoid's value)."""
    in_range = is_number(alpha) and 0 < alpha and (alpha < 1 if learnable else alpha <= 1)
    if not in_range:
        interval = "(0, 1) when learnable_alpha=True" if learnable else "(0, 1]"
        raise ValueError(f"`alpha` must be a number in {interval}. Received: alpha={alpha!r}")
    return float(alpha)


def check_units(units):
    if isinstance(units, numbers.Integral) and not isinstance(units, bool):
        units = [units]
    if not isinstance(units, (list, tuple)) or not units:
        raise ValueError(
            "`units` must be a positive int or a non-empty list of positive ints "
            f"(the width n_l of each unit's W_l). Received: units={units!r}"
        )
    return [check_positive_int("units", n) for n in units]


def check_max_norm(max_norm):
    if max_norm is None:
        return None
    return check_positive_float("max_norm", max_norm, finite=False)


def scalar(value, dtype):
    """`value` as a `dtype` scalar tensor, exactly for a Python number.

    Casting 0.7 to float64 from a default (float32) tensor rounds it to float32 (off
    by 1e-8); converting the Python number straight to float64 does not.
    """
    if isinstance(value, numbers.Number):
        return ops.convert_to_tensor(value, dtype)
    return ops.cast(value, dtype)
