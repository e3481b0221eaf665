"""Conditioning of the known-pose reconstruction problem.

The Hessian of the least-squares loss of :mod:`jaxcryo.loss` (mean over images, weights 1) is

    ``H = (1/B) sum_i S_i^H M S_i + lam I``

on complex Fourier volumes. It does not depend on the point (the loss is quadratic) nor on the in-plane
shifts (``|exp(2 pi i k.o)| = 1``). This module is the report of ``jaxcryo condition``: the extreme
eigenvalues and condition number of ``H`` (:func:`jaxcryo.leastsq.hessian_operator`, Lanczos of
:mod:`jaxcryo.leastsq`), with and without the diagonal preconditioner of :mod:`jaxcryo.solvers`, against the
theoretical growth with box size (:func:`predicted_condition_number`). The figure is
:func:`jaxcryo.plotting.plot_condition`.

Conventions (the numbers ``jaxcryo condition`` reports):

* **Restriction to the ball.** Eigenvalues are those of ``P H P`` on the subspace of voxels with
  ``|k| <= N/2`` (``P`` = :func:`jaxcryo.ndimage.ball_mask`); outside the ball the data say nothing
  (``H`` is 0 there, or ``lam``).
* **Preconditioned.** ``kappa(D^-1 H)`` is computed from the similar symmetric operator
  ``D^-1/2 P H P D^-1/2``, ``D = max(|diag H|, default_threshold(N))`` with ``diag H`` from
  :func:`jaxcryo.leastsq.exact_diagonal` (the thresholded diagonal the optimiser uses).
* **Operator.** :func:`jaxcryo.leastsq.hessian_operator` returns a matvec on complex ``(N, N, N)`` volumes.
  For operators with a local stencil (``nearest`` and ``trilinear`` without oversampling) it assembles ``H``
  once as a 27-point stencil (:mod:`jaxcryo.leastsq`; the exact
  operator: each image pixel couples the <= 8 voxels of its interpolation cube), so a matvec costs
  milliseconds instead of the ~1.5 s of a 2,000-image HVP at box 32 on a CPU; the tests check it against
  :func:`jaxcryo.leastsq.hvp`. Other slice operators (``nufft``, oversampling) use chunked HVPs.
* **Arithmetic.** Lanczos runs on the host in float64 (complex128, ``np.vdot``) with full
  reorthogonalisation (classical Gram-Schmidt, repeated when needed). The stencil is assembled in float64, so the
  whole computation is float64 without enabling ``jax_enable_x64`` (the HVP path evaluates in the JAX
  default precision, float32 unless x64 is on: relative error ~1e-6 of ``lambda_max``, fine for
  ``kappa`` up to ~1e4). With real interpolation weights and a real CTF, ``H`` is a real symmetric matrix
  acting alike on real and imaginary parts, so its complex spectrum equals its real one; such operators
  are flagged ``is_real`` and Lanczos then uses float64 real vectors (a quarter of the flops, half the
  memory; identical eigenvalues).
* **Accuracy.** Lanczos Ritz values bound the spectrum from inside: ``lambda_max`` converges in a few
  dozen iterations; ``lambda_min`` sits in a dense cluster (high-frequency modes that trilinear
  interpolation attenuates) and converges slowly from above, so ``kappa`` is a slight *under*-estimate.
  Runs stop when both extreme Ritz pairs have residual ``<= 1e-2 * |theta|`` (at most
  :data:`jaxcryo.leastsq.LANCZOS_ITERS`): at box 32 (2,000 poses) that is ~300 iterations for ``H`` and ~140 for
  ``D^-1 H``, and ``lambda_min`` then agrees with ARPACK (implicitly restarted Lanczos, converged) and
  with 600 iterations to ~1e-4 relative; at box 64 ~350 and ~150 iterations.
* **Tikhonov.** The default is ``lam = 0``: with 2,000 uniform poses and trilinear slices every ball voxel
  is touched, and ``lambda_min > 0`` (it is reported as measured; if it is ``<= 0`` the condition number
  is reported as ``inf``, never clipped). Pass ``lam`` (the paper uses ``1e-8``, negligible here) to
  regularise.

Prediction (:func:`predicted_condition_number`): the paper's lower bound for the nearest-slice (diagonal)
Hessian, ``kappa >= (1 + lam) / (p + lam)`` with ``p`` = voxels in the central disc / voxels in the ball
(radius ``R = N/2``), ``p ~ 3 / (4R)``, so ``kappa ~ 4R/3 = 2N/3``: linear growth with the box. It bounds
the *diagonal* spread (the centre voxel is on every slice, a voxel at radius ``|k|`` on a fraction
``~ 1/|k|`` of them). Trilinear interpolation adds off-diagonal coupling that makes the measured ``kappa(H)``
much larger than the bound (checkerboard-like modes at high frequency are attenuated by the
interpolation, and the fall-off of the diagonal makes them the smallest). The diagonal preconditioner
removes the ``1/|k|`` fall-off; what is left, ``kappa(D^-1 H)``, is the interpolation's own conditioning
and hardly grows with the box (measured ~25-29 at boxes 16-64, 2,000 poses).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..data._batch import make_batch
from ..ndimage._fourier import ball_mask
from ._hessian import exact_diagonal, hessian_operator
from ._linalg import LANCZOS_ITERS, LANCZOS_RTOL, condition_number
from ..forward._operators import SliceOperator, Trilinear, make_operator, operator_name
from ._linalg import default_threshold
from ..forward._projection import Projector
from ..rotations._rotations import random_rotations
from ..data._simulate import random_ctf_params


def predicted_condition_number(n: int, lam: float = 0.0) -> float:
    """The paper's lower bound ``kappa >= (1 + lam) / (p + lam)`` (= ``(B + B lam) / (B p + B lam)``).

    ``p`` = voxels in the central disc of radius ``N/2`` / voxels in the ball of radius ``N/2``
    (:func:`jaxcryo.ndimage.ball_mask`), ``~ 3 / (4R)`` with ``R = N/2``: the mean fraction of slices through
    a ball voxel, against 1 for the centre voxel (on every slice), for the nearest-slice (diagonal) Hessian
    normalised by the number of images. So ``kappa ~ 4R/3 = 2N/3``, linear in the box.
    """
    ball = ball_mask(n)
    p = float(ball[n // 2].sum()) / float(ball.sum())
    return float((1.0 + lam) / (p + lam))


# --------------------------------------------------------------------------------------------------
# The report of ``jaxcryo condition``
# --------------------------------------------------------------------------------------------------
def _poses(n_poses: int, seed: int, ctf: bool):
    rots = np.asarray(random_rotations(jax.random.PRNGKey(seed), n_poses, jnp.float32))
    ctfp = random_ctf_params(np.random.default_rng(seed), n_poses) if ctf else None
    return rots, ctfp


def condition_report(boxes, n_poses: int = 2000, method: SliceOperator | str = Trilinear(), ctf: bool = False,
                     seed: int = 0,
                     lam: float = 0.0, lanczos_iters: int = LANCZOS_ITERS, pixel_size: float = 3.0,
                     progress: Callable | None = None) -> dict:
    """``kappa(H)``, ``kappa(D^-1 H)`` and the predicted ``kappa`` per box size (schema of ``jaxcryo condition``).

    ``method``: the slice operator (a :class:`~jaxcryo.forward.SliceOperator` or its registry name).
    Poses: ``n_poses`` uniform random rotations (:func:`jaxcryo.rotations.random_rotations`,
    ``PRNGKey(seed)``), the same draw at every box; with ``ctf``, random CTF parameters
    (:func:`jaxcryo.data.random_ctf_params`, ``default_rng(seed)``) at ``pixel_size`` Å/px.
    ``H`` restricted to the ball of radius ``N/2``; ``D = max(|exact_diagonal|, default_threshold(N))``.

    Returns:
        ``{"box", "kappa_H", "kappa_DinvH", "kappa_predicted", "settings"}``, lists in ``boxes`` order;
        ``settings`` records every choice and the eigenvalues/timings per box.
    """
    operator = make_operator(method)
    rots, ctfp = _poses(n_poses, seed, ctf)
    out: dict[str, Any] = {"box": [], "kappa_H": [], "kappa_DinvH": [], "kappa_predicted": []}
    eig = []
    for n in boxes:
        n = int(n)
        t0 = time.perf_counter()
        proj = Projector(n=n, pixel_size=pixel_size, operator=operator)
        op = hessian_operator(proj, rots, None, ctfp, lam)
        batch = make_batch(np.zeros((n_poses, n, n), np.float32), rots, np.zeros((n_poses, 2), np.float32), ctfp)
        d = np.asarray(exact_diagonal(proj, batch, lam=lam), np.float64)
        mask = ball_mask(n)
        k_h, lo, hi, ih = condition_number(op, mask, seed, lanczos_iters, return_info=True)
        k_p, plo, phi, ip = condition_number(op, mask, seed, lanczos_iters, preconditioner=d, return_info=True)
        out["box"].append(n)
        out["kappa_H"].append(k_h)
        out["kappa_DinvH"].append(k_p)
        out["kappa_predicted"].append(predicted_condition_number(n, lam))
        eig.append({"box": n, "lambda_min_H": lo, "lambda_max_H": hi, "lambda_min_DinvH": plo,
                    "lambda_max_DinvH": phi, "ball_voxels": int(mask.sum()),
                    "lanczos_iters_run": [int(ih["iters"]), int(ip["iters"])],
                    "seconds": round(time.perf_counter() - t0, 3)})
        if progress is not None:
            progress(n, k_h, k_p, out["kappa_predicted"][-1])
    out["settings"] = {
        "interp": operator_name(operator),
        "n_poses": int(n_poses),
        "poses": "uniform random (random_rotations, PRNGKey(seed)), same draw at every box",
        "ctf": bool(ctf),
        "pixel_size": float(pixel_size),
        "seed": int(seed),
        "ball_radius": "N/2",
        "lam": float(lam),
        "lanczos_iters": int(lanczos_iters),
        "lanczos_rtol": LANCZOS_RTOL,
        "eigensolver": "Lanczos, full reorthogonalisation, float64, on P H P (ball voxels), at most "
                       "lanczos_iters iterations, stopped when both extreme Ritz residuals <= lanczos_rtol * "
                       "|theta|; Ritz lambda_min approaches from above (kappa slightly underestimated)",
        "hessian": "assembled 27-point stencil (exact)" if operator.has_local_stencil else "HVPs",
        "D": "exact diagonal (hessian.exact_diagonal), thresholded max(|D|, default_threshold(N))",
        "threshold": {str(int(n)): default_threshold(int(n)) for n in boxes},
        "kappa_predicted": "paper's lower bound (1+lam)/(p+lam), p = voxels in central disc / voxels in ball "
                           "(radius N/2), ~ 2N/3",
        "eigenvalues": eig,
    }
    return out
