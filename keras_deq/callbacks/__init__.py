"""Callbacks that steer DEQ layers during `fit`, and one that reports their solvers."""

from keras_deq.callbacks.explicit_pretraining import ExplicitPretraining
from keras_deq.callbacks.jacobian_regularization_scheduler import (
    JacobianRegularizationScheduler,
    stepwise_schedule,
)
from keras_deq.callbacks.solver_logger import SolverLogger

__all__ = [
    "ExplicitPretraining",
    "JacobianRegularizationScheduler",
    "SolverLogger",
    "stepwise_schedule",
]
