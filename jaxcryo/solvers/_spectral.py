"""Estimating the spectral (Wiener / MAP) prior from the data, as RELION estimates its ``tau^2``.

:func:`estimate_spectral_prior` reconstructs the two half sets in one pass each (the Wiener filter of
:func:`jaxcryo.solvers.wiener_backprojection` with a small Tikhonov weight), takes their FSC per shell,
``SNR_s = FSC_s / (1 - FSC_s)`` (the half maps' SNR), and sets

    ``lambda_s = <d>_s / (fudge * SNR_s)``

with ``<d>_s`` the shell mean of the data term's ``CTF^2`` weights (the lumped Hessian ``H 1``, whose entries
are the Wiener filter's denominators). For a diagonal Hessian the objective's optimum is then RELION's
Wiener filter ``b_j / (d_j + lambda_j)``; every strategy (PSGD, SGD, CG, the one-pass estimate) then
optimises this regularised objective. :class:`HalfMapFSC` is the user's choice "estimate it this way"
(``--prior fsc``); :data:`PRIORS` maps the ``--prior`` names to choices.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import equinox as eqx
import numpy as np

from ..errors import InputError
from ._wiener import wiener_backprojection
from ..leastsq._priors import Prior, SpectralPrior, fourier_fsc, shell_means


class HalfMapFSC(eqx.Module):
    """Estimate a :class:`~jaxcryo.leastsq.SpectralPrior` from the half-map FSC of a one-pass estimate.

    ``fudge``: RELION's ``tau2_fudge`` (the signal power is multiplied by it: > 1 weakens the prior).
    """

    fudge: float = eqx.field(static=True, default=1.0)


class TikhonovChoice(eqx.Module):
    """Plain Tikhonov with the run's ``lam`` (the paper's objective)."""


#: The ``--prior`` choices.
PRIORS = {"fsc": HalfMapFSC, "tikhonov": TikhonovChoice}


class PriorEstimate(NamedTuple):
    """The estimated prior and what it was estimated from (per-shell FSC and SNR of the half maps)."""

    prior: SpectralPrior
    fsc: np.ndarray
    snr: np.ndarray
    shell_weight: np.ndarray
    wiener: list  # per half: (Wiener volume with the Tikhonov lam, CTF^2 weights): reusable one-pass sums
    lam: float


def estimate_spectral_prior(projector, source, halves, lam: float = 1e-3, batch_size: int = 256,
                            fudge: float = 1.0, mesh=None) -> PriorEstimate:
    """The spectral prior of the particles ``halves = (indices1, indices2)`` of ``source`` (see the module
    docstring). ``lam`` regularises the one-pass half estimates and floors ``lambda_s``. ``mesh``: each
    half's one-pass sums are split over its devices (:func:`~jaxcryo.solvers.wiener_backprojection`); the
    halves then run one after the other."""
    # The two halves are independent: run them in two threads. Each one's accumulation is a chain of
    # scatter-adds, which XLA:CPU runs on one core, so the halves overlap on a multi-core CPU (measured
    # 3.65 -> 3.05 s for 2 x 2,500 box-64 images on a busy 2-core machine); results are identical.
    results: list = [None] * len(halves)
    errors: list = []

    def work(i, idx):
        try:
            v, den = wiener_backprojection(projector, source, lam=lam, batch_size=batch_size, indices=idx, mesh=mesh)
            results[i] = (v, np.asarray(den))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, idx), name=f"jaxcryo-half{i + 1}")
               for i, idx in enumerate(halves)]
    sharded = mesh is not None and mesh.size > 1  # one program with collectives on the mesh at a time
    for t in threads:
        t.start()
        if sharded:
            t.join()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    vols = [r[0] for r in results]
    dens = [r[1] for r in results]
    fsc = fourier_fsc(vols[0], vols[1])
    w = shell_means(0.5 * (dens[0] + dens[1]))
    prior = SpectralPrior.from_fsc(fsc, w, fudge=fudge, floor=lam)
    f = np.clip(fsc, 1e-3, 0.999)
    return PriorEstimate(prior, fsc, f / (1 - f), w, list(zip(vols, dens)), lam)


def resolve_prior(choice, lam: float, estimate) -> "Prior | float":
    """The objective's prior for a user choice: a :class:`~jaxcryo.leastsq.Prior` value as given; ``None``
    or ``"tikhonov"`` -> ``lam``; ``"fsc"`` / :class:`HalfMapFSC` -> ``estimate(fudge)`` (a callable
    returning a :class:`PriorEstimate`, run only when needed)."""
    if isinstance(choice, Prior):
        return choice
    if choice is None:
        return lam
    if isinstance(choice, str):
        if choice not in PRIORS:
            raise InputError(f"{{param}} {choice!r}: expected one of {', '.join(PRIORS)}", param="prior")
        choice = PRIORS[choice]()
    if isinstance(choice, TikhonovChoice):
        return lam
    if isinstance(choice, HalfMapFSC):
        return estimate(choice.fudge).prior
    raise TypeError(f"prior: expected a Prior, a name in {tuple(PRIORS)} or None, got {type(choice).__name__}")


