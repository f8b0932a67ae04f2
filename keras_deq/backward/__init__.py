"""Gradients of an equilibrium: backward modes as objects.

Every mode computes the forward fixed point `z* = f(z*, x)` with a solver and
differs only in how the gradient reaches `x` and the cell's variables:

- `Implicit(solver)` (`"implicit"`): the implicit function theorem. With
  `g = dL/dz*`, solve the adjoint fixed point `u = J^T u + g` (`J = df/dz` at
  `z*`) with a solver, one vector-Jacobian product per step, then pull `u` back
  through one application of `f`. Memory does not grow with the solver steps.
- `Phantom(steps, damping)` (`"phantom"`): `steps` damped steps
  `z <- (1 - tau) z + tau f(z, x)` from `z*`, differentiated by autodiff.
- `OneStep()` (`"one_step"`): one step `f(z*, x)` differentiated by autodiff,
  i.e. the Jacobian-free approximation `(I - J)^{-1} ~ I`.
- `Unrolled()` (`"unrolled"`): autodiff through the whole forward solve (the
  reference; memory grows with the number of steps).
- `Explicit(depth)`: no solver, the cell applied `depth` times (pre-training).

A new mode is one class: subclass `Backward` (or `JacobianFree`, implementing
only `refine`), see docs/development.md.
"""

# isort: off
# Built-in modes, in the order of `names()` (a mode registers its name on import).
from keras_deq.backward.base import Backward, Equilibrium, JacobianFree
from keras_deq.backward.implicit import Implicit
from keras_deq.backward.phantom import Phantom
from keras_deq.backward.one_step import OneStep
from keras_deq.backward.unrolled import Unrolled

# isort: on
from keras_deq.backward.base import deserialize, get, names, serialize
from keras_deq.backward.explicit import Explicit
from keras_deq.backward.rows import finite_upstream, mask_rows, select_rows, solved_rows

MODES = names()
"""The names of the built-in modes: `("implicit", "phantom", "one_step", "unrolled")`."""

__all__ = [
    "MODES",
    "Backward",
    "Equilibrium",
    "Explicit",
    "Implicit",
    "JacobianFree",
    "OneStep",
    "Phantom",
    "Unrolled",
    "deserialize",
    "finite_upstream",
    "get",
    "mask_rows",
    "names",
    "select_rows",
    "serialize",
    "solved_rows",
]
