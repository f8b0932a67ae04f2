"""Where a conv cell's DEQ training step spends its time on TensorFlow CPU.

The conv cell of `benchmarks/vs_torchdeq.py` (z <- tanh(conv3x3(z) + x), 8 channels on
8x8 digits, batch 64: a 512-wide state per sample), one thread. Each row is the median
time of one call of a `tf.function`:

- `bare cell loop`: a `tf.while_loop` of `--fwd` cell evaluations, nothing else;
- `bare vjp loop`: a `tf.while_loop` of `--bwd` vector-Jacobian products of the cell at a
  fixed point (one taped evaluation, as the implicit backward does);
- `DEQ forward`: the layer's fixed-point solve of exactly `--fwd` iterations;
- `DEQ forward + backward`: the same and the implicit backward with Anderson, exactly
  `--bwd` adjoint iterations, gradients of the input and the weights;

the DEQ rows for `DEQ(jit_compile=False)` (the graph runs every op), `"auto"` (on a machine
without GPU or TPU, for a conv cell: the Anderson forward solve compiled whole, the
fixed-point forward and the adjoint in the graph) and `True` (each solve compiled whole by
XLA, convolutions included), with each forward solver of `--solvers` (the adjoint: Anderson). The ratios are to the
bare loops of the same calls, so they show the solver's own cost.

    python benchmarks/conv_step.py            # 30 forward, 25 adjoint iterations
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_deq  # noqa: E402

BATCH, SIDE, CHANNELS = 64, 8, 8


class ConvCell(keras.layers.Layer):
    """z <- tanh(conv3x3(z) + x)."""

    def build(self, z_shape, x_shape):
        self.conv = keras.layers.Conv2D(CHANNELS, 3, padding="same")
        self.conv.build(z_shape)

    def call(self, z, x):
        return keras.ops.tanh(self.conv(z) + x)

    def compute_output_shape(self, z_shape, x_shape):
        return z_shape


def median_ms(fn, repeats, calls):
    """Median over `repeats` of the mean time of `calls` calls, in milliseconds."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def bare_loops(cell, x, fwd, bwd):
    @tf.function
    def cell_loop():
        body = lambda i, z: (i + 1, cell(z, x))  # noqa: E731
        return tf.while_loop(lambda i, z: i < fwd, body, (0, tf.zeros_like(x)))[1]

    @tf.function
    def vjp_loop():
        z = tf.zeros_like(x)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(z)
            fz = cell(z, x)

        def body(i, u):
            return i + 1, tape.gradient(fz, z, output_gradients=u) + x

        return tf.while_loop(lambda i, u: i < bwd, body, (0, x))[1]

    return cell_loop, vjp_loop


def deq_calls(cell, x, fwd, bwd, jit_compile, solver):
    # tol out of reach: every solve runs exactly its budget.
    deq = keras_deq.DEQ(
        cell,
        solver=solver,
        max_iter=fwd,
        tol=1e-30,
        backward="implicit",
        backward_solver="anderson",
        backward_max_iter=bwd,
        backward_tol=1e-30,
        solver_options={"window": 6} if solver == "anderson" else None,
        backward_solver_options={"window": 6},
        jit_compile=jit_compile,
        on_failure="ignore",
    )
    deq.build(x.shape)

    @tf.function
    def forward():
        return deq(x)

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(deq(x, training=True)))
        return tape.gradient(loss, [x, *cell.trainable_variables])

    return forward, forward_backward


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fwd", type=int, default=30, help="forward iterations")
    parser.add_argument("--bwd", type=int, default=25, help="adjoint iterations")
    parser.add_argument(
        "--solvers", nargs="+", default=["fixed_point", "anderson"], help="forward solvers"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, default=1, help="TensorFlow threads (0: leave TensorFlow's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(0)
    x = tf.random.normal((BATCH, SIDE, SIDE, CHANNELS))
    cell = ConvCell()
    cell.build(x.shape, x.shape)
    cell_loop, vjp_loop = bare_loops(cell, x, args.fwd, args.bwd)
    bare_fwd = median_ms(cell_loop, args.repeats, args.calls)
    bare_bwd = median_ms(vjp_loop, args.repeats, args.calls)
    print(f"conv cell, batch {BATCH}, state {SIDE}x{SIDE}x{CHANNELS}, threads {args.threads}")
    print()
    print("| call | forward solver | jit_compile | ms | ratio to the bare loops |")
    print("|---|---|---|---|---|")
    print(f"| bare cell loop ({args.fwd}) | - | - | {bare_fwd:.2f} | 1.00 |")
    print(f"| bare vjp loop ({args.bwd}) | - | - | {bare_bwd:.2f} | 1.00 |")
    for solver in args.solvers:
        for jit_compile in (False, "auto", True):
            forward, forward_backward = deq_calls(cell, x, args.fwd, args.bwd, jit_compile, solver)
            fwd_ms = median_ms(forward, args.repeats, args.calls)
            both_ms = median_ms(forward_backward, args.repeats, args.calls)
            row = f"{solver} | {jit_compile}"
            print(f"| DEQ forward | {row} | {fwd_ms:.2f} | {fwd_ms / bare_fwd:.2f} |")
            print(
                f"| DEQ forward + backward | {row} | {both_ms:.2f} "
                f"| {both_ms / (bare_fwd + bare_bwd):.2f} |"
            )


if __name__ == "__main__":
    main()
