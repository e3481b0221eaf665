"""jaxcryo: differentiable cryo-EM 3D reconstruction in JAX with Hutchinson-preconditioned SGD.

The public API, for notebooks and scripts (``import jaxcryo as jc``)::

    ds = jc.ParticleDataset.from_file("particles.star")         # or jc.ArrayDataset(metadata, images)
    res = jc.reconstruct(ds, optimizer="psgd", epochs=5)          # half maps, FSC, history

    proj = jc.Projector(n=64, pixel_size=3.0, operator=jc.Trilinear(oversample=2))
    opt = jc.preconditioned_sgd(jc.harmonic_schedule(0.25, steps_per_epoch=8))
    out = jc.fit(ds, opt, proj, epochs=5, batch_size=250)

Subpackages hold the layers (see the README's layout): ``ndimage``, ``rotations``, ``forward``, ``io``, ``data``,
``parallel``, ``leastsq``, ``solvers``, ``post``, ``poses``, ``cli``; everything here is re-exported from them, and
no name here hides a subpackage.
"""

from .data import Batch, RawBatch, epoch_batches, iterate_batches, load_batch, make_batch, to_batch
from .forward import CTFParams, evaluate_ctf
from .errors import DivergenceError, InputError
from .leastsq import Prior, SpectralPrior, Tikhonov
from .poses import AbinitioResult, AbinitioSettings, RefineResult, RefineSettings, abinitio, refine
from .solvers import FitResult, FitState, fit, make_step
from .ndimage import shell_index
from .rotations import (RotationAlignment, align_rotations, geodesic_distance_deg, local_grid, shift_grid,
                    so3_grid)
from .leastsq import exact_diagonal, normal_equations, solve_cg
from .solvers import wiener_backprojection
from .io import read_map, write_map
from .leastsq import conjugate_gradient, power_iteration, preconditioned_max_eigenvalue, relative_error_in_ball
from .leastsq import gradient, hvp, loss, objective, value_and_grad
from .ndimage import FSCResult, fsc
from .ndimage import auto_mask, soft_sphere_mask, spherical_mask
from .post import PostprocessResult, postprocess, write_postprocess
from .forward import NUFFT, OPERATORS, Nearest, SliceOperator, Trilinear, make_operator
from .solvers import (armijo_linesearch, batch_diagonal, fixed_diagonal, harmonic_schedule, hutchinson_diagonal,
                    paper_psgd, paper_sgd, preconditioned_sgd, scale_by_diagonal, sgd)
from .leastsq import Optimum
from .forward import ParticleMetadata
from .forward import Projector, fourier_to_volume, volume_to_fourier
from .solvers import ReconstructResult, ReconstructSettings, reconstruct
from .rotations import preferred_orientations
from .poses import BestPoses, PoseWeights, best_poses, score_local, score_poses, soft_weights
from .data import SimulatedData, phantom, project_metadata, simulate
from .data import (ArrayDataset, CroppedSource, ParticleDataset, ParticleSource, read_particles,
                      split_halves, write_dataset)
from .solvers import (PSGD, SGD, STRATEGIES, Adam, Backproject, CG, Plan, Problem, Strategy,
                         initial_step_size, make_strategy)

__version__ = "0.1.0"

__all__ = [
    # data
    "ParticleSource", "ParticleDataset", "ArrayDataset", "CroppedSource", "ParticleMetadata", "read_particles",
    "write_dataset", "split_halves", "Batch", "RawBatch", "make_batch", "to_batch", "load_batch",
    "epoch_batches", "iterate_batches", "simulate", "SimulatedData", "phantom", "project_metadata",
    "preferred_orientations",
    # forward model
    "Projector", "SliceOperator", "Nearest", "Trilinear", "NUFFT", "OPERATORS", "make_operator", "CTFParams",
    "evaluate_ctf", "volume_to_fourier", "fourier_to_volume",
    # objective, Hessian, linear algebra
    "loss", "objective", "gradient", "value_and_grad", "hvp", "exact_diagonal", "normal_equations",
    "wiener_backprojection", "solve_cg", "conjugate_gradient", "power_iteration",
    "preconditioned_max_eigenvalue", "Optimum",
    # optimisers and strategies
    "preconditioned_sgd", "hutchinson_diagonal", "fixed_diagonal", "scale_by_diagonal", "armijo_linesearch",
    "sgd", "harmonic_schedule", "batch_diagonal", "paper_sgd", "paper_psgd", "Strategy", "PSGD", "SGD", "Adam", "CG", "Backproject", "STRATEGIES",
    "make_strategy", "Problem", "Plan", "initial_step_size",
    # running
    "fit", "make_step", "FitState", "FitResult", "reconstruct", "ReconstructSettings", "ReconstructResult",
    # maps and metrics
    "read_map", "write_map", "fsc", "FSCResult", "relative_error_in_ball", "shell_index",
    # masks and post-processing
    "auto_mask", "spherical_mask", "soft_sphere_mask", "postprocess", "PostprocessResult", "write_postprocess",
    # poses (unknown-pose refinement)
    "so3_grid", "local_grid", "shift_grid", "geodesic_distance_deg", "align_rotations", "RotationAlignment",
    "score_poses", "score_local", "best_poses", "soft_weights", "BestPoses", "PoseWeights",
    # priors
    "Prior", "Tikhonov", "SpectralPrior",
    # refinement and ab initio
    "refine", "RefineSettings", "RefineResult", "abinitio", "AbinitioSettings", "AbinitioResult",
    # errors
    "InputError", "DivergenceError",
]
