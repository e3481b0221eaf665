"""RELION's contrast transfer function.

``CTF(s) = scale * exp(-B s^2 / 4) * (sqrt(1 - Q0^2) sin(chi) + Q0 cos(chi))`` with
``chi = pi * lambda * df(theta) * s^2 - (pi / 2) * Cs * lambda^3 * s^4 + phase_shift``, where
``df(theta) = (dU + dV) / 2 + (dU - dV) / 2 * cos(2 (theta - astig_angle))`` (positive for underfocus),
``theta = atan2(ky, kx)``, ``s = |k|`` in 1/Å, ``lambda`` the relativistic electron wavelength in Å,
``Cs`` in Å. This is RELION's ``CTF::getCTF`` (``-sin(K1 deltaf u^2 + K2 u^4 - K5 - K3)`` with RELION's
negative-for-underfocus ``deltaf``), the sign checked on RELION's own CTF projections.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Shaped

from ..errors import InputError


def electron_wavelength(voltage_kv: Float[ArrayLike, "*b"]) -> Float[Array, "*b"]:
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
        defocus_u: Float[ArrayLike, "*b"],
        defocus_v: Float[ArrayLike, "*b"] | None = None,
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

    def take(self, idx: Int[ArrayLike, " k"] | Shaped[ArrayLike, " k"]) -> "CTFParams":
        """Select images (NumPy or JAX fancy index) from every field."""
        return CTFParams(*(f[idx] for f in self))


def evaluate_ctf(params: CTFParams, freqs: Float[ArrayLike, "n n 2"]) -> Float[Array, "*b n n"]:
    """Evaluate the CTF on a frequency grid.

    Args:
        params: :class:`CTFParams` with fields of shape ``(...)`` (a batch of images).
        freqs: ``(H, W, 2)`` frequencies ``(kx, ky)`` in 1/Å (see :func:`jaxcryo.ndimage.freq_grid_2d`).

    Returns:
        ``(..., H, W)`` real CTF values, dtype of ``freqs``.
    """
    kx, ky = freqs[..., 0], freqs[..., 1]
    s2 = kx * kx + ky * ky
    # cos(2 (theta - a)) = cos 2theta cos 2a + sin 2theta sin 2a, with cos 2theta = (kx^2 - ky^2) / s^2 and
    # sin 2theta = 2 kx ky / s^2 on the grid (1 and 0 at the origin, where s^2 = 0 makes it irrelevant): no
    # per-image arctan2 or cosine on every pixel (libm's scalar sin/cos were ~10% of a box-128 reconstruction)
    safe = jnp.where(s2 > 0, s2, 1.0)
    cos2t = jnp.where(s2 > 0, (kx * kx - ky * ky) / safe, 1.0)
    sin2t = jnp.where(s2 > 0, 2.0 * kx * ky / safe, 0.0)

    def b(x):  # broadcast per-image parameter over the grid
        return jnp.asarray(x)[..., None, None]

    lam = electron_wavelength(b(params.voltage))
    cs_a = b(params.cs) * 1e7
    du, dv = b(params.defocus_u), b(params.defocus_v)
    a2 = 2.0 * jnp.deg2rad(b(params.astig_angle))
    df = 0.5 * (du + dv) + 0.5 * (du - dv) * (cos2t * jnp.cos(a2) + sin2t * jnp.sin(a2))
    chi = jnp.pi * lam * df * s2 - 0.5 * jnp.pi * cs_a * lam**3 * s2 * s2 + jnp.deg2rad(b(params.phase_shift))
    q0 = b(params.amp_contrast)
    # sqrt(1 - Q0^2) sin(chi) + Q0 cos(chi) = sin(chi + asin(Q0)) (RELION's K3): one sine per pixel
    ctf = jnp.sin(chi + jnp.arcsin(q0))
    ctf = ctf * jnp.exp(-b(params.bfactor) * s2 / 4.0) * b(params.scale)
    return ctf.astype(freqs.dtype)


# ---------------------------------------------------------------------------------------------------------
# Physical plausibility of the inputs: an impossible value is named (file, field, where, what was expected)
# instead of surfacing later as a diverging loss.

#: RELION's STAR field for each :class:`CTFParams` field (the default names in messages).
RELION_FIELDS = {
    "defocus_u": "rlnDefocusU", "defocus_v": "rlnDefocusV", "astig_angle": "rlnDefocusAngle",
    "voltage": "rlnVoltage", "cs": "rlnSphericalAberration", "amp_contrast": "rlnAmplitudeContrast",
    "phase_shift": "rlnPhaseShift", "bfactor": "rlnCtfBfactor", "scale": "rlnCtfScalefactor",
}

#: cryoSPARC's ``.cs`` field for each :class:`CTFParams` field.
CRYOSPARC_FIELDS = {
    "defocus_u": "ctf/df1_A", "defocus_v": "ctf/df2_A", "astig_angle": "ctf/df_angle_rad",
    "voltage": "ctf/accel_kv", "cs": "ctf/cs_mm", "amp_contrast": "ctf/amp_contrast",
    "phase_shift": "ctf/phase_shift_rad", "bfactor": "ctf/bfactor", "scale": "ctf/scale",
}

#: Largest accepted accelerating voltage (kV); no electron microscope exceeds 3 MV, and a value in volts
#: (300000) is the usual mistake above it.
MAX_VOLTAGE_KV = 3000.0
#: Largest accepted ``|Cs|`` (mm). Objective lenses have 0-6 mm (2.7 on a Krios, ~0 with a corrector);
#: a larger value is a unit mistake (e.g. Å or µm). Negative Cs is accepted: RELION does not restrict its
#: sign, and aberration-corrected microscopes can be tuned to small negative Cs.
MAX_ABS_CS_MM = 20.0


def _default_where(field: str, i: int) -> str:
    return f"particle {i + 1}"


def validate_ctf(ctf: CTFParams, source: str, *, fields: dict | None = None,
                 where: Callable[[str, int], str] | None = None) -> None:
    """Raise :class:`InputError` (one line naming ``source``, the file's field and what was expected) if
    ``ctf`` holds a physically impossible value. Checks, per image:

    * every field finite (no NaN or inf);
    * voltage ``0 < kV <= 3000`` (:data:`MAX_VOLTAGE_KV`);
    * ``|Cs| <= 20 mm`` (:data:`MAX_ABS_CS_MM`; negative Cs allowed, as RELION does);
    * amplitude contrast ``0 <= Q0 < 1`` (RELION's ``CTF::initialise`` rejects Q0 outside [0, 1]; Q0 = 1
      would leave no phase contrast at all, so it is rejected here too).

    Defocus may be negative (overfocus) and the phase shift, B-factor and scale any finite value.

    Args:
        ctf: parameters with ``(n,)`` (or scalar) fields, in :class:`CTFParams` units.
        source: the file (or other origin) named at the start of the message.
        fields: name of each :class:`CTFParams` field in the file (default :data:`RELION_FIELDS`).
        where: ``(ctf_field, index) -> str`` describing where image ``index`` sits in the file
            (default ``"particle {index + 1}"``; the STAR reader says ``"optics group G"`` for optics values).
    """
    names = dict(RELION_FIELDS if fields is None else fields)
    where = where or _default_where

    def arr(f):
        return np.atleast_1d(np.asarray(getattr(ctf, f), np.float64))

    def first(bad):
        return int(np.flatnonzero(bad)[0])

    for f in CTFParams._fields:
        v = arr(f)
        bad = ~np.isfinite(v)
        if bad.any():
            i = first(bad)
            raise InputError(f"{source}: CTF field {names.get(f, f)} contains NaN or inf ({v[i]:g} in "
                             f"{where(f, i)}); expected finite values")
    v = arr("voltage")
    bad = ~(v > 0)
    if bad.any():
        i = first(bad)
        raise InputError(f"{source}: {names['voltage']} {v[i]:g} kV in {where('voltage', i)}; "
                         "expected > 0 kV (typically 100-300)")
    bad = v > MAX_VOLTAGE_KV
    if bad.any():
        i = first(bad)
        raise InputError(f"{source}: {names['voltage']} {v[i]:g} kV in {where('voltage', i)}; expected kV "
                         f"(typically 100-300, at most {MAX_VOLTAGE_KV:g}), not volts")
    v = arr("cs")
    bad = np.abs(v) > MAX_ABS_CS_MM
    if bad.any():
        i = first(bad)
        raise InputError(f"{source}: {names['cs']} {v[i]:g} mm in {where('cs', i)}; expected the spherical "
                         f"aberration in mm (typically 0-4, |Cs| <= {MAX_ABS_CS_MM:g})")
    v = arr("amp_contrast")
    bad = ~((v >= 0) & (v < 1))
    if bad.any():
        i = first(bad)
        raise InputError(f"{source}: {names['amp_contrast']} {v[i]:g} in {where('amp_contrast', i)}; "
                         "expected an amplitude contrast fraction in [0, 1) (typically 0.07-0.1)")


def validate_pixel_size(pixel_size: Float[ArrayLike, "*k"], source: str, field: str = "rlnImagePixelSize",
                        where: Callable[[int], str] | None = None, hint: str = "",
                        param: str | None = None) -> None:
    """Raise :class:`InputError` (one line naming ``source`` and ``field``, ending in ``hint`` if given)
    unless every pixel size is finite and ``> 0`` Å. ``where(index)`` describes where value ``index`` sits
    (default ``particle i``)."""
    v = np.atleast_1d(np.asarray(pixel_size, np.float64))
    bad = ~(np.isfinite(v) & (v > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        loc = where(i) if where is not None else (f"particle {i + 1}" if v.size > 1 else "")
        raise InputError(f"{source}: {field} {v[i]:g} Å" + (f" in {loc}" if loc else "")
                         + "; expected a pixel size > 0 Å" + (f"; {hint}" if hint else ""), param=param)
