"""27-point stencils: the exact Hessian of a local slice operator, assembled on the host in float64.

For a slice operator with a local stencil (:attr:`jaxcryo.forward.SliceOperator.has_local_stencil`) each
image pixel reads the voxels of one grid cube: the nearest voxel, or the 8 corners with trilinear weights.
``H = (1/B) sum_i T_i^T W_i T_i + lam I`` (``T_i`` the interpolation matrix of image ``i``, ``W_i`` its pixel
weights, :func:`jaxcryo.leastsq.weight_image`) then couples each voxel only to its 26 neighbours:

    ``(H z)[j] = sum_o S[o, j] z[j + o]``, ``o`` in ``{-1, 0, 1}^3``,

stored as ``S`` ``(27, N, N, N)`` with offset index ``(oz+1)*9 + (oy+1)*3 + (ox+1)`` (``S[13]`` is the
diagonal). This module knows only that geometry (identical to :func:`jaxcryo.forward.slice_nearest` /
:func:`jaxcryo.forward.slice_trilinear`); :func:`jaxcryo.leastsq.hessian_stencil` feeds it the points and
weights of a projector.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
from jaxtyping import Float

#: The 27 offsets (dz, dy, dx) in {-1, 0, 1}^3 of the stencil, index (dz+1)*9 + (dy+1)*3 + (dx+1).
OFFSETS = [(dz, dy, dx) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
_CORNERS = [(dz, dy, dx) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
# Pairs of cube corners a <= b (lexicographic); a < b gives the 13 "positive" offsets o = b - a, whose
# mirror entries S[-o, j + o] = S[o, j] are filled in at the end.
_PAIRS = [(a, b, (cb[0] - ca[0] + 1) * 9 + (cb[1] - ca[1] + 1) * 3 + (cb[2] - ca[2] + 1))
          for a, ca in enumerate(_CORNERS) for b, cb in enumerate(_CORNERS) if a <= b]
#: (point, corner pair) terms one interpolation point adds (to size chunks of images).
TERMS_PER_POINT = len(_PAIRS)


def assemble(chunks: Iterable, n: int, n_images: int, diagonal: bool, lam: float = 0.0
             ) -> Float[np.ndarray, "27 n n n"]:
    """The stencil ``S`` ``(27, n, n, n)`` float64 of ``(1/n_images) sum T^T W T + lam I``.

    Args:
        chunks: iterable of ``(points, weights)``: ``(P, 3)`` float32 points (Fourier-voxel units of the
            centred ``n``-grid, ``(x, y, z)``) and their ``(P,)`` float64 pixel weights.
        n: box size.
        n_images: the normalisation ``B``.
        diagonal: nearest-voxel geometry (only ``S[13]``, the hit counts); else trilinear (8 corners).
        lam: added to the diagonal.
    """
    nvox = n ** 3
    acc = np.zeros(27 * nvox, np.float64)
    buf_i = buf_v = np.empty(0, np.int64)  # grown to the largest chunk, reused
    for pts, wp in chunks:
        if diagonal:
            c = np.rint(pts).astype(np.int64) + n // 2
            ok = np.all((c >= 0) & (c < n), axis=-1)
            vox = (c[ok, 2] * n + c[ok, 1]) * n + c[ok, 0]
            acc[13 * nvox:14 * nvox] += np.bincount(vox, weights=wp[ok], minlength=nvox)
            continue
        c = pts + np.float32(n // 2)
        c0 = np.floor(c)
        f = (c - c0).astype(np.float32).astype(np.float64)  # as slice_trilinear (float32 fractions)
        i0 = c0.astype(np.int64)
        cw, cidx = [], []
        for dz, dy, dx in _CORNERS:
            iz, iy, ix = i0[:, 2] + dz, i0[:, 1] + dy, i0[:, 0] + dx
            ok = (iz >= 0) & (iz < n) & (iy >= 0) & (iy < n) & (ix >= 0) & (ix < n)
            cidx.append(np.clip((iz * n + iy) * n + ix, 0, nvox - 1))
            cw.append(np.where(ok, (f[:, 2] if dz else 1 - f[:, 2]) * (f[:, 1] if dy else 1 - f[:, 1])
                               * (f[:, 0] if dx else 1 - f[:, 0]), 0.0))  # zero weight: off the grid
        m = wp.size
        if buf_i.size < len(_PAIRS) * m:  # reused: page faults once
            buf_i = np.empty(len(_PAIRS) * m, np.int64)
            buf_v = np.empty(len(_PAIRS) * m, np.float64)
        idx = buf_i[: len(_PAIRS) * m].reshape(len(_PAIRS), m)
        val = buf_v[: len(_PAIRS) * m].reshape(len(_PAIRS), m)
        for r, (a, b, o) in enumerate(_PAIRS):
            np.add(o * nvox, cidx[a], out=idx[r])
            np.multiply(wp * cw[a], cw[b], out=val[r])
        acc += np.bincount(idx.ravel(), weights=val.ravel(), minlength=27 * nvox)
    s = acc.reshape(27, n, n, n) / n_images
    if not diagonal:
        for k, (oz, oy, ox) in enumerate(OFFSETS[14:], start=14):  # S[-o, j] = S[o, j - o]
            src = s[k]
            dst = s[26 - k]
            dst[max(oz, 0):n + min(oz, 0), max(oy, 0):n + min(oy, 0), max(ox, 0):n + min(ox, 0)] = \
                src[max(-oz, 0):n + min(-oz, 0), max(-oy, 0):n + min(-oy, 0), max(-ox, 0):n + min(-ox, 0)]
    s[13] += lam
    return s


def matvec(s: Float[np.ndarray, "27 n n n"], xp=np) -> Callable:
    """``z -> H z`` for the stencil ``s``. ``xp=numpy`` (default): on the host, in ``z``'s precision promoted to
    at least float64; ``xp=jax.numpy``: traceable and differentiable (for jitted solvers), in the precision of
    ``s`` and ``z``."""
    n = s.shape[-1]
    s = xp.asarray(s)

    def mv(z):
        z = xp.asarray(z)
        zp = xp.pad(z, 1)
        out = np.zeros(z.shape, np.result_type(z.dtype, np.float64)) if xp is np else xp.zeros_like(z)
        for k, (dz, dy, dx) in enumerate(OFFSETS):
            out += s[k] * zp[1 + dz:1 + dz + n, 1 + dy:1 + dy + n, 1 + dx:1 + dx + n]  # in place on the host
        return out

    return mv
