"""`Unrolled`: autodiff through the whole forward solve (the reference)."""

import contextlib

import keras

from keras_deq import backend
from keras_deq.backward.base import Backward
from keras_deq.solvers import common
from keras_deq.solvers.base import Checkpointing, differentiable_loops


@keras.saving.register_keras_serializable(package="keras_deq")
class Unrolled(Backward):
    """Autodiff through every iteration of the forward solver.

    The reference gradient of what the solver computed (not of the exact fixed
    point); memory grows with the number of solver steps.

    On JAX, which cannot reverse-differentiate a while loop, the solver loop runs
    as a `fori_loop` of `max_iter` iterations whose iterations after the solver's
    stop are skipped (see `keras_deq.solvers.base.differentiable_loops`): the
    gradient is the same, but memory grows with `max_iter`, not with the steps run.

    With `remat=True` every cell evaluation is rematerialized (`keras.remat`:
    `tf.recompute_grad`, `jax.checkpoint`, `torch.utils.checkpoint`): the backward
    pass keeps only each iteration's input state and recomputes the cell's
    intermediate tensors from it, one evaluation at a time. The gradient is the
    same; memory still grows with the steps, by the state (and the solver's own
    history) per step instead of everything the cell computes, at the cost of one
    more cell evaluation per step: a gain for cells that compute much per step
    (attention), none for a cell that computes little besides its state (a dense
    cell; use `checkpoint_every` there).

    With `checkpoint_every=k` the solver loop runs as segments of `k` iterations
    (the solver's whole update: its own state, e.g. Anderson's history, included),
    each rematerialized (gradient checkpointing, Chen et al. 2016): the backward
    pass keeps the loop's state only at the segment boundaries, one per `k`
    iterations, and recomputes one segment at a time from the state it started
    with, keeping that segment's `k` iterations while it goes back through them.
    The gradient is the same; for `n` iterations memory grows like
    `n / k + k` iterations' worth instead of `n`, least with `k` near `sqrt(n)`
    (`checkpoint_every=8` for `max_iter=64`), at the cost of one more forward pass
    through the solver. A stop inside a segment is respected (the iterations after
    it are skipped), and `max_iter` need not be a multiple of `k`. With both, each
    recomputed segment also rematerializes its cell evaluations.

    Args:
        remat: If True, recompute each cell evaluation in the backward pass instead
            of keeping its intermediate tensors.
        checkpoint_every: None (no segments), or a positive integer: the solver
            iterations per rematerialized segment.

    Examples:
        >>> Unrolled(remat=True)
        Unrolled(remat=True, checkpoint_every=None)
        >>> Unrolled(checkpoint_every=8)
        Unrolled(remat=False, checkpoint_every=8)
    """

    name = "unrolled"
    differentiates_forward = True

    def __init__(self, remat=False, checkpoint_every=None):
        self.remat = common.check_bool("remat", remat)
        self.checkpoint_every = common.check_optional_positive_int(
            "checkpoint_every", checkpoint_every
        )

    def _evaluate(self, problem):
        """`(z, x, values) -> fn(z, x)`, rematerialized on flat tensors when `remat`
        is set; `values` are those of the weights the rematerialized function takes
        as inputs (on TensorFlow, `problem.variables`; else none)."""
        fn = problem.fn
        if not self.remat:
            return lambda z, x, values: fn(z, x)
        # The weights' values are inputs of the rematerialized function, not captures:
        # TensorFlow cannot differentiate a `tf.recompute_grad` that reads a variable
        # inside a while loop.
        variables = _remat_inputs(problem)
        z_like, x_like = problem.z0, problem.x
        n, m = len(keras.tree.flatten(z_like)), len(keras.tree.flatten(x_like))

        def flat_fn(*tensors):
            z = keras.tree.pack_sequence_as(z_like, tensors[:n])
            x_in = keras.tree.pack_sequence_as(x_like, tensors[n : n + m])
            with _mapped(variables, tensors[n + m :]):
                return tuple(keras.tree.flatten(fn(z, x_in)))

        step = keras.remat(flat_fn)

        def evaluate(z, x, values):
            flat = step(*keras.tree.flatten(z), *keras.tree.flatten(x), *values)
            return keras.tree.pack_sequence_as(z_like, flat)

        return evaluate

    def _cell(self, problem):
        """The cell `z -> next z` the solver iterates, and the `Checkpointing` of its
        loop (None without `checkpoint_every`)."""
        evaluate = self._evaluate(problem)
        variables = _remat_inputs(problem)
        # Read once, outside the solver loop: TensorFlow's `v.value` is the variable, whose
        # reads inside the loop the loop's gradient would keep, one per iteration.
        values = tuple(keras.ops.copy(v.value) for v in variables)
        inputs = {"x": problem.x, "values": values}
        cell = lambda z: evaluate(z, inputs["x"], inputs["values"])  # noqa: E731
        if self.checkpoint_every is None:
            return cell, None
        if not variables:
            # `jax.checkpoint` and `torch.utils.checkpoint` differentiate what the
            # segment captures (the injection, the weights).
            return cell, Checkpointing(self.checkpoint_every)
        # `tf.recompute_grad` passes no gradient to what its function captures: the
        # injection and the weights' values are inputs of each segment, which the cell
        # reads in their place (the weights also through a `StatelessScope`, for the
        # evaluations that read them from the variables).
        x_like = problem.x
        m = len(keras.tree.flatten(x_like))

        @contextlib.contextmanager
        def bind(tensors):
            previous = dict(inputs)
            inputs["x"] = keras.tree.pack_sequence_as(x_like, tensors[:m])
            inputs["values"] = tuple(tensors[m:])
            try:
                with _mapped(variables, inputs["values"]):
                    yield
            finally:
                inputs.update(previous)

        flat = (*keras.tree.flatten(x_like), *inputs["values"])
        return cell, Checkpointing(self.checkpoint_every, flat, bind)

    def __call__(self, problem):
        cell, checkpoint = self._cell(problem)
        if backend.name() == "tensorflow" and checkpoint is None:
            result = problem.forward(cell, problem.z0)
            return result.state, result
        with differentiable_loops(problem.max_steps, checkpoint):
            result = problem.forward(cell, problem.z0)
        return result.state, result


def _remat_inputs(problem):
    """The variables whose values a rematerialized function must take as inputs: on
    TensorFlow the cell's weights (`tf.recompute_grad` neither differentiates what
    it captures nor a variable read inside a while loop); none elsewhere."""
    return problem.variables if backend.name() == "tensorflow" else ()


def _mapped(variables, values):
    """A scope in which `variables` read `values`; none when there are no variables
    (an empty scope would hide the enclosing one: JAX's training step)."""
    if not variables:
        return contextlib.nullcontext()
    return keras.StatelessScope(state_mapping=zip(variables, values, strict=True))
