"""A refinement iteration's volume update (:func:`update_half_maps`): the two half maps from the particles at
their newly found poses.

Two schemes (:attr:`~jaxcryo.poses.RefineSettings.reestimate`):

* **re-estimated** (default, RELION's auto-refine scheme): each iteration estimates both half maps anew from
  the current poses. One pass over each half (:func:`jaxcryo.solvers.estimate_spectral_prior`) gives the
  Wiener sums and the half-map FSC, whose per-shell SNR sets the spectral prior ``lambda_s`` (RELION's
  ``tau^2``); the half maps are then the optimum of the objective with that prior: for ``backproject`` the
  Wiener filter itself (no further pass), for a minibatch strategy (``psgd``, ``sgd``, ``adam``)
  ``epochs_per_iteration`` epochs *from zero* on that objective. Nothing of an earlier iteration's poses
  stays in the maps.
* **warm-started** (``reestimate=False``): ``epochs_per_iteration`` epochs of the minibatch strategy on the
  Tikhonov objective (``lam``) from the previous half maps. Measured on ASPIRE sets (issue 19): the maps keep
  what earlier, worse poses put in them, and the half-map resolution stalls (17.5 Å at SNR 0.1 where a
  reconstruction from scratch on the same poses reaches 14.6 Å).
"""

from __future__ import annotations

import jax
import numpy as np

from ..forward._projection import Projector
from ..ndimage._metrics import first_shell_below
from ..solvers._fit import fit
from ..solvers._spectral import estimate_spectral_prior
from ..solvers._strategies import MinibatchStrategy, OnePassStrategy, Problem, Strategy, make_strategy
from ._state import RefineSettings


def update_strategy(settings: RefineSettings, projector: Projector) -> Strategy:
    """The volume updates' strategy, resolved once: ``settings.optimizer`` from the registry, with the options
    a refinement gives it (PSGD: by each minibatch's exact diagonal for an operator with a local stencil,
    else Hutchinson with one probe; SGD: decaying like PSGD; ``backproject``: the one-pass Wiener filter)."""
    stencil = bool(projector.operator.has_local_stencil)
    return make_strategy(settings.optimizer, probes=0 if stencil else 1, batch_diagonal=stencil, harmonic=True)


def _epochs(source, idx, projector: Projector, init, lam, settings: RefineSettings, strategy: MinibatchStrategy,
            plans: dict, progress: bool, desc: str, mesh=None, key=None):
    s = settings
    problem = Problem(source, projector, idx, lam, min(s.batch_size, len(idx)), s.seed)
    key = f"{key or 'warm'} {len(idx)}"  # a run's plans are keyed by objective and half size (JSON keys)
    if key not in plans:  # the step size depends on the data's Hessian, not on small pose changes
        plans[key] = strategy.prepare(problem)
    res = fit(source, strategy.transformation(problem, plans[key]), projector, epochs=s.epochs_per_iteration,
              batch_size=problem.batch_size, lam=lam, indices=idx, init=init, seed=s.seed, progress=progress,
              desc=desc, divergence_factor=1e8, mesh=mesh)
    return jax.device_get(res.volume_f)  # host copy: the half maps are kept (and checkpointed) off the mesh


def update_half_maps(source, rows: list, projector: Projector, previous: list, settings: RefineSettings,
                     strategy: Strategy, plans: dict, progress: bool = False, name: str = "", mesh=None):
    """The new half maps (centred Fourier volumes, on the host) of the particles ``rows[h]`` of ``source``
    (at their new poses), and a record of the update (the module docstring's schemes). ``previous``: the
    half maps before the update (the warm start); ``plans``: the minibatch step sizes, measured once per run
    and half size."""
    s = settings
    if not s.reestimate:
        assert isinstance(strategy, MinibatchStrategy)  # RefineSettings checked it
        maps = [_epochs(source, rows[h], projector, previous[h], s.lam, s, strategy, plans, progress,
                        f"{name} update, half {h + 1}", mesh) for h in range(len(rows))]
        return maps, {"volume_update": "warm"}
    est = estimate_spectral_prior(projector, source, rows, s.lam, min(s.batch_size, min(map(len, rows))), mesh=mesh)
    if isinstance(strategy, MinibatchStrategy):
        maps = [_epochs(source, rows[h], projector, None, est.prior, s, strategy, plans, progress,
                        f"{name} update, half {h + 1}", mesh, key="prior")
                for h in range(len(rows))]
    else:  # a one-pass solver with that prior (backproject: the estimate's sums again, no further pass)
        assert isinstance(strategy, OnePassStrategy)
        problem = [Problem(source, projector, r, est.prior, s.batch_size, s.seed, mesh) for r in rows]
        maps = [jax.device_get(strategy.solve(p, s.epochs_per_iteration, (*w, s.lam)).volume_f)
                for p, w in zip(problem, est.wiener)]
    return maps, {"volume_update": "reestimated",
                  "one_pass_fsc_0143_shell": first_shell_below(est.fsc, 0.143)}
