"""Optax transformations (Hutchinson and exact diagonals, preconditioned SGD, Armijo), the one-pass Wiener filter, reconstruction strategies, the epoch loop and known-pose reconstruction."""

from ._fit import (
    FitState as FitState, FitResult as FitResult, make_step as make_step, fit as fit,
)
from ._diagonals import (
    Averaging as Averaging, HutchinsonState as HutchinsonState, rademacher_probes as rademacher_probes,
    hutchinson_samples as hutchinson_samples, hutchinson_estimate as hutchinson_estimate,
    hutchinson_diagonal as hutchinson_diagonal, FixedDiagonalState as FixedDiagonalState,
    fixed_diagonal as fixed_diagonal, BatchDiagonalState as BatchDiagonalState, batch_diagonal as batch_diagonal,
    ScaleByDiagonalState as ScaleByDiagonalState, shell_mean as shell_mean,
    scale_by_diagonal as scale_by_diagonal,
)
from ._optim import (
    ArmijoState as ArmijoState, armijo_linesearch as armijo_linesearch, preconditioned_sgd as preconditioned_sgd,
    sgd as sgd, paper_sgd as paper_sgd, paper_psgd as paper_psgd, harmonic_schedule as harmonic_schedule,
)
from ._reconstruct import (
    DEFAULTS as DEFAULTS, OPTIMIZERS as OPTIMIZERS, ReconstructResult as ReconstructResult,
    reconstruct as reconstruct,
)
from ._reconstruct_settings import ReconstructSettings as ReconstructSettings
from ._spectral import (
    HalfMapFSC as HalfMapFSC, TikhonovChoice as TikhonovChoice, PRIORS as PRIORS,
    PriorEstimate as PriorEstimate, estimate_spectral_prior as estimate_spectral_prior,
    resolve_prior as resolve_prior,
)
from ._wiener import wiener_backprojection as wiener_backprojection
from ._strategies import (
    Problem as Problem, Plan as Plan, hutchinson_full_estimate as hutchinson_full_estimate,
    exact_problem_diagonal as exact_problem_diagonal, Strategy as Strategy,
    MinibatchStrategy as MinibatchStrategy, PSGD as PSGD, SGD as SGD, Adam as Adam, Solution as Solution,
    OnePassStrategy as OnePassStrategy, CG as CG, Backproject as Backproject, STRATEGIES as STRATEGIES,
    STRATEGY_NAMES as STRATEGY_NAMES, make_strategy as make_strategy, strategy_name as strategy_name,
    initial_step_size as initial_step_size, batch_step_size as batch_step_size,
    scale_by_shell_schedule as scale_by_shell_schedule, ShellScheduleState as ShellScheduleState,
)
