"""Synthetic separation tasks: offline stand-ins for paper 004's experiments.

Paper 004 (Wu, Zhang, Fang, Lin, NeurIPS 2024, "Separation and Bias of Deep
Equilibrium Models on Expressivity and Learning Dynamics") compares DEQs with
feed-forward networks (FNNs) on sawtooth targets, a steep target (its Eq. 5) and
Boolean functions with an unseen domain (its Eqs. 14/15). Those equations, the
sample counts and the training recipe were not readable offline, so the
generators below are OUR STAND-INS (see shared/spec/papers.md §6.2), not the
paper's exact definitions:

- `sawtooth`: the tent map t(x) = 2 min(x, 1 - x) composed k times on [0, 1].
  t^{∘k} has exactly 2^k linear pieces (k = 5 and k = 10 stand in for the
  paper's "2^5 and 2^10 linear regions").
- `steep`: g_δ(x) = 1 / (x + δ) on [0, 1], δ ∈ {2^-5, 2^-10} (the paper uses
  δ down to 2^-20, too stiff for float32). A DEQ with a *bilinear* cell can
  represent 1/x exactly through the linear fixed point z = (1 - x) z + 1; a
  `DenseCell` (z W + x U + b) cannot form the product x z, so it does not.
  By default the target is rescaled to δ g_δ(x) = δ / (x + δ) ∈ (0, 1] (same
  shape and relative steepness, max 1) so that one optimizer setting fits every
  task; `scaled=False` gives the raw 1 / (x + δ).
- `gotu`: x ∈ {±1}^10, target f1(x) = x1 x2 + x3, trained on the 512 points
  with x1 = +1 and tested on the 512 unseen points with x1 = -1 (in the style of
  Abbe et al. 2023). The GOTU error is the MSE on the unseen half.

Every generator is plain numpy, seeded, and returns float32 arrays
`(x_train, y_train, x_test, y_test)` with `x` of shape (n, d) and `y` of shape
(n, 1).
"""

import itertools

import numpy as np

TASKS = ("sawtooth5", "sawtooth10", "steep5", "steep10", "gotu")


def tent(x):
    """The tent map t(x) = 2 min(x, 1 - x) on [0, 1]."""
    return 2.0 * np.minimum(x, 1.0 - x)


def sawtooth_fn(x, k):
    """t composed k times: a sawtooth with 2^k linear pieces on [0, 1]."""
    x = np.asarray(x, dtype="float64")
    for _ in range(k):
        x = tent(x)
    return x


def steep_fn(x, delta):
    """g_δ(x) = 1 / (x + δ)."""
    return 1.0 / (np.asarray(x, dtype="float64") + delta)


def gotu_fn(x):
    """f1(x) = x1 x2 + x3 on x ∈ {±1}^d (columns 0, 1, 2 are x1, x2, x3)."""
    x = np.asarray(x, dtype="float64")
    return x[:, 0] * x[:, 1] + x[:, 2]


def _uniform_split(fn, n_train, n_test, seed, include_endpoints):
    rng = np.random.default_rng(seed)
    x_train = rng.uniform(0.0, 1.0, size=(n_train, 1))
    x_test = rng.uniform(0.0, 1.0, size=(n_test, 1))
    if include_endpoints and n_test >= 2:
        # The test set always holds both ends of [0, 1] so that the L∞ error sees
        # the steepest point x = 0.
        x_test[:2, 0] = (0.0, 1.0)
    y_train, y_test = fn(x_train[:, 0]), fn(x_test[:, 0])
    return tuple(a.astype("float32") for a in (x_train, y_train[:, None], x_test, y_test[:, None]))


def sawtooth(k=5, n_train=4096, n_test=1024, seed=0):
    """Uniform x on [0, 1], y = t^{∘k}(x) (our stand-in for sawtooth I/II)."""
    return _uniform_split(lambda x: sawtooth_fn(x, k), n_train, n_test, seed, True)


def steep(delta=2.0**-5, n_train=4096, n_test=1024, seed=0, scaled=True):
    """Uniform x on [0, 1], y = δ / (x + δ) (or 1 / (x + δ) unscaled).

    The test set includes x = 0 and x = 1.
    """
    scale = delta if scaled else 1.0
    return _uniform_split(lambda x: scale * steep_fn(x, delta), n_train, n_test, seed, True)


def boolean_cube(d=10):
    """All 2^d points of {±1}^d, shape (2^d, d), float32."""
    return np.array(list(itertools.product((1.0, -1.0), repeat=d)), dtype="float32")


def gotu(d=10, seed=0):
    """Boolean GOTU split: train on x1 = +1 (2^(d-1) points), test on x1 = -1.

    The split is deterministic (the whole cube); `seed` only shuffles the rows.
    """
    if d < 3:
        raise ValueError(f"`d` must be at least 3 for f1 = x1 x2 + x3. Received: d={d}")
    cube = boolean_cube(d)
    rng = np.random.default_rng(seed)
    train, test = cube[cube[:, 0] > 0], cube[cube[:, 0] < 0]
    train, test = train[rng.permutation(len(train))], test[rng.permutation(len(test))]
    return (
        train,
        gotu_fn(train)[:, None].astype("float32"),
        test,
        gotu_fn(test)[:, None].astype("float32"),
    )


def load(task, seed=0, n_train=4096, n_test=1024):
    """Data for a task name in `TASKS`; n_train/n_test apply to the 1-D tasks."""
    if task == "sawtooth5":
        return sawtooth(5, n_train, n_test, seed)
    if task == "sawtooth10":
        return sawtooth(10, n_train, n_test, seed)
    if task == "steep5":
        return steep(2.0**-5, n_train, n_test, seed)
    if task == "steep10":
        return steep(2.0**-10, n_train, n_test, seed)
    if task == "gotu":
        return gotu(10, seed)
    raise ValueError(f"Unknown task. Expected one of {TASKS}. Received: task={task!r}")


def is_boolean(task):
    return task == "gotu"
