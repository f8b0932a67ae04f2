"""A hand-set ReLU DEQ that is exactly the sawtooth with 2^k linear pieces.

    python examples/synthetic/construction.py            # k = 5, width 10: 32 pieces
    python examples/synthetic/construction.py --k 10     # width 20: 1024 pieces

The model is `keras_deq.DEQ(DenseCell(2k, "relu"))` solved by plain fixed-point
iteration, with a `Dense(1)` readout, whose weights are set by hand rather than
trained. It shows that the model class of `benchmarks/expressivity.py` (a width-10
DEQ) contains the 32-piece sawtooth t^{∘5} exactly, although training from a random
start does not find it there.

The construction. The tent map t(y) = 2 min(y, 1 - y) on [0, 1] is
t(y) = 2 relu(y) - 4 relu(y - 1/2). The state holds two neurons per level
j = 1, ..., k:

    a_j = relu(y_{j-1}),   b_j = relu(y_{j-1} - 1/2),   y_j = 2 a_j - 4 b_j = t(y_{j-1}),

with y_0 = x, so y_k = t^{∘k}(x), which the readout forms from a_k and b_k. In the
cell z_next = relu(z W + x U + b) (row vectors), level 1 reads the injection x
through U and level j reads level j - 1 through W. W is nonzero only from a
lower level to a higher one: strictly upper triangular in this row-vector
convention (strictly lower triangular as a map W^T z on column vectors), hence
nilpotent, W^k = 0. The DEQ is then well posed for every input (the fixed point
exists and is unique), and plain iteration from z = 0 reaches it exactly: after n
iterations levels 1..n hold their final values, so z_k is the fixed point and the
(k+1)-th evaluation of the cell sees a zero residual. The solver stops after
k + 1 cell evaluations: 6 for the 32-piece sawtooth, 11 for the 1024-piece one.

In float32 every operation here is exact for inputs in [0, 1] (products by
powers of two, and differences whose exact value is representable), so the DEQ
matches the float64 numpy sawtooth to rounding of its last step at most.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import backend_flag  # noqa: E402

backend_flag.apply()  # `--backend NAME`, before Keras loads

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_deq  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tasks as tasks_lib  # noqa: E402


def sawtooth_weights(k, width=None):
    """The construction's weights for t^{∘k}: a dict of numpy float32 arrays.

    Keys: `kernel` W (width, width), `injection_kernel` U (1, width), `bias`
    (width,), `readout_kernel` (width, 1), `readout_bias` (1,). Neurons 2j and
    2j + 1 are a_{j+1} and b_{j+1}; a width above 2k leaves the extra neurons at
    zero weight (they stay 0).
    """
    width = 2 * k if width is None else width
    if k < 1 or width < 2 * k:
        raise ValueError(f"Need k >= 1 and width >= 2k. Received: k={k}, width={width}")
    kernel = np.zeros((width, width), "float32")
    injection = np.zeros((1, width), "float32")
    bias = np.zeros((width,), "float32")
    for j in range(k):
        a, b = 2 * j, 2 * j + 1
        bias[b] = -0.5
        if j == 0:  # level 1 reads y_0 = x
            injection[0, a] = injection[0, b] = 1.0
        else:  # level j + 1 reads y_j = 2 a_j - 4 b_j
            kernel[a - 2, a] = kernel[a - 2, b] = 2.0
            kernel[a - 1, a] = kernel[a - 1, b] = -4.0
    readout = np.zeros((width, 1), "float32")
    readout[2 * k - 2, 0], readout[2 * k - 1, 0] = 2.0, -4.0
    return {
        "kernel": kernel,
        "injection_kernel": injection,
        "bias": bias,
        "readout_kernel": readout,
        "readout_bias": np.zeros((1,), "float32"),
    }


def nilpotency_index(kernel):
    """The smallest n with kernel^n = 0 (None if there is none up to its size)."""
    power = np.eye(kernel.shape[0])
    for n in range(1, kernel.shape[0] + 1):
        power = power @ kernel
        if not np.any(power):
            return n
    return None


def build_sawtooth_deq(k, width=None, max_iter=None, on_failure="raise"):
    """`Sequential([DEQ(DenseCell(width, "relu")), Dense(1)])` holding the construction.

    The DEQ runs plain fixed-point iteration (`"fixed_point"`, damping 1) with an
    absolute tolerance far below float32 resolution at the sawtooth's scale: it
    stops at the first exact fixed point, k + 1 cell evaluations.
    """
    weights = sawtooth_weights(k, width)
    width = weights["bias"].shape[0]
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras_deq.DEQ(
                keras_deq.DenseCell(width, activation="relu"),
                solver="fixed_point",
                max_iter=max_iter or width + 2,
                tol=1e-9,
                stop_mode="abs",
                state_shape=(width,),
                on_failure=on_failure,
                name="deq",
            ),
            keras.layers.Dense(1, name="readout"),
        ]
    )
    cell = model.get_layer("deq").cell
    cell.kernel.assign(weights["kernel"])
    cell.injection_kernel.assign(weights["injection_kernel"])
    cell.bias.assign(weights["bias"])
    readout = model.get_layer("readout")
    readout.kernel.assign(weights["readout_kernel"])
    readout.bias.assign(weights["readout_bias"])
    return model


def check(k, width=None, resolution_bits=None):
    """Runs the construction on a dyadic grid of [0, 1] and compares with numpy.

    Returns a dict: `max_abs_error` against `tasks.sawtooth_fn` (float64), the
    solver's `fwd_steps` and `converged`, the number of linear `pieces` of the
    DEQ's output on the grid, and W's `nilpotency_index`.
    """
    resolution_bits = resolution_bits or k + 4
    x = (np.arange(2**resolution_bits + 1, dtype="float64") / 2**resolution_bits)[:, None]
    model = build_sawtooth_deq(k, width)
    deq = model.get_layer("deq")
    out = model(x.astype("float32"))
    stats = deq.solver_statistics()
    pred = keras.ops.convert_to_numpy(out)[:, 0].astype("float64")
    target = tasks_lib.sawtooth_fn(x[:, 0], k)
    slopes = np.diff(pred) / np.diff(x[:, 0])
    return {
        "k": k,
        "width": deq.cell.units,
        "max_abs_error": float(np.max(np.abs(pred - target))),
        "fwd_steps": stats["fwd_steps"],
        "converged": stats["converged"],
        "pieces": 1 + int(np.count_nonzero(np.abs(np.diff(slopes)) > 1e-3)),
        "nilpotency_index": nilpotency_index(keras.ops.convert_to_numpy(deq.cell.kernel)),
        "grid_points": len(x),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    backend_flag.add_to(parser)
    parser.add_argument("--k", type=int, default=5, help="tent-map compositions: 2^k pieces")
    parser.add_argument("--width", type=int, default=None, help="DEQ width (default 2k)")
    args = parser.parse_args(argv)
    r = check(args.k, args.width)
    print(f"sawtooth t^{args.k}: {2**args.k} linear pieces; DEQ width {r['width']}")
    print(f"W nilpotent: W^{r['nilpotency_index']} = 0")
    print(
        f"plain fixed-point iteration: {r['fwd_steps']:.0f} cell evaluations, "
        f"converged {r['converged']:.0%}"
    )
    print(f"max |DEQ - numpy sawtooth| on {r['grid_points']} grid points: {r['max_abs_error']:.3g}")
    print(f"linear pieces of the DEQ's output on the grid: {r['pieces']}")
    return r


if __name__ == "__main__":
    main()
