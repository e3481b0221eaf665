"""The least-squares reconstruction problem and what is derived from it: loss, priors, Hessian pieces, stencil and Toeplitz normal equations, the exact optimum, conditioning, linear algebra."""

from ._conditioning import (
    predicted_condition_number as predicted_condition_number, condition_report as condition_report,
)
from ._hessian import (
    weight_image as weight_image, weight_backprojection as weight_backprojection,
    batch_diagonal_sum as batch_diagonal_sum, exact_diagonal as exact_diagonal,
    hessian_stencil as hessian_stencil, HessianOperator as HessianOperator,
    hessian_operator as hessian_operator, NormalEquations as NormalEquations,
    normal_equations as normal_equations, solve_cg as solve_cg, minibatch_diagonal as minibatch_diagonal,
)
from ._linalg import (
    LANCZOS_ITERS as LANCZOS_ITERS, LANCZOS_RTOL as LANCZOS_RTOL, default_threshold as default_threshold,
    power_iteration as power_iteration, largest_eigenvalue as largest_eigenvalue,
    preconditioned_max_eigenvalue as preconditioned_max_eigenvalue, scaled_operator as scaled_operator,
    lanczos_extreme_eigs as lanczos_extreme_eigs, condition_number as condition_number, CGResult as CGResult,
    conjugate_gradient as conjugate_gradient, relative_error_in_ball as relative_error_in_ball,
)
from ._loss import (
    loss as loss, objective as objective, batch_filters as batch_filters, gradient as gradient,
    value_and_grad as value_and_grad, hvp as hvp,
)
from ._optimum import (
    Optimum as Optimum,
)
from ._priors import (
    FSC_FLOOR as FSC_FLOOR, FSC_CEIL as FSC_CEIL, Prior as Prior, Tikhonov as Tikhonov,
    SpectralPrior as SpectralPrior, as_prior as as_prior, prior_diagonal as prior_diagonal,
    shell_means as shell_means, fourier_fsc as fourier_fsc,
)
from ._stencil import (
    OFFSETS as OFFSETS, TERMS_PER_POINT as TERMS_PER_POINT, assemble as assemble, matvec as matvec,
)
from ._toeplitz import (
    ToeplitzKernel as ToeplitzKernel, CHUNK_POINTS as CHUNK_POINTS, toeplitz_kernel as toeplitz_kernel,
    toeplitz_matvec as toeplitz_matvec, toeplitz_normal_equations as toeplitz_normal_equations,
    solve_cg_toeplitz as solve_cg_toeplitz,
)
