"""RELION's contrast transfer function.

``CTF(s) = scale * exp(-B s^2 / 4) * (sqrt(1 - Q0^2) sin(chi) + Q0 cos(chi))`` with
``chi = pi * lambda * df(theta) * s^2 - (pi / 2) * Cs * lambda^3 * s^4 + phase_shift``, where
``df(theta) = (dU + dV) / 2 + (dU - dV) / 2 * cos(2 (theta - astig_angle))`` (positive for underfocus),
``theta = atan2(ky, kx)``, ``s = |k|`` in 1/Å, ``lambda`` the relativistic electron wavelength in Å,
``Cs`` in Å. This is RELION's ``CTF::getCTF`` (``-sin(K1 deltaf u^2 + K2 u^4 - K5 - K3)`` with RELION's
negative-for-underfocus ``deltaf``), the sign checked on RELION's own CTF projections.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Å for an accelerating voltage in kV (RELION's formula)."""
    v = voltage_kv * 1e3
    return 12.2643247 / jnp.sqrt(v * (1.0 + v * 0.978466e-6))


class CTFParams(NamedTuple):
    """CTF parameters per image; every field is an array of shape ``(n,)`` (or scalars for one image).

    Units are RELION's: defocus in Å (positive underfocus), angles in degrees, voltage in kV, Cs in mm,
    B-factor in Å^2.
    """

    defocus_u: jnp.ndarray
    defocus_v: jnp.ndarray
    astig_angle: jnp.ndarray
    voltage: jnp.ndarray
    cs: jnp.ndarray
    amp_contrast: jnp.ndarray
    phase_shift: jnp.ndarray
    bfactor: jnp.ndarray
    scale: jnp.ndarray

    @classmethod
    def create(
        cls,
        defocus_u,
        defocus_v=None,
        astig_angle=0.0,
        voltage=300.0,
        cs=2.7,
        amp_contrast=0.1,
        phase_shift=0.0,
        bfactor=0.0,
        scale=1.0,
        dtype=np.float32,
    ) -> "CTFParams":
        """Build parameters, broadcasting scalars to the shape of ``defocus_u``."""
        du = np.asarray(defocus_u, dtype=np.float64)
        dv = du if defocus_v is None else defocus_v
        vals = [du, dv, astig_angle, voltage, cs, amp_contrast, phase_shift, bfactor, scale]
        return cls(*(np.broadcast_to(np.asarray(v, dtype=dtype), du.shape).copy() for v in vals))

    def take(self, idx) -> "CTFParams":
        """Select images (NumPy or JAX fancy index) from every field."""
        return CTFParams(*(f[idx] for f in self))


def evaluate_ctf(params: CTFParams, freqs):
    """Evaluate the CTF on a frequency grid.

    Args:
        params: :class:`CTFParams` with fields of shape ``(...)`` (a batch of images).
        freqs: ``(H, W, 2)`` frequencies ``(kx, ky)`` in 1/Å (see :func:`jaxcryo.fourier.freq_grid_2d`).

    Returns:
        ``(..., H, W)`` real CTF values, dtype of ``freqs``.
    """
    kx, ky = freqs[..., 0], freqs[..., 1]
    s2 = kx * kx + ky * ky
    theta = jnp.arctan2(ky, kx)

    def b(x):  # broadcast per-image parameter over the grid
        return jnp.asarray(x)[..., None, None]

    lam = electron_wavelength(b(params.voltage))
    cs_a = b(params.cs) * 1e7
    du, dv = b(params.defocus_u), b(params.defocus_v)
    df = 0.5 * (du + dv) + 0.5 * (du - dv) * jnp.cos(2.0 * (theta - jnp.deg2rad(b(params.astig_angle))))
    chi = jnp.pi * lam * df * s2 - 0.5 * jnp.pi * cs_a * lam**3 * s2 * s2 + jnp.deg2rad(b(params.phase_shift))
    q0 = b(params.amp_contrast)
    ctf = jnp.sqrt(1.0 - q0 * q0) * jnp.sin(chi) + q0 * jnp.cos(chi)
    ctf = ctf * jnp.exp(-b(params.bfactor) * s2 / 4.0) * b(params.scale)
    return ctf.astype(freqs.dtype)
