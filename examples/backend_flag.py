"""`--backend NAME` on an example's command line: the Keras backend, set before Keras loads.

An example calls `backend_flag.apply()` before `import keras`: the flag wins over the
`KERAS_BACKEND` environment variable, which wins over the default, TensorFlow. Its parser
declares the flag too (`backend_flag.add_to(parser)`), so that `--help` lists it.
"""

import os
import sys

BACKENDS = ("tensorflow", "jax", "torch")


def requested(argv):
    """The value of `--backend NAME` or `--backend=NAME` in `argv`, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def apply(argv=None):
    """Sets `KERAS_BACKEND` from `argv` (default: the command line); returns the name."""
    argv = sys.argv[1:] if argv is None else argv
    name = requested(argv) or os.environ.get("KERAS_BACKEND") or "tensorflow"
    if name not in BACKENDS:
        sys.exit(f"--backend must be one of {', '.join(BACKENDS)}. Received: --backend {name}")
    os.environ["KERAS_BACKEND"] = name
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return name


def add_to(parser):
    """Declares `--backend` on an `argparse` parser (read earlier by `apply`)."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="Keras backend (default: $KERAS_BACKEND, else tensorflow)",
    )
