"""`Implicit`: the exact gradient of the fixed point, by the implicit function theorem."""

import keras
from keras import ops

from keras_deq import backend, solvers
from keras_deq.backward import rows
from keras_deq.backward.base import Backward


@keras.saving.register_keras_serializable(package="keras_deq")
class Implicit(Backward):
    """The implicit function theorem: the gradient of the exact fixed point.

    With `g = dL/dz*`, solves the adjoint fixed point `u = J^T u + g` (`J = df/dz` at
    `z*`) with a solver, one vector-Jacobian product per step, then pulls `u` back
    through one application of the cell. Training memory does not grow with the
    number of solver steps.

    Args:
        solver: The solver of the adjoint fixed point: None (in `DEQ`, the forward
            solver with `backward_max_iter` and `backward_tol`), a name, a config dict
            or a `keras_deq.solvers.Solver`.

    Examples:
        >>> Implicit(solver="fixed_point")
        Implicit(solver=FixedPoint(max_iter=50, tol=0.0001, stop_mode='rel', damping=1.0, ...))
    """

    name = "implicit"

    def __init__(self, solver=None):
        self.solver = None if solver is None else _get_solver(solver)

    def get_config(self):
        return {"solver": None if self.solver is None else solvers.serialize(self.solver)}

    def __call__(self, problem):
        adjoint = problem.adjoint
        if adjoint is None:
            if self.solver is None:
                raise ValueError(
                    "`Implicit` needs an adjoint solver: pass `Implicit(solver=...)` or an "
                    "`Equilibrium` with `adjoint=`. Received: solver=None, adjoint=None"
                )
            adjoint = self.solver
        if backend.name() == "tensorflow":
            return backend.implicit_gradient_tensorflow(problem, adjoint)
        return implicit_stateless(problem, adjoint)


def _get_solver(solver):
    try:
        return solvers.get(solver)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{error} Received: solver={solver!r}") from error


def implicit_stateless(problem, adjoint_solver):
    """The implicit gradient written with `keras.ops` and the backend's `vjp`.

    The forward solve runs outside the custom gradient on constant inputs; the custom
    gradient is an identity on `z*` that takes everything its backward pass needs
    as explicit inputs (`z*`, `x`, the weights, the mask of solved samples), because
    on JAX a custom gradient may not close over traced values. Its backward pass
    solves `u = J^T u + g` with `adjoint_solver` and pulls `u` back through one
    vector-Jacobian product of `problem.stateless_fn`. `problem.on_backward`
    receives the adjoint `SolverResult` inside the backward pass: on JAX it may
    only send values to the host (`keras_deq.backend.host_call`), not keep tensors.
    """
    f, x, weights = problem.stateless_fn, problem.x, tuple(problem.weights)
    const = keras.tree.map_structure(ops.stop_gradient, (x, weights))
    result = problem.forward(lambda z: f(z, const[0], const[1]), problem.z0)
    z_star = keras.tree.map_structure(ops.stop_gradient, result.state)
    solved = ops.cast(rows.solved_rows(result, x), "float32")
    z_flat, x_flat, w_flat = (keras.tree.flatten(t) for t in (z_star, x, weights))
    n_z, n_x = len(z_flat), len(x_flat)

    def pack(structure, flat):
        return keras.tree.pack_sequence_as(structure, list(flat))

    @backend.custom_gradient
    def attach(*inputs):
        zs, xs, ws = inputs[:n_z], inputs[n_z : n_z + n_x], inputs[n_z + n_x : -1]
        ok = inputs[-1] > 0.5

        def grad(*args, upstream=None):
            upstream = backend.upstream_list(args, upstream)
            g = rows.mask_rows(rows.zeros_for_none(upstream, zs), ok)
            z_in = rows.mask_rows(list(zs), ok)
            x_in = rows.mask_rows(list(xs), ok)

            def cell(z, x_, w):
                return keras.tree.flatten(f(pack(z_star, z), pack(x, x_), pack(weights, w)))

            _, pullback = backend.vjp(cell, z_in, x_in, list(ws))

            def adjoint_map(u):
                vz = pullback(keras.tree.flatten(u))[0]
                return pack(z_star, [a + b for a, b in zip(vz, g, strict=True)])

            adjoint = adjoint_solver(adjoint_map, pack(z_star, g))
            if problem.on_backward is not None:
                problem.on_backward(adjoint)
            _, gx, gw = pullback(keras.tree.flatten(adjoint.state))
            zeros = [ops.zeros_like(t) for t in zs]
            return (*zeros, *gx, *gw, ops.zeros_like(inputs[-1]))

        return list(zs), grad

    out = attach(*z_flat, *x_flat, *w_flat, solved)
    return pack(z_star, out), result
