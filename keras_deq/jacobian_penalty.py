"""`JacobianPenalty`: the Jacobian regularizer of a DEQ layer, as an object."""

import keras
from keras import ops

from keras_deq import backend, configurable, jacobian
from keras_deq.solvers import common


@keras.saving.register_keras_serializable(package="keras_deq")
class JacobianPenalty(configurable.Configurable):
    """`weight * ||df/dz at z*||_F^2 / d`, added to the training loss of a `DEQ` layer.

    The Frobenius norm of the cell's Jacobian at the equilibrium is estimated with
    Hutchinson's method (`keras_deq.jacobian.hutchinson_frobenius`: one
    vector-Jacobian product per probe, differentiated once more), divided by the
    state size `d`, averaged over the batch and added with `add_loss` on training
    steps. It keeps the cell contractive, so the solver's iteration counts stay
    low (Bai et al., 2021). The layer owns `weight` and `frequency` as variables,
    which `keras_deq.callbacks.JacobianRegularizationScheduler` changes during
    training (`layer.jacobian_weight`, `layer.jacobian_frequency`).

    Args:
        weight: The penalty's weight, >= 0. With 0 the estimate is left out of the
            training graph until a positive weight is set (it needs second-order
            gradients of the cell).
        frequency: Probability in (0, 1] that a training step computes and adds it.
        probes: Number of Gaussian probe vectors per estimate.
        max_iter_delta: On the steps that apply the penalty, the forward budget is
            `max_iter + delta` with `delta` drawn uniformly from `[-d, d - 1]` (at
            least 1 iteration), as in the DEQ recipes (`RAND_F_THRES_DELTA`, 2
            there); 0 keeps `max_iter`. Drawn at run time: no retracing.

    Examples:
        >>> JacobianPenalty(weight=2.0, frequency=0.5)
        JacobianPenalty(weight=2.0, frequency=0.5, probes=1, max_iter_delta=0)
    """

    family = "regularizer"

    def __init__(self, weight=1.0, frequency=1.0, probes=1, max_iter_delta=0):
        self.weight = common.check_nonnegative_float("weight", weight)
        self.frequency = common.check_fraction("frequency", frequency)
        self.probes = common.check_positive_int("probes", probes)
        self.max_iter_delta = common.check_nonnegative_int("max_iter_delta", max_iter_delta)

    @staticmethod
    def picked(draw, weight, frequency):
        """Whether a training step whose uniform draw is `draw` applies the penalty."""
        return keras.ops.logical_and(draw < frequency, weight > 0)

    def budget(self, max_iter, picked, seed):
        """The forward `max_iter` of a step: jittered by `max_iter_delta` when `picked`.

        Returns `max_iter` itself (an int) when `max_iter_delta` is 0, else a scalar
        int32 tensor (so that a compiled step is not retraced).
        """
        d = self.max_iter_delta
        if d == 0:
            return max_iter
        delta = keras.random.randint((), -d, d, seed=seed, dtype="int32")
        jittered = keras.ops.maximum(max_iter + delta, 1)
        return keras.ops.where(picked, jittered, keras.ops.convert_to_tensor(max_iter, "int32"))

    def max_steps(self, max_iter):
        """A Python int bounding every budget `budget(max_iter, ...)` may return (the
        static bound of a solver loop unrolled with `fori_loop`, see `Equilibrium`)."""
        return max_iter + self.max_iter_delta

    def plan(self, weight, frequency, max_iter, seed):
        """`(picked, max_iter)` of a training step: whether it applies the penalty
        (`picked` of a uniform draw) and its forward budget (`budget`).

        Args:
            weight: The layer's current weight (a variable).
            frequency: The layer's current frequency (a variable).
            max_iter: The step's forward budget: an int, or a scalar int32 tensor
                (drawn by a `keras_deq.solvers.Budget`).
            seed: A `keras.random.SeedGenerator`: the draw comes first, then the
                budget's jitter (the order of the TensorFlow path of `DEQ`).
        """
        draw = keras.random.uniform((), dtype="float32", seed=seed)
        picked = self.picked(draw, weight, frequency)
        return picked, self.budget(max_iter, picked, seed)

    def estimate(self, f, z_star, seed):
        """The unweighted estimate of `||df/dz||_F^2 / d` at `z_star`, as float32.

        Args:
            f: The cell as a function of the state alone, `z -> f(z)`.
            z_star: The equilibrium (a constant).
            seed: A `keras.random.SeedGenerator` for the probes.
        """
        if backend.name() != "tensorflow":
            return self.estimate_with(f, z_star, self.draw_probes(z_star, seed))
        est = jacobian.hutchinson_frobenius(f, z_star, num_probes=self.probes, seed=seed)
        return keras.ops.cast(est, "float32")

    def draw_probes(self, z_star, seed):
        """`probes` Gaussian probe vectors: a list of nests shaped like `z_star`.

        Drawn apart from `estimate_with` so that a compiled step may draw them
        unconditionally and estimate only on the steps that apply the penalty (on
        JAX a random draw, which advances `seed`, cannot sit inside a `cond`).
        """
        return [
            keras.tree.map_structure(
                lambda t: keras.random.normal(ops.shape(t), dtype=t.dtype, seed=seed), z_star
            )
            for _ in range(self.probes)
        ]

    @staticmethod
    def estimate_with(f, z_star, probes):
        """Hutchinson's `||df/dz||_F^2 / d` at `z_star` with the given `probes`, as
        float32, from `keras_deq.backend.vjp` (one linearization, one vector-Jacobian
        product per probe): the batch mean of `||J_b||_F^2 / d`, differentiable with
        respect to what `f` reads (a second-order gradient).

        Uses `E_v ||v^T J||^2 = ||J||_F^2` for Gaussian `v`.

        Args:
            f: The cell as a function of the state alone, `z -> f(z)`.
            z_star: The state (a constant): a tensor or a nest with a leading batch dim.
            probes: A list of nests shaped like `z_star` (`draw_probes`).
        """
        _, pullback = backend.vjp(f, z_star)
        total = 0.0
        for v in probes:
            (vjp,) = pullback(v)
            for g in keras.tree.flatten(vjp):
                total = total + ops.sum(ops.square(ops.cast(g, "float32")))
        flat = keras.tree.flatten(z_star)
        count = sum(ops.cast(ops.size(t), "float32") for t in flat)
        return total / (len(probes) * count)


def get(identifier):
    """A `JacobianPenalty` from an instance, a config dict, or None (returned as None)."""
    if identifier is None or isinstance(identifier, JacobianPenalty):
        return identifier
    try:
        penalty = keras.saving.deserialize_keras_object(
            dict(identifier), module_objects={"JacobianPenalty": JacobianPenalty}
        )
    except (TypeError, ValueError, AttributeError) as error:
        penalty = error
    if not isinstance(penalty, JacobianPenalty):
        raise ValueError(
            "`regularizer` must be a `keras_deq.JacobianPenalty`, its config dict or None. "
            f"Received: regularizer={identifier!r}"
        )
    return penalty
