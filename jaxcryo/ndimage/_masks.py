"""Soft edges and masks on the voxel grid: the one raised-cosine edge every filter and mask uses."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float

from ..errors import InputError
from ._fourier import radius_grid


def raised_cosine(r: Float[ArrayLike, "..."], start: float, width: float) -> np.ndarray:
    """The raised-cosine fall-off: 1 for ``r <= start``, ``0.5 (1 + cos(pi (r - start) / width))`` for
    ``start < r < start + width``, 0 for ``r >= start + width`` (a hard step at ``start`` when ``width == 0``).

    Used for every soft edge in jaxcryo: real-space masks (``r`` in voxels) and frequency limits (``r`` in
    Fourier shells; a limit centred on shell ``k`` with ``width`` shells is ``raised_cosine(r, k - width / 2,
    width)``)."""
    r = np.asarray(r, dtype=np.float64)
    if width <= 0:
        return (r <= start).astype(np.float64)
    t = np.clip((r - start) / width, 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * t))


def frequency_edge(r: Float[ArrayLike, "..."], k: float, width: float = 2.0) -> np.ndarray:
    """A soft frequency limit at shell ``k``: 1 below ``k - width/2``, 0 beyond ``k + width/2`` (value 0.5 at
    ``k``)."""
    return raised_cosine(r, k - width / 2.0, width)


def soft_sphere_mask(n: int, radius: float | None = None, width: float | None = None) -> np.ndarray:
    """Real-space soft spherical mask ``(n, n, n)`` float32, centred at ``n // 2`` on every axis.

    1 for ``r <= radius``, a raised-cosine fall-off (:func:`raised_cosine`) over ``width`` voxels, 0 for
    ``r >= radius + width``. Defaults: ``radius = 0.4 n`` and ``width = max(2, 0.1 n)`` voxels, so the mask
    reaches zero at about the box edge (``0.5 n``).
    """
    r0 = 0.4 * n if radius is None else float(radius)
    w = max(2.0, 0.1 * n) if width is None else float(width)
    if r0 <= 0 or w < 0:
        raise InputError(f"soft_sphere_mask: radius must be > 0 and width >= 0, got radius={r0}, width={w}")
    return raised_cosine(radius_grid(n, 3), r0, w).astype(np.float32)


#: RELION's ``relion_mask_create`` settings as its GUI job sets them (the command's own defaults, no low-pass,
#: no extension and no soft edge, give a hard binary mask): low-pass 15 Å, extension 3 px, soft edge 3 px.
MASK_LOWPASS_A = 15.0
MASK_EXTEND_PX = 3.0
MASK_SOFT_EDGE_PX = 3.0
#: RELION's soft edge of the particle-diameter mask in refinement (``--width_mask_edge``), voxels.
SPHERE_SOFT_EDGE_PX = 5.0


def spherical_mask(n: int, diameter: float, pixel_size: float, soft_edge: float = SPHERE_SOFT_EDGE_PX) -> np.ndarray:
    """Soft spherical mask ``(n, n, n)`` for a particle of ``diameter`` Å: 1 inside the radius
    ``diameter / (2 pixel_size)`` voxels, then a raised-cosine edge of ``soft_edge`` voxels outwards (as RELION's
    particle-diameter mask, default edge 5 px). Centred at ``n // 2``."""
    if not (diameter > 0 and pixel_size > 0):
        raise InputError(f"spherical_mask: diameter and pixel_size must be > 0, got {diameter} Å, {pixel_size} Å")
    return soft_sphere_mask(n, diameter / (2.0 * pixel_size), soft_edge)


def shell_of(n: int, pixel_size: float, resolution: float) -> int:
    """The Fourier shell of ``resolution`` Å in a box of ``n``: ``round(n * pixel_size / resolution)``, rounding
    halves up as RELION's ``ROUND``."""
    return int(np.floor(n * pixel_size / resolution + 0.5))


def low_pass(volume: Float[ArrayLike, "n n n"], pixel_size: float, resolution: float,
             width: float = 2.0) -> np.ndarray:
    """Real-space ``volume`` low-pass filtered at ``resolution`` Å: a raised-cosine edge of ``width`` shells
    (:func:`frequency_edge`) centred on shell :func:`shell_of` (RELION's ``lowPassFilterMap``). float32."""
    v = np.asarray(volume, np.float64)
    n = v.shape[-1]
    if not (resolution > 0 and pixel_size > 0):
        raise InputError(f"low_pass: resolution and pixel_size must be > 0, got {resolution} Å, {pixel_size} Å")
    edge = np.fft.ifftshift(frequency_edge(radius_grid(n, 3), shell_of(n, pixel_size, resolution), width))
    return np.fft.ifftn(np.fft.fftn(v) * edge).real.astype(np.float32)


_FAR = 1e9  # "no masked voxel within reach" in the squared distances below


def _min_plus_axis(d, reach: int, axis: int):
    """``out[x] = min_{|o| <= reach} d[x + o] + o^2`` along ``axis`` (outside the box counts as far)."""
    n = d.shape[axis]
    pad = [(0, 0)] * d.ndim
    pad[axis] = (reach, reach)
    dp = jnp.pad(d, pad, constant_values=_FAR)

    def body(i, best):
        o = (i - reach).astype(d.dtype)
        return jnp.minimum(best, jax.lax.dynamic_slice_in_dim(dp, i, n, axis) + o * o)

    return jax.lax.fori_loop(0, 2 * reach + 1, body, d)


def _squared_distance(binary, reach: int):
    """Squared Euclidean distance (voxels^2) of every voxel to the nearest True voxel of ``binary``, exact up
    to ``reach`` voxels (separable min-plus transform over offsets ``-reach..reach`` per axis; farther voxels
    get a value > ``reach^2``)."""
    d = jnp.where(binary, 0.0, _FAR).astype(jnp.float32)
    for axis in range(3):  # three static axes, unrolled at trace time
        d = _min_plus_axis(d, reach, axis)
    return d


@partial(jax.jit, static_argnames=("extend", "soft_edge"))
def _grow(binary, extend: float, soft_edge: float):
    """(binary mask extended by ``extend`` voxels, or shrunk for a negative value; distance of every voxel to
    it, in voxels, exact below ``soft_edge``)."""
    if extend > 0:
        binary = binary | (_squared_distance(binary, int(np.ceil(extend))) < extend * extend)
    elif extend < 0:
        binary = binary & ~(_squared_distance(~binary, int(np.ceil(-extend))) < extend * extend)
    if soft_edge > 0:
        return binary, jnp.sqrt(_squared_distance(binary, int(np.ceil(soft_edge))))
    return binary, jnp.where(binary, 0.0, _FAR)


def auto_threshold(volume: Float[ArrayLike, "n n n"]) -> float:
    """A binarisation threshold from the map's statistics: the solvent (the voxels outside the sphere of radius
    ``n/2``, the box corners) mean plus the larger of 5 solvent standard deviations and a tenth of the range
    from that mean to the map's maximum."""
    v = np.asarray(volume, np.float64)
    n = v.shape[-1]
    solvent = v[radius_grid(n, 3) > n / 2]
    if solvent.size < 2:
        raise InputError(f"auto_threshold: a box of {n} has no solvent corners to measure; give the threshold")
    mu, sd = float(solvent.mean()), float(solvent.std())
    return mu + max(5.0 * sd, 0.1 * (float(v.max()) - mu))


def auto_mask(volume: Float[ArrayLike, "n n n"], pixel_size: float, lowpass: float | None = MASK_LOWPASS_A,
              threshold: float | None = None, extend: float = MASK_EXTEND_PX,
              soft_edge: float = MASK_SOFT_EDGE_PX) -> np.ndarray:
    """Soft mask ``(n, n, n)`` float32 in [0, 1] from a map, as RELION's ``relion_mask_create``.

    1. low-pass the map at ``lowpass`` Å (:func:`low_pass`; None or 0: no filter);
    2. binarise: voxels ``>= threshold`` (default :func:`auto_threshold` of the filtered map);
    3. extend the binary mask by ``extend`` voxels (every voxel closer than ``extend`` to it joins; a negative
       value shrinks it the same way);
    4. soft edge: a voxel at distance ``d`` from the extended mask gets ``0.5 (1 + cos(pi d / soft_edge))`` for
       ``d < soft_edge`` (:func:`raised_cosine`), 0 beyond.

    The distance transforms run jitted (exact Euclidean distances up to the extension and the edge width).
    Raises :class:`InputError` when nothing reaches the threshold.
    """
    v = np.asarray(volume, np.float32)
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise InputError(f"auto_mask: expected a cubic 3D map, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise InputError("auto_mask: the map has non-finite values (NaN or inf)")
    if not (np.isfinite(soft_edge) and soft_edge >= 0):
        raise InputError(f"auto_mask: soft_edge must be >= 0 voxels, got {soft_edge}")
    if not np.isfinite(extend):
        raise InputError(f"auto_mask: extend must be a finite number of voxels, got {extend}")
    if lowpass:
        v = low_pass(v, pixel_size, lowpass)
    t = auto_threshold(v) if threshold is None else float(threshold)
    binary = v >= t
    if not binary.any():
        raise InputError(f"auto_mask: no voxel reaches the threshold {t:.4g} (map maximum {float(v.max()):.4g})")
    binary, dist = _grow(jnp.asarray(binary), float(extend), float(soft_edge))
    binary, dist = np.asarray(binary), np.asarray(dist, np.float64)
    soft = raised_cosine(dist, 0.0, soft_edge) if soft_edge > 0 else np.zeros_like(dist)
    return np.where(binary, 1.0, soft).astype(np.float32)
