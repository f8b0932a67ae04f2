"""Solver statistics as metrics, and what a `DEQ` layer does when a solve fails.

`SolverMonitor` is the part of `DEQ` that reports: it owns the layer's metrics
(`{name}_fwd_steps`, ...) and implements `on_failure` ("warn", "raise", "ignore").
"""

import warnings

import keras

from keras_deq import backend

ON_FAILURE = ("warn", "raise", "ignore")
METRICS = ("fwd_steps", "fwd_residual", "converged", "bwd_steps", "bwd_residual", "jac_loss")


def check_on_failure(on_failure):
    if on_failure not in ON_FAILURE:
        raise ValueError(
            f"`on_failure` must be one of {ON_FAILURE}. Received: on_failure={on_failure!r}"
        )
    return on_failure


def _finite_values(values):
    """`(values, weights)` for a Mean metric that skips non-finite samples.

    Samples whose solve never produced a finite iterate (residual inf or NaN) are
    counted by the `converged` metric and the failure warning instead.
    """
    ops = keras.ops
    values = ops.cast(values, "float32")
    finite = ops.isfinite(values)
    return ops.where(finite, values, ops.zeros_like(values)), ops.cast(finite, "float32")


class _FiniteMean(keras.metrics.Mean):
    """A mean over the finite samples that is NaN, not 0, when there were none.

    A step (or epoch) in which every sample's residual was NaN or Inf would
    otherwise report a residual of 0.0, which reads as perfect convergence.
    """

    def result(self):
        count = keras.ops.cast(self.count, "float32")
        mean = self.total / keras.ops.maximum(count, 1.0)
        return keras.ops.where(count > 0, mean, float("nan"))


class _Untracked:
    """Holds a variable out of the layer's tracking (not a weight, not saved)."""

    def __init__(self, variable):
        self.variable = variable


class SolverMonitor:
    """Mixin of `DEQ`: the solver metrics and the failure reports.

    The metrics are attributes of the layer itself (so that Keras tracks them and
    shows them in `fit`'s logs). The layer sets `on_failure`, `tol`,
    `backward_tol` and `stop_mode` before calling `_make_metrics`.
    """

    def _make_metrics(self):
        """The layer's metrics, on TensorFlow and PyTorch; on JAX the statistics are
        variables (made by `_build_statistics`), see `_make_stat_variables`."""
        self._warning_gate = None
        if not backend.layer_metrics():
            self._metrics_by_name = {}
            return
        self._metrics_by_name = {
            key: (_FiniteMean if key == "fwd_residual" else keras.metrics.Mean)(
                name=f"{self.name}_{key}", dtype="float32"
            )
            for key in METRICS
        }
        for key, metric in self._metrics_by_name.items():
            setattr(self, f"_{key}_metric", metric)
        if backend.name() != "tensorflow":  # eager PyTorch reports failures directly
            return
        # 1 until the failure warning is shown: a traced step then stops calling the
        # host (about 0.2 ms per call), which it would otherwise do at every failing
        # step. Local to each replica like the metrics' variables; not a weight.
        self._warning_gate = _Untracked(
            keras.Variable(
                1,
                dtype="int32",
                trainable=False,
                synchronization="on_read",
                aggregation="sum",
                name=f"{self.name}_warning_gate",
            )
        )

    def _residual(self, result):
        return result.rel_residual if self.stop_mode == "rel" else result.abs_residual

    def _record_forward(self, result, report=True):
        """Records the forward statistics (metrics on TensorFlow and PyTorch, variables on JAX)
        and reports a failure; returns the checks the output must wait for."""
        if not self._metrics_by_name:
            self._record_in_variables(result, report)
            return []
        m = self._metrics_by_name
        with backend.float32_metrics():
            m["fwd_steps"].update_state(keras.ops.cast(result.steps, "float32"))
            m["fwd_residual"].update_state(*_finite_values(self._residual(result)))
            m["converged"].update_state(keras.ops.cast(result.converged, "float32"))
        return self._report_failure(result, "forward") if report else []

    def _record_backward(self, result):
        """The adjoint solve's statistics and failure report, from inside the gradient."""
        if not self._metrics_by_name:
            return self._report_failure(result, "backward")
        m = self._metrics_by_name
        with backend.float32_metrics():
            m["bwd_steps"].update_state(keras.ops.cast(result.steps, "float32"))
            m["bwd_residual"].update_state(*_finite_values(self._residual(result)))
        checks = self._report_failure(result, "backward")
        if checks:
            backend.gate_later_ops(checks)
        return checks

    def _record_jacobian(self, estimate, applied):
        """The Jacobian estimate of a step (counted only if `applied`)."""
        if not self._metrics_by_name:
            variable = self._stats["jac_loss"]
            variable.assign(keras.ops.where(applied, estimate, variable.value))
            return
        with backend.float32_metrics():
            self._metrics_by_name["jac_loss"].update_state(
                estimate, sample_weight=keras.ops.cast(applied, "float32")
            )

    def _failure_message(self, which, n_failed, n_nonfinite, worst):
        tol = self.tol if which == "forward" else self.backward_tol
        kind = "relative" if self.stop_mode == "rel" else "absolute"
        if n_nonfinite:
            cause = (
                f"the cell produced NaN or Inf for {n_nonfinite} of them (their best finite "
                "iterate, or the initial state if none, is returned; check the input and the "
                "cell)"
            )
        else:
            cause = f"worst {kind} residual {worst:.3g}"
        advice = (
            "If the residual was still falling, increase max_iter or change the solver; if it "
            "grows (an expansive cell: the iterate with the lowest residual is returned), more "
            "iterations do not help: regularize the cell (jacobian_weight) or bound its weights."
        )
        if which == "forward" and getattr(self._forward, "fixed_steps", False):
            advice = (
                f"The solver runs exactly max_iter={self.max_iter} steps (fixed_steps, e.g. "
                "OptEqBlock's unroll_steps) and returns the last: more steps bring it closer "
                "to a fixed point; if these steps are the model, pass on_failure='ignore'."
            )
        return (
            f"DEQ layer '{self.name}': the {which} solver did not reach tol={tol} for "
            f"{n_failed} sample(s); {cause}. {advice} This warning is shown once per "
            f"layer; the metric '{self.name}_converged' tracks convergence."
        )

    def _on_host_failure(self, which, n_failed, n_nonfinite, worst):
        # Called eagerly, from tf.py_function (eager tensors) or from a JAX host
        # callback (numpy values): `int` and `float` read all of them. A traced step
        # keeps calling after the one warning: return before building the message.
        if self._warned and self.on_failure != "raise":
            return 0
        message = self._failure_message(which, int(n_failed), int(n_nonfinite), float(worst))
        if self.on_failure == "raise":
            raise FloatingPointError(message)
        if not self._warned:
            self._warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return 0

    def _failure_counts(self, result):
        """`(n_failed, n_nonfinite, worst finite residual of a failed sample)`."""
        ops = keras.ops
        failed = ops.logical_not(result.converged)
        nonfinite = failed if result.nonfinite is None else failed & result.nonfinite
        residual = self._residual(result)
        finite = ops.isfinite(residual)
        worst = ops.max(ops.where(failed & finite, residual, ops.zeros_like(residual)))
        return (
            ops.sum(ops.cast(failed, "int32")),
            ops.sum(ops.cast(nonfinite | (failed & ops.logical_not(finite)), "int32")),
            worst,
        )

    def _report_failure(self, result, which):
        """Warns or raises when samples did not converge (on every backend: on JAX,
        whose `call` is traced, through a host call; `"raise"` is refused there).

        Returns:
            A list of ops that the layer's output (or the gradient) must depend on:
            with `on_failure="raise"` in a graph, the assertion that stops the step
            before any update.
        """
        if self.on_failure == "ignore" or backend.in_xla_context():
            return []
        n_failed, n_nonfinite, worst = self._failure_counts(result)
        if backend.executing_eagerly():
            if int(n_failed) > 0:
                self._on_host_failure(which, n_failed, n_nonfinite, worst)
            return []
        if self.on_failure == "raise":
            tol = self.tol if which == "forward" else self.backward_tol
            return [
                backend.graph_assert(
                    n_failed == 0,
                    [
                        f"DEQ layer {self.name} (on_failure=raise): the {which} solver did "
                        f"not reach tol={tol} for",
                        n_failed,
                        "sample(s); with NaN or Inf:",
                        n_nonfinite,
                        "; worst finite residual:",
                        worst,
                    ],
                    name="deq_on_failure_raise",
                )
            ]
        # No Python warning while a SavedModel is written: an exported model cannot
        # run the host call.
        if self._warned or backend.in_save_context():
            return []
        warn = n_failed > 0
        if self._warning_gate is not None:
            gate = self._warning_gate.variable
            warn = keras.ops.logical_and(warn, gate.value > 0)
            gate.assign(keras.ops.where(warn, 0, gate.value))
        backend.host_call_if(
            warn,
            lambda a, b, c: self._on_host_failure(which, a, b, c),
            n_failed,
            n_nonfinite,
            worst,
        )
        return []

    # ------------------------------------------- statistics in variables (not TF)
    def _build_statistics(self):
        if not self._metrics_by_name:
            self._make_stat_variables()

    def _make_stat_variables(self):
        """Non-trainable variables holding the last batch's forward statistics.

        On JAX a metric owned by a layer cannot be updated in `call` under `fit`
        (keras-team/keras#21639), so the statistics are variables there: read them
        with `layer.solver_statistics()`.
        """
        self._stats = {
            key: self.add_weight(
                name=f"last_{key}",
                shape=(),
                initializer="zeros",
                trainable=False,
                dtype="float32",
                autocast=False,
            )
            for key in ("fwd_steps", "fwd_residual", "converged", "jac_loss")
        }

    def solver_statistics(self):
        """The last forward solve's statistics as floats (the JAX backend), or the
        metrics' current values (TensorFlow): `fwd_steps`, `fwd_residual`, `converged`;
        on JAX also `jac_loss`, the last Jacobian estimate applied (0 before any)."""
        if getattr(self, "_stats", None):
            if any(backend.detached(v) for v in self._stats.values()):
                raise RuntimeError(
                    f"The statistics of layer {self.name!r} cannot be read during an epoch "
                    "of `fit` on JAX: Keras' JAX trainer holds the variables' values outside "
                    "the model until the epoch ends. In a callback's `on_train_batch_end`, "
                    "call `self.model.jax_state_sync()` first (it costs one transfer per "
                    "call), or read them in `on_epoch_end`."
                )
            return {
                key: float(keras.ops.convert_to_numpy(v.value)) for key, v in self._stats.items()
            }
        keys = ("fwd_steps", "fwd_residual", "converged")
        return {key: float(self._metrics_by_name[key].result()) for key in keys}

    def _record_in_variables(self, result, report=True):
        ops = keras.ops
        values, finite = _finite_values(self._residual(result))
        count = ops.sum(finite)
        mean = ops.where(count > 0, ops.sum(values) / ops.maximum(count, 1.0), float("nan"))
        self._stats["fwd_steps"].assign(ops.cast(result.steps, "float32"))
        self._stats["fwd_residual"].assign(mean)
        self._stats["converged"].assign(ops.mean(ops.cast(result.converged, "float32")))
        if report:
            self._report_failure(result, "forward")
