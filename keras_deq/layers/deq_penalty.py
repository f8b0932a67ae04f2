"""The Jacobian penalty's controls on a `DEQ` layer: its weight and frequency as
variables (a scheduler changes them during training), the per-step plan, the loss."""

import warnings

import keras

from keras_deq import backward as backward_lib
from keras_deq.jacobian_penalty import JacobianPenalty
from keras_deq.layers import deq_arguments as arguments
from keras_deq.solvers import common


class PenaltyControls:
    """Mixin of `DEQ`: the `jacobian_*` attributes, backed by the layer's
    `JacobianPenalty` (`self._penalty`) and two non-trainable variables."""

    def _build_penalty_variables(self):
        self._jacobian_weight = self.add_weight(
            name="jacobian_weight",
            shape=(),
            initializer=keras.initializers.Constant(self._jacobian_weight_init),
            trainable=False,
            dtype="float32",
            autocast=False,
        )
        self._jacobian_frequency = self.add_weight(
            name="jacobian_frequency",
            shape=(),
            initializer=keras.initializers.Constant(self._jacobian_frequency_init),
            trainable=False,
            dtype="float32",
            autocast=False,
        )

    @property
    def jacobian_weight(self):
        """The regularizer's weight (a float32 variable once built)."""
        return self._jacobian_weight if self.built else self._jacobian_weight_init

    @jacobian_weight.setter
    def jacobian_weight(self, value):
        value = common.check_nonnegative_float("jacobian_weight", value)
        if value > 0 and not self._jacobian_enabled:
            self._jacobian_enabled = True
            if self.built:
                warnings.warn(
                    f"DEQ layer '{self.name}' was created with jacobian_weight=0, so a "
                    "training function traced before now has no Jacobian regularizer. It "
                    "is included once the function is traced again: call "
                    "`model.make_train_function(force=True)` or `model.compile(...)`. "
                    "`keras_deq.callbacks.JacobianRegularizationScheduler` does this for you.",
                    stacklevel=2,
                )
        if self.built:
            self._jacobian_weight.assign(value)
        self._jacobian_weight_init = value

    @property
    def jacobian_frequency(self):
        """Probability that a training step applies the regularizer."""
        return self._jacobian_frequency if self.built else self._jacobian_frequency_init

    @jacobian_frequency.setter
    def jacobian_frequency(self, value):
        value = common.check_fraction("jacobian_frequency", value)
        if self.built:
            self._jacobian_frequency.assign(value)
        self._jacobian_frequency_init = value

    @property
    def jacobian_probes(self):
        """Number of Hutchinson probes of the Jacobian penalty."""
        return self._penalty.probes

    @property
    def jacobian_max_iter_delta(self):
        """The penalty's random forward budget `d` (see `JacobianPenalty`)."""
        return self._penalty.max_iter_delta

    def _plan_penalty(self, max_iter):
        """`(picked, max_iter)` of a training step whose budget is `max_iter`. The
        per-step draw comes first: on the steps it picks, the budget may be jittered."""
        return self._penalty.plan(
            self._jacobian_weight, self._jacobian_frequency, max_iter, self.seed_generator
        )

    def _add_jacobian_loss(self, f, result, x, picked):
        """The penalty: probes drawn every training step (on JAX a draw cannot sit
        inside a `cond`), the estimate computed on the steps that apply it."""
        ops = keras.ops
        z_star = keras.tree.map_structure(ops.stop_gradient, result.state)
        # Skipped on a step where some sample has no finite iterate (its Jacobian is NaN).
        apply = ops.logical_and(picked, ops.all(backward_lib.solved_rows(result, x)))
        probes = self._penalty.draw_probes(z_star, self.seed_generator)
        est = ops.cond(
            apply,
            lambda: self._penalty.estimate_with(f, z_star, probes),
            lambda: ops.zeros((), "float32"),
        )
        self._record_jacobian(est, apply)
        self.add_loss(self._jacobian_weight * est)

    def _penalty_config(self):
        """The penalty's arguments with the current weight and frequency (a scheduler
        may have changed them): as `regularizer` if given so, else the flat ones."""
        penalty = JacobianPenalty(
            self._jacobian_weight_init,
            self._jacobian_frequency_init,
            self._penalty.probes,
            self._penalty.max_iter_delta,
        )
        flat = {f"jacobian_{k}": v for k, v in arguments.FLAT_PENALTY_DEFAULTS.items()}
        if self.regularizer is not None:
            return {**flat, "regularizer": keras.saving.serialize_keras_object(penalty)}
        flat = {f"jacobian_{k}": v for k, v in penalty.get_config().items()}
        return {**flat, "regularizer": None}
