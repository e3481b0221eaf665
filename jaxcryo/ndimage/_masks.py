"""Soft edges and masks on the voxel grid: the one raised-cosine edge every filter and mask uses."""

from __future__ import annotations

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
