"""The exact optimum of the known-pose objective, and the exact loss gap of any volume to it.

For a slice operator with a local stencil (nearest, trilinear without oversampling) the objective of
:mod:`jaxcryo.loss` is a quadratic whose Hessian is an assembled 27-point stencil
(:func:`jaxcryo.leastsq.hessian_stencil`). :class:`Optimum` finds its minimiser ``v*`` by CG on the stencil
(complex128 on the host: after one data pass for the right-hand side, no more passes over the images) and
gives, for any volume ``v``,

    ``F(v) - F(v*) = 1/2 (v - v*)^H H (v - v*)``

exactly, without subtracting two large loss values (the paper's "loss gap" is this divided by its value at
the start). Optionally the volume is restricted to the Fourier ball of radius ``radius`` (the paper's
spherical mask; the optimisers then use the same mask as ``vol_mask``).

Images must have unit weights (the stencil is assembled with ``w_i = 1``).
"""

from __future__ import annotations

import time

import numpy as np
from jaxtyping import ArrayLike, Complex

from ..errors import InputError
from ..ndimage._fourier import ball_mask
from ._hessian import HessianOperator, hessian_operator, normal_equations
from ._priors import fourier_fsc
from ..forward._operators import describe
from ..forward._projection import Projector


class Optimum:
    """The minimiser of ``F`` (``lam`` a float: Tikhonov) over the particles ``indices`` of ``source``.

    Args:
        projector: the forward model (operator with a local stencil; its ``mask_radius`` is the image mask).
        source: a particle source with poses.
        lam: Tikhonov weight (> 0 keeps the problem definite where no slice passes).
        radius: restrict the volume to ``|k| <= radius`` (``None``: the whole grid).
        tol: CG stopping rule, relative residual.
        maxiter: CG iterations at most.
        batch_size: batch size of the right-hand side's data pass.

    Attributes: ``solution`` (complex128 ``(n, n, n)``), ``mask`` (bool, or ``None``), ``hessian``
    (:class:`~jaxcryo.leastsq.HessianOperator`), ``iterations``, ``residual`` (recomputed at the end),
    ``seconds`` (assembly + solve), ``gap_at_zero`` (``F(0) - F(v*)``).
    """

    def __init__(self, projector: Projector, source, lam: float, radius: float | None = None, tol: float = 1e-9,
                 maxiter: int = 5000, batch_size: int = 256, indices=None):
        if not projector.operator.has_local_stencil:
            raise InputError(f"the exact optimum needs a slice operator with a local stencil, not "
                             f"{describe(projector.operator)}", param="interp")
        t = time.perf_counter()
        md = source.metadata
        idx = np.arange(len(md)) if indices is None else np.asarray(indices)
        ctf = None if md.ctf is None else type(md.ctf)(*(np.asarray(f)[idx] for f in md.ctf))
        self.hessian: HessianOperator = hessian_operator(projector, np.asarray(md.rotations)[idx], ctf=ctf,
                                                         lam=float(lam), mode="stencil")
        n = projector.n
        self.mask = None if radius is None else ball_mask(n, radius)
        rhs = np.asarray(normal_equations(projector, source, batch_size, float(lam), idx, cache=False).rhs,
                         np.complex128)
        self.rhs = self._restrict(rhs)
        self.solution, self.iterations, self.residual = self._cg(tol, maxiter)
        self.seconds = time.perf_counter() - t
        self.gap_at_zero = self.gap(np.zeros_like(self.solution))

    def _restrict(self, z):
        return z if self.mask is None else np.where(self.mask, z, 0)

    def matvec(self, z: Complex[ArrayLike, "n n n"]) -> Complex[np.ndarray, "n n n"]:
        """``H z`` restricted to the mask (``P H P``)."""
        return self._restrict(self.hessian(self._restrict(np.asarray(z, np.complex128))))

    def _cg(self, tol: float, maxiter: int):
        b = self.rhs
        bn = np.sqrt(np.vdot(b, b).real)
        x = np.zeros_like(b)
        if bn == 0:
            return x, 0, 0.0
        r, it = b.copy(), 0
        p = r.copy()
        rs = np.vdot(r, r).real
        while np.sqrt(rs) / bn > tol and it < maxiter:
            hp = self.matvec(p)
            a = rs / np.vdot(p, hp).real
            x += a * p
            r -= a * hp
            rs_new = np.vdot(r, r).real
            p = r + (rs_new / rs) * p
            rs, it = rs_new, it + 1
        return x, it, float(np.linalg.norm(b - self.matvec(x)) / bn)

    def gap(self, v: Complex[ArrayLike, "n n n"]) -> float:
        """``F(v) - F(v*)`` (exact for the quadratic objective; ``v`` restricted to the mask)."""
        e = self._restrict(np.asarray(v, np.complex128)) - self.solution
        return 0.5 * float(np.vdot(e, self.matvec(e)).real)

    def gap_closed(self, v: Complex[ArrayLike, "n n n"], start: Complex[ArrayLike, "n n n"] | None = None) -> float:
        """The share (%) of the loss gap between ``start`` (default zeros) and ``v*`` that ``v`` closes."""
        return self._closed(self.gap(v), self.gap_at_zero if start is None else self.gap(start))

    @staticmethod
    def _closed(g: float, g0: float) -> float:
        return 100.0 * (1.0 - g / g0) if g0 > 0 else 100.0

    def compare(self, v, shells: tuple[int, int] | None = None) -> dict:
        """How far ``v`` is from ``v*``, as the paper measures it: ``loss_gap`` (:meth:`gap`), ``loss_gap_closed``
        (%, from zeros: :meth:`gap_closed`), ``relative_error`` (:meth:`relative_error`), ``fsc`` (per shell
        ``0..n//2`` against ``v*``, :func:`fourier_fsc`) and, with ``shells=(lo, hi)``, ``min_fsc``: its
        minimum over the shells ``lo..hi`` (inclusive)."""
        g = self.gap(v)
        f = fourier_fsc(v, self.solution)
        out = {"loss_gap": g, "loss_gap_closed": self._closed(g, self.gap_at_zero),
               "relative_error": self.relative_error(v), "fsc": f}
        if shells is not None:
            out["min_fsc"] = float(np.min(f[shells[0]:shells[1] + 1]))
        return out

    def relative_error(self, v: Complex[ArrayLike, "n n n"]) -> float:
        """``||P v - v*|| / ||v*||``."""
        e = self._restrict(np.asarray(v, np.complex128)) - self.solution
        return float(np.linalg.norm(e) / max(float(np.linalg.norm(self.solution)), 1e-300))

    def diagonal(self) -> np.ndarray:
        """The exact full-data Hessian diagonal (float64, ``lam`` included)."""
        return self.hessian.diagonal()
