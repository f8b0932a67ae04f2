"""The cost of a DEQ's batch-wide stopping test under `keras.distribution` on JAX.

    python benchmarks/jax_distribution.py [--batch 512] [--width 256] [--repeats 20]

A DEQ solver stops when every sample of the batch has converged: with the batch split
over devices (`DataParallel`), that test is a reduction across devices at every
iteration. This script runs, in one process on two host devices
(`--xla_force_host_platform_device_count=2`; on a machine with accelerators, pass
`--real-devices`), a DEQ of `DenseCell(width)` (fixed-point forward) on one device and
under `DataParallel` over two, and prints:

- the cross-device collectives in the compiled forward pass (`all-reduce` and the like
  in the optimized HLO; those inside the solver's while loop run once per iteration);
- the forward time per solver iteration (median of `--repeats`), with the stopping test
  (tol 1e-6) and with a tolerance never met (tol 1e-30: every sample runs the full budget; the loop still
  tests, so this isolates the iterations' own cost only where the count differs), and
  an explicit `width` x `width` tanh layer applied the same number of times as a
  reference of the work without any test.

Read the ratio of the DEQ's per-iteration time on two devices to one beside the
explicit reference's: the difference is what the per-iteration reduction costs here.
"""

import argparse
import os
import re
import statistics
import sys
import time


def setup(real_devices):
    os.environ["KERAS_BACKEND"] = "jax"
    if not real_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2".strip()


def collectives(hlo):
    """Counts of the cross-device operations in an optimized HLO text."""
    names = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
    return {n: len(re.findall(rf"\b{n}(?:-start)?\(", hlo)) for n in names}


def timed(fn, x, repeats):
    fn(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def place(x):
    """`x` laid out as the current distribution lays out a batch (as is, without one)."""
    import keras

    current = keras.distribution.distribution()
    if current is None:
        return x
    return keras.distribution.distribute_tensor(x, current.get_data_layout(x.shape))


def measure(mode, args):
    import jax
    import keras
    import numpy as np

    import keras_deq

    if mode == "two":
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices()[:2])
        )
    else:
        keras.distribution.set_distribution(None)
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(args.batch, args.width)).astype("float32")
    x_in = place(x)  # the batch as the distribution lays it out, once for every model
    rows = {}
    for tol in (1e-6, 1e-30):
        deq = keras_deq.DEQ(
            keras_deq.DenseCell(args.width),
            solver="fixed_point",
            max_iter=args.max_iter,
            tol=tol,
            on_failure="ignore",
        )
        deq.build(x.shape)
        trainable = [v.value for v in deq.trainable_variables]
        non_trainable = [v.value for v in deq.non_trainable_variables]

        index = [id(v) for v in deq.non_trainable_variables].index(id(deq._stats["fwd_steps"]))

        @jax.jit
        def forward(x, deq=deq, trainable=trainable, non_trainable=non_trainable, index=index):
            out, state = deq.stateless_call(trainable, non_trainable, x)
            return out, state[index]

        hlo = forward.lower(x_in).compile().as_text()
        seconds = timed(lambda x, forward=forward: forward(x)[0], x_in, args.repeats)
        steps = float(forward(x_in)[1])
        rows[f"DEQ tol {tol:g}"] = (seconds, steps, collectives(hlo))
    kernel = np.random.default_rng(1).normal(size=(args.width, args.width)).astype("float32")
    kernel /= 2 * np.sqrt(args.width)
    steps = rows["DEQ tol 1e-06"][1]

    @jax.jit
    def explicit(x):
        z = jax.numpy.zeros_like(x)
        return jax.lax.fori_loop(0, int(steps), lambda _, z: jax.numpy.tanh(z @ kernel + x), z)

    hlo = explicit.lower(x_in).compile().as_text()
    rows["explicit tanh layer"] = (timed(explicit, x_in, args.repeats), steps, collectives(hlo))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--max-iter", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--real-devices", action="store_true")
    args = parser.parse_args(argv)
    setup(args.real_devices)
    import jax

    if len(jax.devices()) < 2:
        sys.exit(f"Two devices needed; JAX sees {jax.devices()}")
    print(f"devices: {jax.devices()[:2]}; batch {args.batch}, width {args.width}")
    results = {mode: measure(mode, args) for mode in ("one", "two")}
    print(
        "\n| model | iterations | ms / iteration, 1 device | ms / iteration, 2 devices "
        "| ratio 2 / 1 | collectives in the compiled forward (2 devices) |"
    )
    print("|---|---|---|---|---|---|")
    for name, (one_s, steps, _) in results["one"].items():
        two_s, _, found = results["two"][name]
        listed = ", ".join(f"{k} {v}" for k, v in found.items() if v) or "none"
        print(
            f"| {name} | {steps:.0f} | {one_s / steps * 1e3:.3f} | {two_s / steps * 1e3:.3f} "
            f"| {two_s / one_s:.2f} | {listed} |"
        )


if __name__ == "__main__":
    main()
