"""The paper's optimiser: block-coordinate descent with one Gauss-Newton step for the propagation
parameters and Newton steps for the (convex) classifier, both with CG and Armijo line search."""

from mscnn.optim.bcd import BCD
from mscnn.optim.cg import conjugate_gradient
from mscnn.optim.newton import armijo, newton_step

__all__ = ["BCD", "armijo", "conjugate_gradient", "newton_step"]
