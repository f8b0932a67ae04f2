"""Property-based tests (hypothesis) of the public constructors and call paths.

The property: every input either works (the output is finite and has the right shape, and
a DEQ layer's statistics have values) or raises a `ValueError`/`TypeError` whose message
names the offending argument. Never a hang, never an error from deep inside TensorFlow
(`InvalidArgumentError`, ...), never a silent NaN or a silently ignored invalid value.

- Constructor arguments: `TARGETS` specifies, independently of the library, which values
  of each argument are valid; objects and inputs come from the shared table
  `layer_cases.CASES` (its small kwargs are the base of each sweep).
  `test_invalid_constructor_arguments` and `test_valid_constructor_arguments` sweep a
  pool of values (wrong types, zero, negative, NaN, inf, bool, numpy scalars, ...) one
  argument at a time; `test_constructor_argument_combinations` draws several at once.
- Call paths: hypothesis draws state shapes (vector, image, lists), batch sizes (1, odd,
  257), dtypes (float16/32/64, int inputs) and solver settings, and compares the results with
  independent numpy computations (fixed-point residuals, the implicit gradient from the
  exact Jacobians, a contraction bound, causality).

Known bugs are `xfail(strict=True)` (`KNOWN_BUGS` and the tests at the end): the default
tests skip exactly those inputs, so a fix makes the xfail pass and the marker has to go.
`python tests/test_fuzz.py` prints the table of outcomes per constructor.
"""

import contextlib
import math
import numbers
import re
import signal
import warnings
from collections.abc import Callable, Mapping
from typing import NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from layer_cases import CASES, FLOAT_DTYPES, floats, make, make_inputs

from keras_deq import (
    DEQ,
    DenseCell,
    FixedPointCorrection,
    JacobianPenalty,
    LipschitzMultiscale,
    OptEqBlock,
    PcDEQ,
    RandomStart,
    solvers,
)
from keras_deq import backward as backward_lib
from keras_deq import constraints as constraints_lib
from keras_deq.layers import opteq
from keras_deq.models import DEQTransformerLM

INT32_MAX = 2**31 - 1
HANG_SECONDS = 60  # one example; the slowest legitimate one takes about 1 s

# Deterministic and small: the whole file runs in well under a minute on 2 cores.
FAST = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)


def examples(n):
    return settings(FAST, max_examples=n)


# ============================================================================ outcomes
class Hang(BaseException):
    """Raised by `time_limit` (a BaseException, so that no `except Exception` eats it)."""


@contextlib.contextmanager
def time_limit(seconds=HANG_SECONDS):
    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def names_argument(message, names):
    """Whether `message` mentions one of `names` as a whole identifier."""
    return any(
        re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message, re.IGNORECASE)
        for name in names
    )


class Outcome(NamedTuple):
    kind: str  # "works", "error" (ValueError/TypeError), "deep" (anything else), "broken"
    error: BaseException | None = None

    def describe(self):
        if self.error is None:
            return self.kind
        return f"{self.kind}: {type(self.error).__name__}: {str(self.error)[:240]}"


def attempt(fn):
    """Runs `fn` (which asserts the "works" properties); classifies what happened."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-convergence warnings
        warnings.simplefilter("ignore", UserWarning)
        try:
            with time_limit():
                fn()
        except AssertionError as error:  # ran, but the output broke a property
            return Outcome("broken", error)
        except (ValueError, TypeError) as error:
            return Outcome("error", error)
        except Exception as error:
            return Outcome("deep", error)
    return Outcome("works")


# =========================================================================== validity
def _int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def count(v, kw=None):
    """An iteration count: the solvers' loop counters are int32."""
    return _int(v) and 1 <= v <= INT32_MAX


def size(v, kw=None):
    return _int(v) and v >= 1


def positive(v, kw=None):
    """A positive finite number."""
    return _real(v) and math.isfinite(v) and v > 0


def cap(v, kw=None):
    """A positive cap; inf means no cap (harmless)."""
    return _real(v) and v > 0


def nonnegative(v, kw=None):
    return _real(v) and math.isfinite(v) and v >= 0


def fraction(v, kw=None):
    """A number in (0, 1]."""
    return _real(v) and 0 < v <= 1


def unit_interval(v, kw=None):
    return _real(v) and 0 <= v <= 1


def one_of(*choices):
    def valid(v, kw=None):
        return isinstance(v, str) and v in choices

    return valid


def optional(predicate):
    def valid(v, kw=None):
        return True if v is None else predicate(v, kw)

    return valid


def flag(v, kw=None):
    """A bool; the ints 0 and 1 may go either way."""
    if isinstance(v, (bool, np.bool_)):
        return True
    if _int(v) and v in (0, 1):
        return None
    return False


SOLVER_OPTIONS = {  # independent of keras_deq.solvers.registry
    "fixed_point": {"damping": fraction, "fixed_steps": flag},
    "anderson": {"window": size, "beta": fraction, "ridge": lambda v, kw=None: _real(v) and v >= 0},
    "broyden": {"memory": size},
}


def options_valid_for(solver, options):
    if options is None:
        return True
    if not isinstance(options, Mapping) or solver not in SOLVER_OPTIONS:
        return False
    checks = SOLVER_OPTIONS[solver]
    return all(key in checks and checks[key](value) for key, value in options.items())


def solver_options(v, kw):
    return options_valid_for(kw.get("solver", "anderson"), v)


def backward_solver_options(v, kw):
    return options_valid_for(kw.get("backward_solver") or kw.get("solver", "anderson"), v)


def state_shape(v, kw=None):
    def is_shape(s):
        return isinstance(s, (tuple, list)) and len(s) > 0 and all(size(d) for d in s)

    return v is None or is_shape(v)


def backward_valid(v, kw=None):
    """A built-in mode's name, or a mode object (not one that sets the adjoint solver
    when the flat `backward_solver` arguments set it too)."""
    if isinstance(v, str):
        return v in ("implicit", "phantom", "one_step", "unrolled")
    if isinstance(v, Mapping):
        return None  # a config dict: valid if it describes a mode
    if not isinstance(v, backward_lib.Backward):
        return False
    kw = kw or {}
    own = isinstance(v, backward_lib.Implicit) and v.solver is not None
    return not (own and (kw.get("backward_solver") or kw.get("backward_solver_options")))


BACKWARD_POOL = (
    backward_lib.Phantom(steps=2),
    backward_lib.Implicit(solver="broyden"),
    backward_lib.serialize(backward_lib.OneStep()),
    solvers.Anderson(),
    {"class_name": "Anderson", "config": {}},
)

JACOBIAN_DEFAULTS = {
    "jacobian_weight": 0.0,
    "jacobian_frequency": 1.0,
    "jacobian_probes": 1,
    "jacobian_max_iter_delta": 0,
}


def regularizer_valid(v, kw=None):
    """None, or a `JacobianPenalty` (or its config) with the flat arguments unset."""
    kw = kw or {}
    if v is None:
        return True
    if isinstance(v, Mapping):
        return None
    flat_unset = all(kw.get(k, d) == d for k, d in JACOBIAN_DEFAULTS.items())
    return isinstance(v, JacobianPenalty) and flat_unset


def deq_dtype(v, kw=None):
    return v in FLOAT_DTYPES


ACTIVATIONS = ("tanh", "relu", None, keras.activations.sigmoid)
INITIALIZERS = ("glorot_uniform", "zeros", keras.initializers.Orthogonal(0.3))


def activation(v, kw=None):
    return v is None or callable(v) or (isinstance(v, str) and v in ("tanh", "relu"))


def initializer(v, kw=None):
    return any(v is i for i in INITIALIZERS) or v in ("glorot_uniform", "zeros")


def keras_seed(v, kw=None):
    if v is None or (isinstance(v, int) and not isinstance(v, bool)):
        return True
    return None if _int(v) else False  # numpy ints: either way


# ============================================================================== pools
class Opaque:
    def __repr__(self):
        return "<opaque object>"


# Wrong types and degenerate values tried for every argument.
GENERIC = (
    0,
    -1,
    2.5,
    math.nan,
    math.inf,
    -math.inf,
    True,
    False,
    None,
    "",
    "abc",
    [],
    {},
    [None],
    complex(1, 1),
    Opaque(),
)
COUNTS = (1, 3, np.int64(3), 3.0, "3", -5, INT32_MAX, INT32_MAX + 1, 2**32 + 3)
# Steps that always run (no early stop): INT32_MAX would be a legitimate hang.
FIXED_COUNTS = (1, 3, np.int64(3), 3.0, "3", -5, INT32_MAX + 1, 2**32 + 3)
SIZES = (1, 4, np.int64(4), 4.0, "4", -4)
POSITIVES = (1e-3, 1, np.float32(1e-3), -1e-3, "1e-3", np.float64("nan"))
FRACTIONS = (0.5, 1, 1.0, np.float32(0.5), 0.0, 1.5, -0.5, 1.0 + 1e-9)
NONNEGATIVES = (0.0, 0.5, 3, np.float32(0.5), -0.1, -1e-300)
FLAGS = (True, False, np.True_, 1, 0, 2, "False", "yes", 0.5)
SOLVER_NAMES = ("fixed_point", "anderson", "broyden")
OPTION_POOL = (
    {},
    {"window": 3},
    {"window": 0},
    {"beta": 0.5},
    {"ridge": 0.0},
    {"damping": 0.5},
    {"memory": 4},
    {"bogus": 1},
    {1: 2, "a": 3},
    "window",
    [("window", 3)],
    (("window", 3),),
)


class Arg(NamedTuple):
    valid: Callable  # (value, kwargs) -> True, False, or None (either outcome is fine)
    values: tuple = ()  # tried besides GENERIC
    context: dict = {}  # other kwargs this argument needs to matter
    generic: bool = True  # also try GENERIC (and random numbers in the hypothesis test)


def count_arg(**kw):
    return Arg(count, COUNTS, **kw)


def size_arg(**kw):
    return Arg(size, SIZES, **kw)


def positive_arg(**kw):
    return Arg(positive, POSITIVES, **kw)


def fraction_arg(**kw):
    return Arg(fraction, FRACTIONS, **kw)


def nonnegative_arg(**kw):
    return Arg(nonnegative, NONNEGATIVES, **kw)


def choice_arg(*choices, **kw):
    variants = tuple(c.upper() for c in choices if isinstance(c, str)) + ("newton", "rel ")
    return Arg(one_of(*choices), choices + variants, **kw)


def flag_arg(**kw):
    return Arg(flag, FLAGS, **kw)


def initializer_arg():
    """An initializer; None means the default, as in Keras."""
    return Arg(optional(initializer), INITIALIZERS + ("bogus",))


def activation_arg():
    return Arg(activation, ACTIVATIONS + ("bogus", keras.activations.get("relu")))


# ============================================================================ targets
def metric_values(layer):
    return {m.name[len(layer.name) + 1 :]: float(m.result()) for m in layer.metrics}


def check_deq_statistics(layer, max_iter=None):
    """The layer's metrics have values after a forward pass."""
    stats = metric_values(layer)
    assert stats["fwd_steps"] >= 1, stats
    if max_iter is not None:
        assert stats["fwd_steps"] <= max_iter, stats
    assert 0.0 <= stats["converged"] <= 1.0, stats
    assert math.isfinite(stats["fwd_residual"]) and stats["fwd_residual"] >= 0, stats


def check_finite(*tensors, shapes=None):
    flat = [np.asarray(keras.ops.convert_to_numpy(t)) for t in tf.nest.flatten(tensors)]
    for array in flat:
        assert np.all(np.isfinite(array.astype("float64"))), "non-finite output"
    if shapes is not None:
        assert [a.shape for a in flat] == [tuple(s) for s in shapes], [a.shape for a in flat]


def forward_and_gradient(layer, x, training=True, **call_kwargs):
    """Calls the layer under a tape; returns (output, gradients w.r.t. x and variables)."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        z = layer(x, training=training, **call_kwargs)
        flat = [tf.cast(t, "float32") for t in tf.nest.flatten(z)]
        loss = tf.add_n([tf.reduce_sum(tf.square(t)) for t in flat])
        if layer.losses:
            loss += tf.add_n([tf.cast(v, "float32") for v in layer.losses])
    grads = tape.gradient(loss, [x, *layer.trainable_variables])
    return z, loss, grads


def run_deq_layer(layer, kw, x, out_shapes, max_iter=None, stats_layer=None):
    try:
        z, loss, grads = forward_and_gradient(layer, x)
    except FloatingPointError:
        if (
            kw.get("on_failure") == "raise"
            or (kw.get("deq_options") or {}).get("on_failure") == "raise"
        ):
            return  # documented: a sample that does not converge raises
        raise
    check_finite(z, shapes=out_shapes)
    assert np.isfinite(float(loss))
    assert any(g is not None for g in grads), "no gradient at all"
    check_finite(*[g for g in grads if g is not None])
    check_deq_statistics(stats_layer or layer, max_iter)


class Target(NamedTuple):
    make: Callable  # kwargs -> object
    run: Callable  # (object, kwargs) -> None; asserts the "works" properties
    args: dict  # name -> Arg
    base: dict = {}  # kwargs every case starts from
    case: str | None = None  # its name in the shared table `layer_cases.CASES`


def table_target(name, run, args):
    """A target built as the shared table builds `name`, starting from its small kwargs."""
    return Target(lambda kw: make(name, **kw), run, args, CASES[name].kwargs, name)


def _deq_run(layer, kw):
    shape = kw.get("state_shape") or (4,)
    copies = 1 if layer.correction is None else layer.correction.states + 1
    run_deq_layer(layer, kw, make_inputs("DEQ"), [(3, *shape)] * copies, kw.get("max_iter"))


def _correction_valid(v, kw=None):
    """None or a `FixedPointCorrection` (or its config) whose samples fit in `max_iter`."""
    if isinstance(v, dict):
        v = keras.saving.deserialize_keras_object(v)
    if v is None:
        return True
    if not isinstance(v, FixedPointCorrection):
        return False
    max_iter = (kw or {}).get("max_iter", 30)
    if not _int(max_iter) or max_iter < 1:
        return None  # refused for `max_iter` itself
    return max(v.indexing or [v.states + 1]) <= max_iter


DEQ_ARGS = {
    "cell": Arg(
        lambda v, kw=None: isinstance(v, keras.layers.Layer),
        (DenseCell(4), DenseCell, keras.layers.Dense, lambda z, x: z, keras.ops.tanh, "dense"),
    ),
    "solver": choice_arg(*SOLVER_NAMES),
    "max_iter": count_arg(),
    "tol": positive_arg(),
    "stop_mode": choice_arg("rel", "abs"),
    "solver_options": Arg(solver_options, OPTION_POOL),
    "backward": Arg(backward_valid, BACKWARD_POOL),
    "backward_solver": Arg(optional(one_of(*SOLVER_NAMES)), SOLVER_NAMES + ("newton",)),
    "backward_max_iter": Arg(optional(count), COUNTS),
    "backward_tol": Arg(optional(positive), POSITIVES),
    "backward_solver_options": Arg(backward_solver_options, OPTION_POOL),
    "phantom_steps": Arg(count, FIXED_COUNTS, {"backward": "phantom"}),
    "phantom_damping": fraction_arg(context={"backward": "phantom"}),
    "regularizer": Arg(
        regularizer_valid,
        (
            JacobianPenalty(0.1, probes=2),
            keras.saving.serialize_keras_object(JacobianPenalty(0.0)),
            backward_lib.OneStep(),
            {"class_name": "Anderson", "config": {}},
        ),
    ),
    "jacobian_weight": nonnegative_arg(),
    "jacobian_frequency": fraction_arg(context={"jacobian_weight": 0.1}),
    "jacobian_probes": size_arg(context={"jacobian_weight": 0.1}),
    "jacobian_max_iter_delta": Arg(
        lambda v, kw=None: _int(v) and 0 <= v <= INT32_MAX,
        (0, 2, np.int64(2), 2.0, -1, 2**31),
        {"jacobian_weight": 0.1},
    ),
    "state_shape": Arg(
        state_shape,
        ((4,), [4], (np.int64(4),), (0,), (-4,), (4.0,), (True,), "4", 4, ((4,), ()), ()),
    ),
    "solver_batch_dims": Arg(
        lambda v, kw=None: _int(v) and v == 1,  # the (3, 4) state has one axis after the batch
        (1, np.int64(1), 2, 3, 1.0),
    ),
    "on_failure": choice_arg("warn", "raise", "ignore"),
    "jit_compile": Arg(
        lambda v, kw=None: (v == "auto") if isinstance(v, str) else flag(v) is True,
        ("auto", "AUTO", *FLAGS),
    ),
    "seed": Arg(keras_seed, (0, 7, -3, 2**40, np.int64(3), "7")),
    "start": Arg(
        lambda v, kw=None: v is None or isinstance(v, RandomStart),
        (RandomStart(0.5), "normal", 0.5, backward_lib.OneStep()),
    ),
    # An eager call on a batch of 3 fixes the batch size (a stateful layer needs one).
    "stateful": flag_arg(),
    "correction": Arg(
        _correction_valid,
        (
            FixedPointCorrection(2),
            FixedPointCorrection(1, [40]),
            keras.saving.serialize_keras_object(FixedPointCorrection(3, gradient="phantom")),
            "exponential",
            RandomStart(),
        ),
    ),
    # Keras' own argument: only the dtypes (Keras' messages for other values are its own).
    "dtype": Arg(deq_dtype, ("float32", "float64", "float16", "mixed_float16", "int32"), {}, False),
}


def _through_deq(argument, **options):
    """Runs an object built for `argument` of `DEQ` inside a DEQ layer."""

    def run(obj, kw):
        layer = make("DEQ", **{argument: obj}, **options)
        run_deq_layer(layer, {}, make_inputs("DEQ"), [(3, 4)], None)

    return run


def _dense_cell_run(cell, kw):
    z, x = make_inputs("DenseCell", **kw)
    out = cell(tf.constant(z), tf.constant(x))
    check_finite(out, shapes=[z.shape])
    check_finite(*cell.losses)


def _pcdeq_run(layer, kw):
    x = make_inputs("PcDEQ", **kw)
    run_deq_layer(layer, kw, x, [x.shape], kw.get("max_iter"))
    assert np.all(np.asarray(layer(x)) >= 0), "pcDEQ states are nonnegative"


def _channels(v):
    return (v,) if _int(v) else tuple(v)


def lms_channels(v, kw):
    groups = kw.get("groups", 2)
    ok = (_int(v) and v >= 1) or (
        isinstance(v, (tuple, list)) and 0 < len(v) <= 3 and all(size(c) for c in v)
    )
    return bool(ok) and size(groups) and all(c % groups == 0 for c in _channels(v))


def lms_groups(v, kw):
    return size(v) and all(c % v == 0 for c in _channels(kw.get("channels", (4,))))


def _lms_run(layer, kw):
    channels = _channels(kw["channels"])
    x = make_inputs("LipschitzMultiscale", batch=2, **kw)
    shapes = [(2, 4 // 2**i, 4 // 2**i, c) for i, c in enumerate(channels)]
    run_deq_layer(layer, kw, x, shapes, kw.get("max_iter"))


LMS_BOUND_ARGS = {  # the arguments of the bound at the caps: default and validity alone
    "channels": ((4,), lms_channels),
    "slope": (0.4, fraction),
    "alpha": (0.5, unit_interval),
    "beta": (0.3, unit_interval),
    "softmax_weights": (True, flag),
    "normalization": ("mean", one_of("standard", "mean")),
    "conv_norm_cap": (2.0, optional(cap)),
    "gamma_cap": (1.0, optional(cap)),
}


def lms_bound_at_caps(kw):
    """The Lipschitz bound of a capped LipschitzMultiscale cell with every conv norm and
    |gamma| at its cap (numpy, independent of the library; `lipschitz_bound`'s formula), or
    None when there are no caps (no claim) or some argument is invalid anyway."""
    values = {name: kw.get(name, default) for name, (default, _) in LMS_BOUND_ARGS.items()}
    if any(
        valid(values[name], kw) not in (True, None) for name, (_, valid) in LMS_BOUND_ARGS.items()
    ):
        return None
    if values["conv_norm_cap"] is None:
        return None
    if values["normalization"] != "mean" or values["gamma_cap"] is None:
        return math.inf  # no finite constant, so no contraction
    n, s = len(_channels(values["channels"])), float(values["slope"])
    alpha, beta = float(values["alpha"]), float(values["beta"])
    with np.errstate(over="ignore", invalid="ignore"):
        cg = np.float64(values["conv_norm_cap"]) * np.float64(values["gamma_cap"])
        block = s * ((1 - alpha) + alpha * s * cg**2 if alpha > 0 else 1 + s * cg**2)
        m = np.zeros((n, n))
        for i in range(n):
            others = [j for j in range(n) if j != i]
            if values["softmax_weights"]:
                scores = np.array([np.exp(i - j) if j > i else 1.0 for j in others])
            else:
                scores = np.ones(len(others))
            for j, w in zip(others, scores / (scores.sum() or 1.0), strict=True):
                path = cg * 2.0 ** (j - i) if j > i else cg ** (i - j) * s ** (i - j - 1)
                m[i, j] = (beta * w if beta > 0 else 1.0) * path
            m[i, i] = 1 - beta if beta > 0 and n > 1 else 1.0
        m = s * cg * m * block
    return float(np.linalg.norm(m, 2)) if np.all(np.isfinite(m)) else math.inf


def lms_contractive(arg):
    """`arg` whose otherwise valid values are invalid when the capped cell would not be a
    contraction (the constructor refuses those, naming every argument of the bound)."""

    def valid(v, kw):
        ok = arg.valid(v, kw)
        if ok is not None and not ok:  # also numpy's False (e.g. from nan > 0)
            return False
        bound = lms_bound_at_caps(kw)
        return False if bound is not None and not bound < 1 else ok

    return arg._replace(valid=valid)


def sam_rho(v, kw):
    return positive(v) and v + 2 * kw.get("sam_c", 0.2) < 1


def sam_c(v, kw):
    return positive(v) and kw.get("sam_rho", 0.5) + 2 * v < 1


def deq_options_for(keys):
    def valid(v, kw=None):
        return v is None or (
            isinstance(v, Mapping)
            and set(v) <= set(keys)
            and all(DEQ_ARGS[k].valid(x, {}) for k, x in v.items())
        )

    return valid


# DEQ arguments that OptEqBlock / DEQTransformerLM do not set themselves.
deq_options = deq_options_for({"on_failure", "backward_tol", "stop_mode"})
lm_deq_options = deq_options_for({"backward_tol", "stop_mode"})


DEQ_OPTIONS_POOL = (
    {},
    {"on_failure": "ignore"},
    {"backward_tol": 1e-3},
    {"on_failure": "bogus"},
    {"bogus": 1},
    "on_failure",
    [("on_failure", "ignore")],
)


def _opteq_run(block, kw):
    x = make_inputs("OptEqBlock", batch=2 if kw.get("kind") == "conv" else 3, **kw)
    if kw.get("training_mode") == "implicit":
        run_deq_layer(block, kw, x, [x.shape], kw.get("max_iter"), stats_layer=block.deq)
    else:
        z, loss, grads = forward_and_gradient(block, x)
        check_finite(z, shapes=[x.shape])
        check_finite(*[g for g in grads if g is not None])


def odd_size(v, kw=None):
    return size(v) and v % 2 == 1


def _transformer_cell_run(cell, kw):
    z, x = make_inputs("DEQTransformerCell", batch=2, **kw)
    for training in (False, True):
        check_finite(cell(tf.constant(z), tf.constant(x), training=training), shapes=[z.shape])


def dropout_rate(v, kw=None):
    return _real(v) and 0 <= v < 1


def _lm_run(model, kw):
    tokens = make_inputs("DEQTransformerLM", batch=2, vocab_size=model.vocab_size)
    out_shape = (*tokens.shape, model.vocab_size)
    check_finite(model(tokens, training=False), shapes=[out_shape])
    run_deq_layer_in_model(model, tokens, out_shape, kw)


def run_deq_layer_in_model(model, tokens, out_shape, kw):
    try:
        with tf.GradientTape() as tape:
            logits = model(tokens, training=True)
            loss = tf.reduce_mean(tf.square(logits)) + sum(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
    except FloatingPointError:
        if kw.get("on_failure") == "raise":
            return
        raise
    check_finite(logits, shapes=[out_shape])
    check_finite(*[g for g in grads if g is not None])
    check_deq_statistics(model.deq, kw.get("max_iter"))


def _constraint_run(name, measure=None):
    def run(constraint, kw):
        w = tf.constant(make_inputs(name, seed=2))
        out = constraint(w)
        check_finite(out, shapes=[w.shape])
        if measure is not None:  # independent check of the cap, in float64
            value, limit = measure(np.asarray(out, "float64"), kw)
            assert value <= limit * (1 + 1e-5) + 1e-30, (value, limit)

    return run


def _regularizer_run(name):
    def run(reg, kw):
        value = reg(tf.constant(make_inputs(name, batch=6)))
        check_finite(value)
        assert float(value) >= 0

    return run


def _prior_run(prior, kw):
    z = tf.constant(make_inputs("FeaturePrior"))
    check_finite(prior.step(z), shapes=[z.shape])
    check_finite(prior.value(z))


def _contraction(z):
    return 0.5 * tf.tanh(z) + 1.0


def _solver_target(name):
    options = {key: Arg(check, POOL_FOR[check]) for key, check in SOLVER_OPTIONS[name].items()}

    def make(kw):
        fn = solvers.get(name)
        kw = dict(kw)
        f = kw.pop("f", _contraction)

        def call():
            return fn(f, tf.zeros((3, 4)), **kw)

        return call

    def run(call, kw):
        result = call()
        check_finite(result.state, shapes=[(3, 4)])
        steps = int(result.steps)
        assert 1 <= steps <= kw.get("max_iter", 50), steps
        crit = result.rel_residual if kw.get("stop_mode", "rel") == "rel" else result.abs_residual
        tol = kw.get("tol", 1e-4)
        np.testing.assert_array_equal(result.converged.numpy(), crit.numpy() <= tol)
        if steps < kw.get("max_iter", 50):
            assert bool(tf.reduce_all(result.converged)), "stopped early without converging"

    args = {
        "f": Arg(lambda v, kw=None: callable(v), (_contraction, "f", 3)),
        "max_iter": count_arg(),
        "tol": positive_arg(),
        "stop_mode": choice_arg("rel", "abs"),
        **options,
    }
    return Target(make, run, args)


POOL_FOR = {
    fraction: FRACTIONS,
    size: SIZES,
    flag: FLAGS,
    SOLVER_OPTIONS["anderson"]["ridge"]: NONNEGATIVES + (math.inf,),
}


def _spectral(out, kw):
    return np.linalg.norm(out, 2), float(kw.get("max_norm", 1.0))


def _max_abs(out, kw):
    return np.max(np.abs(out)), float(kw.get("max_value", 1.0))


TARGETS = {
    "DEQ": table_target("DEQ", _deq_run, DEQ_ARGS),
    "DenseCell": table_target(
        "DenseCell",
        _dense_cell_run,
        {
            "units": size_arg(),
            "activation": activation_arg(),
            "use_injection": flag_arg(),
            "kernel_initializer": initializer_arg(),
            "injection_initializer": initializer_arg(),
            "kernel_constraint": Arg(
                optional(lambda v, kw=None: isinstance(v, keras.constraints.Constraint)),
                (keras.constraints.NonNeg(), constraints_lib.MaxAbs(1.0), "bogus"),
            ),
            "kernel_regularizer": Arg(
                optional(lambda v, kw=None: isinstance(v, keras.regularizers.Regularizer)),
                (keras.regularizers.L2(0.1), "bogus"),
            ),
        },
    ),
    "PcDEQ": table_target(
        "PcDEQ",
        _pcdeq_run,
        {
            "units": size_arg(),
            "filters": size_arg(context={"units": None}),
            "kernel_size": Arg(size, (1, 3, np.int64(3), 3.0, -3), {"units": None, "filters": 2}),
            "variant": Arg(lambda v, kw=None: _int(v) and v in (1, 2), (1, 2, 3, 1.0, 2.0)),
            "activation": Arg(
                optional(one_of("tanh", "softsign", "relu6")),
                ("tanh", "softsign", "relu6", "sigmoid", "relu", keras.activations.tanh),
            ),
            "softplus_beta": positive_arg(),
            "weight_norm": flag_arg(),
            # Anderson and Broyden leave the orthant (issue 12): refused.
            "solver": Arg(one_of("fixed_point"), SOLVER_NAMES + ("FIXED_POINT", "newton")),
            "max_iter": count_arg(),
            "tol": positive_arg(),
        },
    ),
    "LipschitzMultiscale": table_target(
        "LipschitzMultiscale",
        _lms_run,
        {
            # The arguments of the bound at the caps: a value that makes the capped cell
            # no contraction (bound >= 1) is invalid, e.g. slope=1 with one branch (5.0).
            "channels": lms_contractive(
                Arg(lms_channels, ((4,), [4, 8], 4, (4, 8, 8), (3,), (0,), (-4,), (4.0,), (True,)))
            ),
            "slope": lms_contractive(fraction_arg()),
            "alpha": lms_contractive(Arg(unit_interval, FRACTIONS)),
            "beta": lms_contractive(Arg(unit_interval, FRACTIONS)),
            "softmax_weights": lms_contractive(flag_arg()),
            "normalization": lms_contractive(choice_arg("standard", "mean")),
            "conv_norm_cap": lms_contractive(Arg(optional(cap), (*POSITIVES, 2.5, 5.0))),
            "gamma_cap": lms_contractive(Arg(optional(cap), (*POSITIVES, 3.0))),
            "norm_iterations": size_arg(),
            "expansion": size_arg(),
            "groups": Arg(lms_groups, (1, 2, 4, 3, np.int64(2), 2.0)),
            "kernel_initializer": initializer_arg(),
        },
    ),
    "OptEqBlock": table_target(
        "OptEqBlock",
        _opteq_run,
        {
            "units": Arg(
                lambda v, kw=None: (
                    size(v)
                    or (isinstance(v, (list, tuple)) and len(v) > 0 and all(size(n) for n in v))
                ),
                ([4], [4, 6], 4, (4,), [0], [4, -1], [4.0], [True]),
            ),
            "kind": choice_arg("dense", "conv"),
            "kernel_size": Arg(odd_size, (1, 3, np.int64(3), 2, 3.0, -3), {"kind": "conv"}),
            "alpha": fraction_arg(),
            "learnable_alpha": flag_arg(),
            "activation": activation_arg(),
            "max_norm": Arg(optional(cap), POSITIVES),
            "prior": Arg(optional(one_of(*opteq.PRIORS)), opteq.PRIORS + ("l3",)),
            "prior_mode": choice_arg("structural", "sam", context={"prior": "l2"}),
            "prior_strength": nonnegative_arg(context={"prior": "incay"}),
            "prior_epsilon": positive_arg(context={"prior": "incay"}),
            "prior_sigma": Arg(cap, (*POSITIVES, 1e-30), {"prior": "hsic"}),
            "sam_rho": Arg(sam_rho, (0.1, 0.5, 0.6, 0.9), {"prior": "l2", "prior_mode": "sam"}),
            "sam_c": Arg(sam_c, (0.1, 0.24, 0.25, 0.3), {"prior": "l2", "prior_mode": "sam"}),
            "training_mode": choice_arg("unrolled", "implicit"),
            "unroll_steps": Arg(count, FIXED_COUNTS),
            "solver": choice_arg(*SOLVER_NAMES, context={"training_mode": "implicit"}),
            "max_iter": count_arg(context={"training_mode": "implicit"}),
            "tol": positive_arg(context={"training_mode": "implicit"}),
            "deq_options": Arg(deq_options, DEQ_OPTIONS_POOL, {"training_mode": "implicit"}),
            "kernel_initializer": initializer_arg(),
            "injection_initializer": initializer_arg(),
        },
    ),
    "DEQTransformerCell": table_target(
        "DEQTransformerCell",
        _transformer_cell_run,
        {
            "num_heads": size_arg(),
            "ff_dim": Arg(optional(size), SIZES),
            "norm": choice_arg("pre", "post"),
            "dropout": Arg(dropout_rate, (0.0, 0.1, np.float32(0.1), 1.0, -0.1, "0.1")),
            "activation": activation_arg(),
            "key_dim": Arg(optional(size), SIZES),
            "kernel_initializer": initializer_arg(),
        },
    ),
    "DEQTransformerLM": table_target(
        "DEQTransformerLM",
        _lm_run,
        {
            "vocab_size": size_arg(),
            "d_model": Arg(size, (1, 3, 8, np.int64(8), 8.0, "8", -8)),
            "num_heads": size_arg(),
            "ff_dim": Arg(optional(size), SIZES),
            "norm": choice_arg("pre", "post"),
            "dropout": Arg(dropout_rate, (0.0, 0.1, 1.0, -0.1, "0.1")),
            "embedding_dropout": Arg(dropout_rate, (0.0, 0.1, 1.0, -0.1, "0.1")),
            "solver": choice_arg(*SOLVER_NAMES),
            "max_iter": count_arg(),
            "tol": positive_arg(),
            "backward": Arg(backward_valid, BACKWARD_POOL),
            "backward_max_iter": Arg(optional(count), COUNTS),
            "jacobian_weight": nonnegative_arg(),
            "jacobian_frequency": fraction_arg(),
            "on_failure": choice_arg("warn", "raise", "ignore"),
            "deq_options": Arg(lm_deq_options, DEQ_OPTIONS_POOL),
        },
    ),
    "ConvOperatorNorm": table_target(
        "ConvOperatorNorm",
        _constraint_run("ConvOperatorNorm"),
        {
            "max_norm": Arg(cap, POSITIVES),
            "input_shape": Arg(
                lambda v, kw=None: (
                    isinstance(v, (tuple, list))
                    and len(v) in (2, 3)
                    and all(size(d) for d in v)
                    and (len(v) == 2 or v[2] == 2)
                ),
                ((4, 4), [4, 4], (4, 4, 2), (4, 4, 3), (4,), (0, 4), (4.0, 4)),
            ),
            "strides": Arg(
                lambda v, kw=None: (
                    size(v)
                    or (isinstance(v, (tuple, list)) and len(v) == 2 and all(size(s) for s in v))
                ),
                (1, 2, (1, 2), [2, 2], (1,), (0, 1)),
            ),
            "padding": choice_arg("same", "valid"),
            "iterations": size_arg(),
        },
    ),
    "MaxAbs": table_target(
        "MaxAbs", _constraint_run("MaxAbs", _max_abs), {"max_value": Arg(cap, POSITIVES)}
    ),
    "SpectralNorm": table_target(
        "SpectralNorm",
        _constraint_run("SpectralNorm", _spectral),
        {"max_norm": Arg(cap, POSITIVES)},
    ),
    "ConvSpectralNorm": table_target(
        "ConvSpectralNorm",
        _constraint_run("ConvSpectralNorm"),
        {
            "max_norm": Arg(cap, POSITIVES),
            "spatial_shape": Arg(
                lambda v, kw=None: (
                    isinstance(v, (tuple, list)) and len(v) == 2 and all(size(d) for d in v)
                ),
                ((4, 4), [4, 4], (4,), (0, 4), (4.0, 4), (4, 4, 2)),
            ),
        },
    ),
    "DecorrelationRegularizer": table_target(
        "DecorrelationRegularizer",
        _regularizer_run("DecorrelationRegularizer"),
        {"strength": nonnegative_arg()},
    ),
    "HSICRegularizer": table_target(
        "HSICRegularizer",
        _regularizer_run("HSICRegularizer"),
        {"strength": nonnegative_arg(), "sigma": Arg(cap, (*POSITIVES, 1e-30))},
    ),
    "FeaturePrior": table_target(
        "FeaturePrior",
        _prior_run,
        {
            "name": choice_arg(*opteq.PRIORS),
            "strength": nonnegative_arg(),
            "epsilon": positive_arg(),
            "sigma": Arg(cap, (*POSITIVES, 1e-30), {"name": "hsic"}),
        },
    ),
    **{f"solvers.{name}": _solver_target(name) for name in SOLVER_NAMES},
    "backward.Phantom": table_target(
        "Phantom",
        _through_deq("backward"),
        {"steps": Arg(count, FIXED_COUNTS), "damping": fraction_arg()},
    ),
    "backward.Implicit": table_target(
        "Implicit",
        _through_deq("backward"),
        {"solver": Arg(optional(one_of(*SOLVER_NAMES)), SOLVER_NAMES + ("newton", 3))},
    ),
    "backward.Explicit": table_target(
        "Explicit",
        _through_deq("backward", on_failure="ignore"),
        {"depth": Arg(count, FIXED_COUNTS)},
    ),
    "JacobianPenalty": table_target(
        "JacobianPenalty",
        _through_deq("regularizer"),
        {
            "weight": nonnegative_arg(),
            "frequency": fraction_arg(),
            "probes": size_arg(),
            "max_iter_delta": Arg(
                lambda v, kw=None: _int(v) and 0 <= v <= INT32_MAX, (0, 2, 2.0, -1, 2**31)
            ),
        },
    ),
}

# The message of an error about a nested value may name the key instead of the argument.
ALSO_NAMED = {"deq_options": lambda v: list(v) if isinstance(v, Mapping) else []}


# ========================================================================= known bugs
class Bug(NamedTuple):
    reason: str
    cases: tuple  # (target, argument, value predicate)


def _not_mapping(v):
    return v is not None and not isinstance(v, Mapping)


def _too_large_count(v):
    return _int(v) and v > INT32_MAX


def _invalid_for(predicate):
    return lambda v: predicate(v, {}) is False


def _numpy_int(v):
    return isinstance(v, np.integer)


def _invalid_or_numpy(predicate):
    return lambda v: predicate(v, {}) is False or _numpy_int(v)


KNOWN_BUGS = {}


def known_bug(target, arg, value):
    for bug in KNOWN_BUGS.values():
        for t, a, predicate in bug.cases:
            if t == target and a == arg:
                with contextlib.suppress(Exception):
                    if predicate(value):
                        return True
    return False


# ======================================================================= case checking
def values_for(target, arg):
    spec = TARGETS[target].args[arg]
    seen, out = set(), []
    for value in spec.values + (GENERIC if spec.generic else ()):
        key = (type(value).__name__, repr(value))
        if key not in seen:
            seen.add(key)
            out.append(value)
    return out


def verdicts(target, kwargs, tried):
    args = TARGETS[target].args
    out = {}
    for name in tried:
        ok = args[name].valid(kwargs[name], kwargs)
        out[name] = None if ok is None else bool(ok)
    return out


def check_case(target, kwargs, tried):
    """None if the outcome is right for `kwargs`, else a description of the problem.

    `tried` are the arguments set to drawn values (the others come from the target's base
    and the arguments' contexts and are valid).
    """
    spec = TARGETS[target]
    verdict = verdicts(target, kwargs, tried)
    invalid = [name for name, ok in verdict.items() if ok is False]
    either = [name for name, ok in verdict.items() if ok is None]
    outcome = attempt(lambda: spec.run(spec.make(dict(kwargs)), kwargs))
    shown = {name: kwargs[name] for name in tried}
    if outcome.kind == "works":
        if invalid:
            return f"{target}({shown}): accepted, but {invalid} are invalid"
        return None
    if outcome.kind == "error":
        message = str(outcome.error)
        expected = invalid or either
        names = list(expected)
        for name in expected:
            names += ALSO_NAMED.get(name, lambda v: [])(kwargs[name])
        if expected and names_argument(message, names):
            return None
        if not expected:
            return f"{target}({shown}): a valid input is refused: {outcome.describe()}"
        return f"{target}({shown}): the error does not name {expected}: {outcome.describe()}"
    return f"{target}({shown}): {outcome.describe()}"


def classify(target, arg, value):
    """Outcome category of one (argument, value) case, for the table."""
    spec = TARGETS[target]
    kwargs = {**spec.base, **spec.args[arg].context, arg: value}
    valid = spec.args[arg].valid(value, kwargs)
    problem = check_case(target, kwargs, [arg])
    if valid is False:
        if problem is None:
            return "invalid: clear error"
        if "accepted, but" in problem:
            return "invalid: accepted"
        if "does not name" in problem:
            return "invalid: unclear error"
        return "invalid: deep error or broken output"
    if problem is None:
        return "valid: works" if valid else "either: ok"
    if "is refused" in problem:
        return "valid: refused"
    return "valid: fails"


ARG_CASES = [(t, a) for t, spec in TARGETS.items() for a in spec.args]


def _sweep(target, want_valid):
    """Checks every value of every argument of `target` that is (in)valid; known bugs are
    left to `test_known_constructor_bug`. Returns (problems, number of values checked)."""
    spec = TARGETS[target]
    problems, seen = [], 0
    for arg, arg_spec in spec.args.items():
        for value in values_for(target, arg):
            kwargs = {**spec.base, **arg_spec.context, arg: value}
            if (arg_spec.valid(value, kwargs) is not False) != want_valid:
                continue
            seen += 1
            if not known_bug(target, arg, value):
                problem = check_case(target, kwargs, [arg])
                if problem:
                    problems.append(problem)
    return problems, seen


# Constructing and running these takes 10-30 s per sweep of the valid values: their valid
# values are drawn by the hypothesis test by default, and swept in full with -m slow.
EXPENSIVE_TARGETS = ("DEQ", "DEQTransformerLM", "LipschitzMultiscale", "OptEqBlock")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_invalid_constructor_arguments(target):
    """Each invalid value, one argument at a time, raises an error naming the argument
    (at construction, or when the object is first used)."""
    problems, seen = _sweep(target, want_valid=False)
    assert seen > 0
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(t, marks=[pytest.mark.slow] if t in EXPENSIVE_TARGETS else [])
        for t in sorted(TARGETS)
    ],
)
def test_valid_constructor_arguments(target):
    """Each valid value, one argument at a time, constructs an object that works."""
    keras.utils.set_random_seed(0)
    problems, seen = _sweep(target, want_valid=True)
    assert seen > 0
    assert not problems, "\n".join(problems)


def test_every_constructor_argument_is_specified():
    """A new constructor argument must get a spec (so that it is fuzzed)."""
    import inspect

    missing = []
    for name, target in TARGETS.items():
        if target.case is None:  # the solver functions: below
            continue
        cls = type(make(target.case))
        params = [
            p
            for p, info in inspect.signature(cls.__init__).parameters.items()
            if p != "self" and info.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        # PcDEQ and LipschitzMultiscale pass the rest to DEQ, fuzzed there.
        missing += [f"{name}.{p}" for p in params if p not in TARGETS[name].args]
    for name in SOLVER_NAMES:
        params = set(
            solvers.registry.get(name).__code__.co_varnames[
                : solvers.registry.get(name).__code__.co_argcount
            ]
        )
        missing += [
            f"solvers.{name}.{p}"
            for p in params - {"z0"}
            if p not in TARGETS[f"solvers.{name}"].args
        ]
    assert not missing, missing


@pytest.mark.parametrize(
    "bug_id",
    [
        pytest.param(bug_id, marks=pytest.mark.xfail(strict=True, reason=bug.reason))
        for bug_id, bug in KNOWN_BUGS.items()
    ],
)
def test_known_constructor_bug(bug_id):
    """The inputs of one known bug: the test passes once they are all handled (it stops at
    the first problem, which `python tests/test_fuzz.py --bugs` lists in full)."""
    problem = next(known_bug_problems(bug_id), None)
    assert problem is None, problem


def known_bug_problems(bug_id):
    for target, arg, predicate in KNOWN_BUGS[bug_id].cases:
        spec = TARGETS[target]
        for value in values_for(target, arg):
            try:
                selected = predicate(value)
            except Exception:
                selected = False
            if selected:
                kwargs = {**spec.base, **spec.args[arg].context, arg: value}
                problem = check_case(target, kwargs, [arg])
                if problem:
                    yield problem


# ------------------------------------------------------------- hypothesis: combinations
def _combinable(target):
    """Arguments that need no context (several of them can be drawn together)."""
    return sorted(
        a for a, spec in TARGETS[target].args.items() if not spec.context and spec.generic
    )


@st.composite
def constructor_cases(draw):
    target = draw(st.sampled_from(sorted(TARGETS)))
    spec = TARGETS[target]
    names = draw(
        st.lists(st.sampled_from(_combinable(target)), min_size=1, max_size=3, unique=True)
    )
    kwargs = dict(spec.base)
    for name in names:
        pool = values_for(target, name)
        kwargs[name] = draw(
            st.one_of(
                st.sampled_from(pool),
                st.integers(-3, 12),
                st.floats(-2.0, 2.0, allow_nan=False),
                st.sampled_from([math.nan, math.inf, -math.inf]),
            )
        )
    assume(not any(known_bug(target, name, kwargs[name]) for name in names))
    return target, kwargs, names


@examples(80)
@given(case=constructor_cases())
def test_constructor_argument_combinations(case):
    target, kwargs, names = case
    keras.utils.set_random_seed(0)
    problem = check_case(target, kwargs, names)
    assert problem is None, problem


# =================================================================== call-path properties
def dense_cell_map(cell, x):
    """The DenseCell map in float64 numpy, from the cell's weights (independent)."""
    w, u, b = (np.asarray(v, "float64") for v in cell.get_weights())
    x64 = np.asarray(x, "float64")
    return lambda z: np.tanh(z @ w + x64 @ u + b)


def per_sample(a):
    return a.reshape(a.shape[0], -1)


@st.composite
def deq_configs(draw):
    solver = draw(st.sampled_from(SOLVER_NAMES))
    options = {}
    for key, check in SOLVER_OPTIONS[solver].items():
        if draw(st.booleans()):
            options[key] = draw(
                st.integers(1, 8)
                if check is size
                else st.floats(0.1, 1.0)
                if check is fraction
                else st.booleans()
                if check is flag
                else st.sampled_from([0.0, 1e-4, 1e-2])
            )
    kind = draw(st.sampled_from(["vector", "image"]))
    features = draw(st.integers(1, 6))
    sample = (features,) if kind == "vector" else (draw(st.integers(1, 3)), 2, features)
    return {
        "solver": solver,
        "max_iter": draw(st.integers(1, 40)),
        "tol": draw(st.sampled_from([1e-2, 1e-4, 1e-6])),
        "stop_mode": draw(st.sampled_from(["rel", "abs"])),
        "solver_options": options,
        "backward": draw(st.sampled_from(["implicit", "phantom", "one_step", "unrolled"])),
        "batch": draw(st.sampled_from([1, 3, 7, 257])),
        "sample": sample,
        "dtype": draw(st.sampled_from(["float32", "float64", "float16", "int input"])),
        "training": draw(st.booleans()),
    }


def residual_slack(dtype):
    return {"float16": 5e-3, "float32": 2e-5, "float64": 1e-9}[dtype]


DEQ_CORNER_CASES = [
    {  # large odd batch of image states in float16, Anderson, implicit training
        "solver": "anderson",
        "max_iter": 30,
        "tol": 1e-3,
        "stop_mode": "rel",
        "solver_options": {"window": 3},
        "backward": "implicit",
        "batch": 257,
        "sample": (3, 2, 4),
        "dtype": "float16",
        "training": True,
    },
    {  # int input, one sample, Broyden, phantom gradient
        "solver": "broyden",
        "max_iter": 25,
        "tol": 1e-6,
        "stop_mode": "abs",
        "solver_options": {"memory": 2},
        "backward": "phantom",
        "batch": 1,
        "sample": (5,),
        "dtype": "int input",
        "training": True,
    },
]


@examples(20)
@example(config=DEQ_CORNER_CASES[0])
@example(config=DEQ_CORNER_CASES[1])
@given(config=deq_configs())
def test_deq_call_property(config):
    """Random solver settings, shapes, batch sizes and dtypes: finite output of the
    input's shape, statistics, and a converged state that is a fixed point in numpy."""
    keras.utils.set_random_seed(0)
    c = dict(config)
    layer_dtype = "float32" if c["dtype"] == "int input" else c["dtype"]
    layer = DEQ(
        DenseCell(c["sample"][-1], dtype=layer_dtype),
        solver=c["solver"],
        max_iter=c["max_iter"],
        tol=c["tol"],
        stop_mode=c["stop_mode"],
        solver_options=c["solver_options"],
        backward=c["backward"],
        on_failure="ignore",
        dtype=layer_dtype,
    )
    shape = (c["batch"], *c["sample"])
    if c["dtype"] == "int input":
        x = np.random.default_rng(1).integers(-3, 4, size=shape).astype("int32")
    else:
        x = floats(shape, 1, "float32").astype(layer_dtype)

    with time_limit():
        if c["training"]:
            z, loss, grads = forward_and_gradient(layer, x)
            assert np.isfinite(float(loss))
            check_finite(*[g for g in grads if g is not None])
            if c["backward"] == "implicit":
                assert metric_values(layer)["bwd_steps"] >= 1
        else:
            z = layer(x)
    assert z.dtype == layer_dtype
    check_finite(z, shapes=[shape])
    check_deq_statistics(layer, c["max_iter"])

    # Independent: re-measure the residual of the returned state in float64.
    z64 = np.asarray(z, "float64")
    fz = dense_cell_map(layer.cell, x)(z64)
    diff = np.linalg.norm(per_sample(fz - z64), axis=1)
    f_norm = np.linalg.norm(per_sample(fz), axis=1)
    if c["stop_mode"] == "abs":
        crit, slack = diff, residual_slack(layer_dtype) * (1.0 + f_norm)
    else:
        crit, slack = diff / (f_norm + 1e-8), residual_slack(layer_dtype)
    if metric_values(layer)["converged"] == 1.0:
        assert np.all(crit <= c["tol"] + slack), crit.max()


@examples(8)
@given(
    solver=st.sampled_from(SOLVER_NAMES),
    backward=st.sampled_from(["implicit", "unrolled"]),
    batch=st.sampled_from([1, 5]),
    features=st.integers(1, 5),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_deq_gradient_matches_the_exact_implicit_gradient(solver, backward, batch, features, dtype):
    """dL/dx from the layer equals (I - J)^-T applied by numpy with the exact Jacobians."""
    keras.utils.set_random_seed(0)
    layer = DEQ(
        DenseCell(features, dtype=dtype),
        solver=solver,
        tol=1e-7 if dtype == "float64" else 1e-5,
        max_iter=100,
        backward=backward,
        on_failure="ignore",
        dtype=dtype,
    )
    x = floats((batch, features), 3, dtype)
    r = floats((batch, features), 4, dtype)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        z = layer(xt, training=True)
        loss = tf.reduce_sum(z * r)
    got = tape.gradient(loss, xt).numpy()
    assume(metric_values(layer)["converged"] == 1.0)

    w, u, b = (np.asarray(v, "float64") for v in layer.cell.get_weights())
    z64 = np.asarray(z, "float64")
    want = np.empty_like(got, dtype="float64")
    for i in range(batch):
        d = 1.0 - np.tanh(z64[i] @ w + x[i].astype("float64") @ u + b) ** 2
        j_z, j_x = d[:, None] * w.T, d[:, None] * u.T  # dz+/dz, dz+/dx
        dz_dx = np.linalg.solve(np.eye(features) - j_z, j_x)
        want[i] = dz_dx.T @ r[i].astype("float64")
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4 if dtype == "float32" else 1e-6)


# ------------------------------------------------------------------------- solvers
STRUCTURES = ("matrix", "rank1", "image", "list", "dict")


def make_structure(kind, batch, dtype, seed=0):
    rng = np.random.default_rng(seed)

    def t(*shape):
        return tf.constant(rng.normal(size=(batch, *shape)), dtype)

    return {
        "matrix": lambda: t(4),
        "rank1": lambda: t(),
        "image": lambda: t(2, 3, 2),
        "list": lambda: [t(3), t(2, 2)],
        "dict": lambda: {"a": t(2), "b": t(1, 3)},
    }[kind]()


class LinearTanh:
    """f(z) = tanh(0.5 * flat(z) Q + x) reshaped like z: a contraction (||Q|| = 1),
    in TensorFlow and in float64 numpy (independent of the solvers' packing)."""

    def __init__(self, structure, seed=0):
        self.structure = structure
        leaves = tf.nest.flatten(structure)
        self.batch = int(leaves[0].shape[0])
        self.sizes = [int(np.prod(t.shape[1:])) for t in leaves]
        n = sum(self.sizes)
        rng = np.random.default_rng(seed)
        self.q = np.linalg.qr(rng.normal(size=(n, n)))[0]
        self.x = rng.normal(size=(self.batch, n))
        self.nan_rows = np.zeros(self.batch, bool)

    def flat_np(self, structure):
        return np.concatenate(
            [np.asarray(t, "float64").reshape(self.batch, -1) for t in tf.nest.flatten(structure)],
            axis=1,
        )

    def np(self, flat):
        out = np.tanh(0.5 * flat @ self.q + self.x)
        out[self.nan_rows] = np.nan
        return out

    def __call__(self, z):
        leaves = tf.nest.flatten(z)
        dtype = leaves[0].dtype
        flat = tf.concat([tf.reshape(t, [self.batch, -1]) for t in leaves], axis=1)
        x = np.where(self.nan_rows[:, None], np.nan, self.x)
        out = tf.tanh(0.5 * tf.matmul(tf.cast(flat, "float64"), self.q) + x)
        parts = tf.split(tf.cast(out, dtype), self.sizes, axis=1)
        shaped = [tf.reshape(p, tf.shape(t)) for p, t in zip(parts, leaves, strict=True)]
        return tf.nest.pack_sequence_as(z, shaped)

    def fixed_point(self):
        z = np.zeros((self.batch, sum(self.sizes)))
        for _ in range(200):
            z = self.np(z)
        return z


@st.composite
def solver_configs(draw):
    name = draw(st.sampled_from(SOLVER_NAMES))
    options = {}
    for key, check in SOLVER_OPTIONS[name].items():
        if draw(st.booleans()):
            options[key] = draw(
                st.integers(1, 10)
                if check is size
                else st.floats(0.05, 1.0)
                if check is fraction
                else st.booleans()
                if check is flag
                else st.sampled_from([0.0, 1e-8, 1e-3])
            )
    return {
        "name": name,
        "structure": draw(st.sampled_from(STRUCTURES)),
        "dtype": draw(st.sampled_from(["float16", "bfloat16", "float32", "float64"])),
        "batch": draw(st.sampled_from([1, 3, 5, 257])),
        "max_iter": draw(st.integers(1, 60)),
        "tol": draw(st.sampled_from([1e-1, 1e-3, 1e-5])),
        "stop_mode": draw(st.sampled_from(["rel", "abs"])),
        "options": options,
        "nan_rows": draw(st.sampled_from(["none", "some", "all"])),
    }


LOW_PRECISION = {"float16": 2e-2, "bfloat16": 1e-1, "float32": 1e-5, "float64": 1e-10}


SOLVER_CORNER_CASES = [
    {  # a list state in bfloat16, 257 samples, every other one NaN
        "name": "anderson",
        "structure": "list",
        "dtype": "bfloat16",
        "batch": 257,
        "max_iter": 40,
        "tol": 1e-1,
        "stop_mode": "abs",
        "options": {"window": 3, "ridge": 0.0},
        "nan_rows": "some",
    },
    {  # a dict state in float16 with a tolerance below its precision
        "name": "broyden",
        "structure": "dict",
        "dtype": "float16",
        "batch": 1,
        "max_iter": 60,
        "tol": 1e-5,
        "stop_mode": "rel",
        "options": {"memory": 2},
        "nan_rows": "none",
    },
    {  # a rank-1 state, all samples NaN
        "name": "fixed_point",
        "structure": "rank1",
        "dtype": "float64",
        "batch": 3,
        "max_iter": 10,
        "tol": 1e-3,
        "stop_mode": "rel",
        "options": {"damping": 0.5},
        "nan_rows": "all",
    },
]


@examples(40)
@example(config=SOLVER_CORNER_CASES[0])
@example(config=SOLVER_CORNER_CASES[1])
@example(config=SOLVER_CORNER_CASES[2])
@given(config=solver_configs())
def test_solver_call_property(config):
    """Solvers called directly: the result mirrors z0's structure, steps are within
    max_iter, `converged` is `residual <= tol`, the residuals match a numpy
    re-measurement, a converged state is near the numpy fixed point, and samples whose
    map is NaN are reported unconverged without spoiling the others."""
    c = config
    z0 = make_structure(c["structure"], c["batch"], c["dtype"])
    f = LinearTanh(z0)
    if c["nan_rows"] != "none":
        f.nan_rows[:] = True if c["nan_rows"] == "all" else np.arange(c["batch"]) % 2 == 0
    z0 = tf.nest.map_structure(tf.zeros_like, z0)
    with time_limit():
        result = solvers.get(c["name"])(
            f, z0, max_iter=c["max_iter"], tol=c["tol"], stop_mode=c["stop_mode"], **c["options"]
        )
    tf.nest.assert_same_structure(result.state, z0)
    for got, want in zip(tf.nest.flatten(result.state), tf.nest.flatten(z0), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
    steps = int(result.steps)
    assert 1 <= steps <= c["max_iter"]
    converged = result.converged.numpy()
    crit = (result.rel_residual if c["stop_mode"] == "rel" else result.abs_residual).numpy()
    np.testing.assert_array_equal(converged, crit <= c["tol"])

    finite_rows = ~f.nan_rows
    assert not converged[f.nan_rows].any(), "a NaN sample is reported converged"
    assert np.all(np.isinf(crit[f.nan_rows])), crit
    state = f.flat_np(result.state)
    assert np.all(np.isfinite(state)), "the returned state holds NaN"
    if steps < c["max_iter"]:  # it only stops early when every finite sample converged
        assert converged[finite_rows].all()

    if not finite_rows.any():
        return
    # Independent re-measurement of the residuals of the returned state.
    fz = f.np(state)[finite_rows]
    diff = np.linalg.norm(fz - state[finite_rows], axis=1)
    scale = np.linalg.norm(fz, axis=1)
    atol = LOW_PRECISION[c["dtype"]] * (1.0 + scale)
    np.testing.assert_allclose(result.abs_residual.numpy()[finite_rows], diff, atol=atol.max())
    # A contraction with constant 1/2: ||z - z*|| <= ||f(z) - z|| / (1 - 1/2).
    if converged[finite_rows].all():
        error = np.linalg.norm(state[finite_rows] - f.fixed_point()[finite_rows], axis=1)
        assert np.all(error <= 2 * diff + 4 * atol), (error, diff)


# ------------------------------------------------------------------------- pcDEQ
@examples(10)
@given(
    form=st.sampled_from(["dense", "conv"]),
    variant=st.sampled_from([1, 2]),
    batch=st.sampled_from([1, 3, 257]),
    width=st.integers(1, 4),
    dtype=st.sampled_from(["float32", "float64"]),
    damping=st.sampled_from([1.0, 0.5]),
)
def test_pcdeq_call_property(form, variant, batch, width, dtype, damping):
    """The unique fixed point: finite, nonnegative, converged, and a fixed point of
    sigma(W z + softplus/relu(h)) recomputed in numpy."""
    keras.utils.set_random_seed(0)
    options = {"damping": damping}
    if form == "dense":
        layer = PcDEQ(units=width, variant=variant, solver_options=options, dtype=dtype)
        h = floats((batch, width), 1, dtype)
    else:
        layer = PcDEQ(
            filters=width, kernel_size=3, variant=variant, solver_options=options, dtype=dtype
        )
        h = floats((min(batch, 7), 3, 3, width), 1, dtype)
    with time_limit():
        z, _, grads = forward_and_gradient(layer, h)
    check_finite(z, shapes=[h.shape])
    check_finite(*[g for g in grads if g is not None])
    check_deq_statistics(layer, 200)
    assert metric_values(layer)["converged"] == 1.0
    z64 = np.asarray(z, "float64")
    assert np.all(z64 >= 0)
    if form == "dense":  # independent numpy map
        kernel = np.asarray(layer.cell.effective_kernel(), "float64")
        h64 = h.astype("float64")
        inj = np.log1p(np.exp(5 * h64)) / 5 if variant == 1 else np.maximum(h64, 0)
        pre = z64 @ kernel + inj
        fz = np.tanh(pre) if variant == 1 else 1 / (1 + np.exp(-pre))
        rel = np.linalg.norm(fz - z64, axis=1) / (np.linalg.norm(fz, axis=1) + 1e-8)
        assert np.all(rel <= 1e-4 + residual_slack(dtype)), rel.max()


# ------------------------------------------------------------------ Lipschitz multiscale
@examples(4)
@given(
    channels=st.sampled_from([(4,), (4, 8), (2, 4, 4)]),
    spatial=st.sampled_from([4, 8]),
    batch=st.sampled_from([1, 3]),
    solver=st.sampled_from(SOLVER_NAMES),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_lipschitz_multiscale_call_property(channels, spatial, batch, solver, dtype):
    """Branch shapes, finite output and statistics; and the cell is a contraction with the
    constant `lipschitz_bound()` on random pairs of states (an independent measurement)."""
    keras.utils.set_random_seed(0)
    layer = LipschitzMultiscale(
        channels=channels,
        groups=2,
        norm_iterations=8,
        solver=solver,
        max_iter=15,
        tol=1e-3,
        on_failure="ignore",
        dtype=dtype,
    )
    x = floats((batch, spatial, spatial, channels[0]), 1, dtype)
    shapes = [(batch, spatial // 2**i, spatial // 2**i, c) for i, c in enumerate(channels)]
    with time_limit():
        z, _, grads = forward_and_gradient(layer, x)
    check_finite(z, shapes=shapes)
    check_finite(*[g for g in grads if g is not None])
    check_deq_statistics(layer, 15)

    bound = float(layer.cell.lipschitz_bound(iterations=30))
    assert 0 < bound < 1
    za = [tf.constant(floats(s, 10 + i, dtype)) for i, s in enumerate(shapes)]
    zb = [tf.constant(floats(s, 20 + i, dtype)) for i, s in enumerate(shapes)]
    fa, fb = layer.cell(za, tf.constant(x)), layer.cell(zb, tf.constant(x))

    def dist(p, q):
        sq = sum(
            np.sum(per_sample(np.asarray(a, "float64") - np.asarray(b, "float64")) ** 2, axis=1)
            for a, b in zip(p, q, strict=True)
        )
        return np.sqrt(sq)

    assert np.all(dist(fa, fb) <= bound * dist(za, zb) * (1 + 1e-4) + 1e-6)


# ------------------------------------------------------------------------- OptEq
@examples(12)
@given(
    kind=st.sampled_from(["dense", "conv"]),
    units=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    alpha=st.sampled_from([0.3, 0.8, 1.0]),
    prior=st.sampled_from([None, *opteq.PRIORS]),
    prior_mode=st.sampled_from(["structural", "sam"]),
    training_mode=st.sampled_from(["unrolled", "implicit"]),
    batch=st.sampled_from([1, 3, 257]),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_opteq_call_property(kind, units, alpha, prior, prior_mode, training_mode, batch, dtype):
    assume(not (prior is not None and prior_mode == "sam" and training_mode == "implicit"))
    keras.utils.set_random_seed(0)
    block = OptEqBlock(
        units,
        kind=kind,
        alpha=alpha,
        prior=prior,
        prior_mode=prior_mode,
        training_mode=training_mode,
        unroll_steps=8,
        max_iter=20,
        deq_options={"on_failure": "ignore"},
        dtype=dtype,
    )
    x = floats((batch, 4) if kind == "dense" else (min(batch, 5), 4, 4, 2), 1, dtype)
    with time_limit():
        z, _, grads = forward_and_gradient(block, x)
    check_finite(z, shapes=[x.shape])
    check_finite(*[g for g in grads if g is not None])
    if training_mode == "implicit":
        check_deq_statistics(block.deq, 20)
    # ||W_l|| <= 1 with ReLU: T is nonexpansive; the bound is at most 1 (Theorem 1).
    assert float(block.cell.lipschitz_bound()) <= 1.0 + 1e-5


# ------------------------------------------------------------ DEQ-Transformer language model
@examples(5)
@given(
    vocab=st.integers(2, 13),
    d_model=st.sampled_from([4, 6, 8]),
    num_heads=st.sampled_from([1, 2, 3]),
    norm=st.sampled_from(["pre", "post"]),
    length=st.integers(1, 6),
    batch=st.sampled_from([1, 3]),
    token_dtype=st.sampled_from(["int32", "int64", "uint8"]),
)
def test_transformer_lm_call_property(vocab, d_model, num_heads, norm, length, batch, token_dtype):
    """Finite logits of shape (batch, T, vocab) for any int dtype, and exact causality with
    fixed-point iteration: changing the last token leaves the earlier logits unchanged."""
    keras.utils.set_random_seed(0)
    model = DEQTransformerLM(
        vocab, d_model=d_model, num_heads=num_heads, norm=norm, solver="fixed_point", max_iter=30
    )
    tokens = np.random.default_rng(1).integers(0, vocab, size=(batch, length)).astype(token_dtype)
    with time_limit():
        logits = np.asarray(model(tokens))
    check_finite(logits, shapes=[(batch, length, vocab)])
    check_deq_statistics(model.deq, 30)
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1].astype("int64") + 1) % vocab
    other = np.asarray(model(changed))
    np.testing.assert_allclose(other[:, :-1], logits[:, :-1], rtol=1e-5, atol=1e-5)


# ================================================================= runtime bugs (xfail)
def _deep_or_unclear(fn, names):
    """Asserts that `fn` raises a ValueError/TypeError naming one of `names`."""
    outcome = attempt(fn)
    assert outcome.kind == "error", outcome.describe()
    assert names_argument(str(outcome.error), names), outcome.describe()


SOLVER_INPUT_BUGS = {
    "scalar z0": (lambda s: s(_contraction, tf.constant(1.0)), ["z0"]),
    "nested python list z0": (lambda s: s(_contraction, [[0.0, 0.0]]), ["z0"]),
    "z0 leaves with different batch sizes": (
        lambda s: s(lambda z: [0.5 * t for t in z], [tf.zeros([2, 3]), tf.zeros([3, 3])]),
        ["z0"],
    ),
    "f returns another shape": (
        lambda s: s(lambda z: tf.concat([z, z], 1), tf.zeros([2, 3])),
        ["f"],
    ),
    "f returns None": (lambda s: s(lambda z: None, tf.zeros([2, 3])), ["f"]),
}


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("case", sorted(SOLVER_INPUT_BUGS))
def test_solver_bad_inputs_raise_clear_errors(case, name):
    fn, names = SOLVER_INPUT_BUGS[case]
    _deep_or_unclear(lambda: fn(solvers.get(name)), names)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize(
    ("z0", "names"),
    [
        (tf.zeros([2, 3], tf.int32), ["z0"]),
        (tf.zeros([2, 3], tf.bool), ["z0"]),
        (tf.zeros([2, 3], tf.complex64), ["z0"]),
        ([], ["z0"]),
        ({}, ["z0"]),
    ],
    ids=["int", "bool", "complex", "empty list", "empty dict"],
)
def test_solver_refuses_non_float_or_empty_z0(name, z0, names):
    _deep_or_unclear(lambda: solvers.get(name)(_contraction, z0), names)


@pytest.mark.parametrize(
    "name",
    [
        "fixed_point",
        "broyden",
        "anderson",
    ],
)
def test_solver_zero_width_state(name):
    outcome = attempt(lambda: solvers.get(name)(_contraction, tf.zeros([2, 0])))
    assert outcome.kind == "works", outcome.describe()


def test_transformer_lm_on_zero_tokens():
    model = DEQTransformerLM(7, d_model=8, num_heads=2, max_iter=3)
    assert model(np.zeros((2, 0), "int32")).shape == (2, 0, 7)


@pytest.mark.parametrize("shape", [(3, 5), (2, 4)], ids=["features", "batch"])
def test_deq_initial_state_of_the_wrong_shape(shape):
    layer = DEQ(DenseCell(4))
    _deep_or_unclear(
        lambda: layer(floats((3, 4)), initial_state=np.zeros(shape)), ["initial_state"]
    )


def test_deq_called_on_another_feature_size():
    layer = DEQ(DenseCell(4))
    layer(floats((3, 4)))
    _deep_or_unclear(lambda: layer(floats((3, 6))), ["input", "inputs", "input_shape"])


@pytest.mark.parametrize("backward", ["implicit", "phantom", "one_step"])
@pytest.mark.parametrize("dtype", ["float64", "mixed_float16"])
def test_deq_and_cell_of_different_dtypes(backward, dtype):
    layer = DEQ(DenseCell(4), dtype=dtype, backward=backward, on_failure="ignore")

    def run():
        z, _, grads = forward_and_gradient(layer, floats((3, 4)))
        assert z.dtype == layer.compute_dtype, z.dtype
        check_finite(z, *grads)

    outcome = attempt(run)
    assert outcome.kind == "works" or (
        outcome.kind == "error" and names_argument(str(outcome.error), ["dtype"])
    ), outcome.describe()


LM_TOKEN_BUGS = {
    "token id >= vocab_size": np.array([[1, 7, 2]], "int32"),
    "negative token id": np.array([[1, -1, 2]], "int32"),
    "float tokens": np.array([[1.7, 2.2]], "float32"),
    "rank-1 tokens": np.array([1, 2, 3], "int32"),
}


@pytest.mark.parametrize("case", sorted(LM_TOKEN_BUGS))
def test_transformer_lm_refuses_bad_tokens(case):
    model = DEQTransformerLM(7, d_model=8, num_heads=2, max_iter=3)
    _deep_or_unclear(lambda: model(LM_TOKEN_BUGS[case]), ["tokens", "vocab_size", "inputs"])


def test_sinusoidal_positions_with_one_feature():
    from keras_deq.layers.transformer import sinusoidal_positions

    assert tuple(sinusoidal_positions(3, 1).shape) == (3, 1)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_solver_max_iter_beyond_int32(name):
    outcome = attempt(lambda: solvers.get(name)(_contraction, tf.zeros((2, 3)), max_iter=2**31))
    if outcome.kind == "works":
        result = solvers.get(name)(_contraction, tf.zeros((2, 3)), max_iter=2**31)
        assert bool(tf.reduce_all(result.converged)), f"steps={int(result.steps)}"
    else:
        assert outcome.kind == "error" and names_argument(str(outcome.error), ["max_iter"])


def test_nan_input_with_infinite_tolerance_is_not_reported_converged():
    # tol=inf once made a sample whose iterates are all NaN count as converged.
    try:
        layer = DEQ(DenseCell(4), tol=math.inf, on_failure="raise")
        layer(np.full((2, 4), np.nan, "float32"))
    except (ValueError, FloatingPointError):
        return  # refused, or reported: both fine
    assert metric_values(layer)["converged"] == 0.0


# ===================================================================== slow exploration
@pytest.mark.slow
@settings(FAST, max_examples=600)
@given(case=constructor_cases())
def test_constructor_argument_combinations_many(case):
    target, kwargs, names = case
    keras.utils.set_random_seed(0)
    problem = check_case(target, kwargs, names)
    assert problem is None, problem


@pytest.mark.slow
@settings(FAST, max_examples=300)
@given(config=solver_configs())
def test_solver_call_property_many(config):
    test_solver_call_property.hypothesis.inner_test(config)


@pytest.mark.slow
@settings(FAST, max_examples=150)
@given(config=deq_configs())
def test_deq_call_property_many(config):
    test_deq_call_property.hypothesis.inner_test(config)


# ===================================================================== the table
def outcome_table():
    """{target: {category: count}} over every (argument, value) of the sweep."""
    table = {}
    for target, arg in ARG_CASES:
        row = table.setdefault(target, {})
        for value in values_for(target, arg):
            category = classify(target, arg, value)
            row[category] = row.get(category, 0) + 1
    return table


if __name__ == "__main__":  # python tests/test_fuzz.py: prints the table
    import os
    import sys

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras.utils.set_random_seed(0)
    if "--bugs" in sys.argv:
        for bug_id in KNOWN_BUGS:
            print(f"## {bug_id}")
            for problem in known_bug_problems(bug_id):
                print("-", problem)
        sys.exit()
    rows = outcome_table()
    categories = sorted({c for row in rows.values() for c in row})
    print("| target | cases | " + " | ".join(categories) + " |")
    print("|---|---|" + "---|" * len(categories))
    for target, row in rows.items():
        cells = " | ".join(str(row.get(c, 0)) for c in categories)
        print(f"| {target} | {sum(row.values())} | {cells} |")
