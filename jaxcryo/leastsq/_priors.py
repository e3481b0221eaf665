"""Priors (regularisers) of the known-pose objective: Tikhonov and the spectral (Wiener / MAP) prior.

The objective of :mod:`jaxcryo.loss` is ``F(v) = data(v) + (1/2) sum_j lambda_j |v_j|^2`` over the centred
Fourier volume, in the loss's units (mean over images, weights ``w_i``). A prior supplies ``lambda_j``:

* :class:`Tikhonov`: one ``lambda`` for every voxel (the paper's objective with ``lam = 1e-8``);
* :class:`SpectralPrior`: ``lambda_j = lambda_s`` per Fourier shell ``s = round(|k_j|)``: a Gaussian prior with
  per-shell signal power ``tau_s^2``, the MAP objective RELION optimises. In the loss's units
  ``lambda_s = 1 / (n tau_s^2)`` for images weighted by ``w_i = 1/sigma^2`` (:meth:`SpectralPrior.from_tau2`),
  or, estimated from the half-map FSC as RELION does (:meth:`SpectralPrior.from_fsc`),
  ``lambda_s = <d>_s / SNR_s`` with ``SNR_s = FSC_s / (1 - FSC_s)`` and ``<d>_s`` the shell mean of the data
  term's Hessian diagonal (the noise variance of a voxel's estimate is about ``1/d``, so ``SNR = tau^2 d``).

A float wherever a prior is accepted means :class:`Tikhonov` of that weight (:func:`as_prior`), so existing
code that passes ``lam`` keeps working. For a diagonal Hessian (``nearest`` slices) the solution of the
spectral-prior objective is the Wiener filter ``v_j = b_j / (d_j + lambda_j)``.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Complex, Float, Num

from ..ndimage._fourier import shell_index
from ..ndimage._metrics import fsc

#: Floor on the FSC used to estimate the SNR (RELION uses 0.001): shells without signal get a strong prior.
FSC_FLOOR = 1e-3
#: Ceiling on the FSC (avoids an infinite SNR in the lowest shells).
FSC_CEIL = 0.999


class Prior(eqx.Module):
    """Abstract prior: ``lambda_j`` per voxel (:meth:`diagonal`) and its value ``(1/2) sum lambda |v|^2``.
    Subclasses implement :meth:`diagonal` and :meth:`describe`; the concrete priors are final."""

    @abc.abstractmethod
    def diagonal(self, n: int, dtype=jnp.float32) -> float | Float[Array, "n n n"]:
        """``lambda_j`` for an ``(n, n, n)`` volume: a scalar or an ``(n, n, n)`` real array."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """A JSON-able record of the prior (for ``run.json`` and checkpoints)."""

    def value(self, vol_f: Complex[Array, "n n n"]) -> Float[Array, ""]:
        """``(1/2) sum_j lambda_j |v_j|^2`` (a real scalar)."""
        lam = self.diagonal(vol_f.shape[-1], jnp.real(vol_f).dtype)
        return 0.5 * jnp.sum(lam * jnp.real(vol_f * jnp.conj(vol_f)))


class Tikhonov(Prior):
    """``lambda_j = lam`` for every voxel."""

    lam: float = eqx.field(static=True, default=0.0)

    def diagonal(self, n: int, dtype=jnp.float32) -> float:
        return self.lam

    def describe(self) -> dict:
        return {"kind": "tikhonov", "lam": float(self.lam)}


class SpectralPrior(Prior):
    """``lambda_j = shell_lambda[round(|k_j|)]`` (shells beyond the array use its last value)."""

    shell_lambda: Float[Array, " s"]

    def diagonal(self, n: int, dtype=jnp.float32) -> Float[Array, "n n n"]:
        sh = np.minimum(shell_index(n, 3), len(self.shell_lambda) - 1)
        return jnp.asarray(self.shell_lambda, dtype)[jnp.asarray(sh)]

    def describe(self) -> dict:
        return {"kind": "spectral", "shell_lambda": [float(x) for x in np.asarray(self.shell_lambda)]}

    @classmethod
    def from_tau2(cls, tau2: Float[ArrayLike, " s"], n_images: int, floor: float = 0.0) -> "SpectralPrior":
        """From the signal power per shell ``tau2`` (for images weighted by ``1/sigma^2``): ``1/(n tau^2)``."""
        tau2 = np.maximum(np.asarray(tau2, np.float64), 1e-30)
        return cls(jnp.asarray(np.maximum(1.0 / (n_images * tau2), floor), jnp.float32))

    @classmethod
    def from_fsc(cls, fsc: Float[ArrayLike, " s"], shell_diag: Float[ArrayLike, " t"], fudge: float = 1.0,
                 floor: float = 0.0) -> "SpectralPrior":
        """From the half-map FSC per shell and the shell means of the data Hessian diagonal.

        ``lambda_s = shell_diag_s / (fudge * SNR_s)``, ``SNR_s = FSC_s / (1 - FSC_s)`` with the FSC clipped
        to ``[FSC_FLOOR, FSC_CEIL]``; ``fudge`` is RELION's ``tau2_fudge`` (> 1 weakens the prior).
        """
        f = np.clip(np.asarray(fsc, np.float64), FSC_FLOOR, FSC_CEIL)
        snr = f / (1.0 - f)
        d = np.asarray(shell_diag, np.float64)
        m = min(len(f), len(d))
        return cls(jnp.asarray(np.maximum(d[:m] / (fudge * snr[:m]), floor), jnp.float32))


def as_prior(prior: "Prior | float | None") -> Prior:
    """``prior`` itself, or :class:`Tikhonov` of a float (``None``: no regularisation)."""
    if isinstance(prior, Prior):
        return prior
    return Tikhonov(0.0 if prior is None else float(prior))


def prior_diagonal(prior: "Prior | float | None", n: int, dtype=jnp.float32) -> float | Float[Array, "n n n"]:
    """``lambda_j`` of ``prior`` (a float stays a float, so ``d + prior_diagonal(lam, n)`` is cheap)."""
    if prior is None or isinstance(prior, (int, float)):
        return 0.0 if prior is None else prior
    return prior.diagonal(n, dtype)


def shell_means(vol: Float[ArrayLike, "n n n"], n_shells: int | None = None) -> Float[np.ndarray, " s"]:
    """Mean of a real ``(n, n, n)`` volume over each Fourier shell ``0..n_shells-1`` (default ``n//2 + 1``)."""
    v = np.asarray(vol, np.float64)
    n = v.shape[-1]
    k = n // 2 + 1 if n_shells is None else n_shells
    sh = shell_index(n, 3).ravel()
    keep = sh < k
    tot = np.bincount(sh[keep], v.ravel()[keep], k)
    cnt = np.bincount(sh[keep], minlength=k)
    return tot / np.maximum(cnt, 1)


def fourier_fsc(a_f: Num[ArrayLike, "n n n"], b_f: Num[ArrayLike, "n n n"]) -> Float[np.ndarray, " s"]:
    """Per-shell FSC ``0..n//2`` of two centred Fourier volumes (:func:`jaxcryo.ndimage.fsc`'s curve)."""
    return fsc(np.asarray(a_f), np.asarray(b_f), fourier=True).fsc
