"""Keep a refinement's map in the box (issue 19): a soft spherical solvent mask for the references that the
poses are scored against, and recentring of the half maps on their centre of mass with the particles' origins
moved to match (so the images' model is unchanged).

* :func:`solvent_mask`: RELION's ``--particle_diameter`` mask: 1 inside the particle's radius, a raised-cosine
  edge outside, 0 beyond (default diameter: 0.8 of the box, the edge reaching the box face);
* :func:`masked_fourier`: a centred Fourier volume with a real-space mask applied (solvent flattened to 0);
* :func:`shift_fourier`: a centred Fourier volume translated by a real-space vector;
* :func:`recentre`: the half maps moved so that their average's density is centred, and the origins that
  keep every image's model the same.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Complex, Float

from ..errors import InputError
from ..forward._projection import fourier_to_volume, volume_to_fourier
from ..ndimage._fourier import freq_indices
from ..ndimage._masks import soft_sphere_mask
from ._diagnostics import centre_of_mass_offset


def solvent_mask(box: int, pixel_size: float, diameter: float | None = None) -> np.ndarray:
    """``(box, box, box)`` float32: 1 within ``diameter / 2`` Å of the centre, a raised-cosine edge of
    ``max(2, 0.1 box)`` px beyond it, then 0. ``diameter=None``: 0.8 of the box (the edge reaching the box
    face, :func:`jaxcryo.ndimage.soft_sphere_mask`'s default)."""
    if diameter is None:
        return soft_sphere_mask(box)
    if not (np.isfinite(diameter) and diameter > 0):
        raise InputError(f"{{param}} {diameter!r}: expected a positive diameter in A", param="particle_diameter")
    return soft_sphere_mask(box, 0.5 * float(diameter) / float(pixel_size))


def masked_fourier(vol_f: Complex[Array, "n n n"], mask: Float[ArrayLike, "n n n"]) -> Complex[Array, "n n n"]:
    """``vol_f`` with the real-space ``mask`` applied (centred Fourier in and out)."""
    return volume_to_fourier(fourier_to_volume(vol_f) * jnp.asarray(mask, jnp.real(vol_f).dtype))


def shift_fourier(vol_f: Complex[Array, "n n n"], shift_px: Float[ArrayLike, "3"]) -> Complex[Array, "n n n"]:
    """``vol_f`` translated by ``shift_px`` = ``(z, y, x)`` voxels (the content moves by that vector)."""
    n = vol_f.shape[-1]
    k = freq_indices(n).astype(np.float64) / n
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    s = np.asarray(shift_px, np.float64)
    ramp = np.exp(-2j * np.pi * (kz * s[0] + ky * s[1] + kx * s[2]))
    return vol_f * jnp.asarray(ramp, vol_f.dtype)


def recentre(half_maps: list, rotations: np.ndarray, shifts: np.ndarray, pixel_size: float,
             min_offset_px: float = 1.0) -> tuple[list, np.ndarray, np.ndarray]:
    """Move the half maps (centred Fourier volumes) so that the density of their average is centred
    (:func:`jaxcryo.poses._diagnostics.centre_of_mass_offset`), and the particles' origins (``(n, 2)`` Å,
    RELION's ``rlnOriginX/YAngst``; ``rotations`` RELION matrices ``(n, 3, 3)``) so that every image's model is
    unchanged: a map moved by ``t`` (x, y, z) projects along ``A`` moved by ``(A t)[:2]``, which the origin
    absorbs (``o' = o + (A t)[:2]``). Returns ``(maps, shifts, offset_px)`` (``offset_px``: the ``(z, y, x)``
    centre-of-mass offset found; nothing moves when it is under ``min_offset_px``)."""
    avg = np.asarray(fourier_to_volume(0.5 * (half_maps[0] + half_maps[1])), np.float64)
    c = centre_of_mass_offset(avg, pixel_size)
    if np.linalg.norm(c) < min_offset_px:
        return list(half_maps), np.asarray(shifts, np.float64), c
    maps = [shift_fourier(v, -c) for v in half_maps]
    t = -c[::-1] * pixel_size  # (x, y, z) Å
    new = np.asarray(shifts, np.float64) + np.einsum("nij,j->ni", np.asarray(rotations, np.float64), t)[:, :2]
    return maps, new, c
