"""Resolution metrics: Fourier shell correlation, resolution at thresholds, relative errors, masks.

Shells are one Fourier voxel wide (``round(|k|)``, :func:`jaxcryo.fourier.shell_index`), from shell 0 (DC)
to shell ``n // 2`` (Nyquist); the frequency of shell ``s`` is ``s / (n * pixel_size)`` in 1/Å.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .errors import InputError
from .fourier import radius_grid, shell_index


class FSCResult(NamedTuple):
    """``frequency`` (1/Å) and ``fsc`` per shell ``0..n//2``; resolutions (Å) at 0.143 and 0.5."""

    frequency: np.ndarray
    fsc: np.ndarray
    resolution_0143: float
    resolution_05: float

    def to_dict(self) -> dict:
        """``{"resolution_0143": Å, "resolution_05": Å, "frequency": [...], "fsc": [...]}`` (JSON-ready)."""
        return {
            "resolution_0143": float(self.resolution_0143),
            "resolution_05": float(self.resolution_05),
            "frequency": [float(x) for x in self.frequency],
            "fsc": [float(x) for x in self.fsc],
        }


def soft_sphere_mask(n: int, radius: float | None = None, width: float | None = None) -> np.ndarray:
    """Real-space soft spherical mask ``(n, n, n)`` float32: 1 inside ``radius`` (default ``0.4 n``), a
    raised-cosine edge of ``width`` voxels (default ``0.1 n``, at least 2), 0 outside."""
    r0 = 0.4 * n if radius is None else float(radius)
    w = max(2.0, 0.1 * n) if width is None else float(width)
    r = radius_grid(n, 3)
    m = np.where(r <= r0, 1.0, np.where(r >= r0 + w, 0.0, 0.5 * (1 + np.cos(np.pi * (r - r0) / w))))
    return m.astype(np.float32)


def _check_maps(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"maps have different shapes {a.shape} and {b.shape}")
    if a.ndim != 3 or len(set(a.shape)) != 1:
        raise InputError(f"maps must be cubic 3D volumes, got shape {a.shape}")
    return a, b


def first_shell_below(fsc, threshold: float) -> int:
    """Index of the first shell > 0 whose FSC is below ``threshold`` (``len(fsc)`` if none)."""
    f = np.asarray(fsc)
    below = np.flatnonzero(f[1:] < threshold)
    return int(below[0] + 1) if below.size else len(f)


def resolution_at(frequency, fsc, threshold: float, pixel_size: float | None = None) -> float:
    """Resolution (Å) where the FSC first falls below ``threshold`` (shell 0 skipped), interpolating
    linearly between the last shell above and the first below. A curve that never falls below reports
    Nyquist, ``2 * pixel_size`` (``pixel_size`` defaults to ``1 / (2 * frequency[-1])``)."""
    freq = np.asarray(frequency, np.float64)
    f = np.asarray(fsc, np.float64)
    if pixel_size is None:
        pixel_size = 1.0 / (2.0 * freq[-1]) if freq[-1] > 0 else 1.0
    i = first_shell_below(f, threshold)
    if i >= len(f):
        return 2.0 * float(pixel_size)
    f0, f1 = f[i - 1], f[i]
    t = (f0 - threshold) / (f0 - f1) if f0 != f1 else 0.0
    k = freq[i - 1] + t * (freq[i] - freq[i - 1])
    return float(1.0 / k) if k > 0 else float("inf")


def fsc(map1, map2, pixel_size: float = 1.0, mask=None, fourier: bool = False) -> FSCResult:
    """Fourier shell correlation of two maps.

    Args:
        map1, map2: real-space ``(n, n, n)`` maps ``[z, y, x]``, or centred Fourier volumes with
            ``fourier=True``.
        pixel_size: Å/px.
        mask: optional real-space mask (e.g. :func:`soft_sphere_mask`) applied to both (real space only).
    """
    a, b = _check_maps(map1, map2)
    n = a.shape[0]
    if fourier:
        if mask is not None:
            raise InputError("a real-space mask cannot be applied to Fourier volumes")
        fa, fb = a.astype(np.complex128), b.astype(np.complex128)
    else:
        if mask is not None:
            a, b = a * mask, b * mask
        fa = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(a.astype(np.float64))))
        fb = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(b.astype(np.float64))))
    sh = shell_index(n, 3).ravel()
    nsh = n // 2 + 1
    keep = sh < nsh
    sh = sh[keep]
    fa, fb = fa.ravel()[keep], fb.ravel()[keep]
    num = np.bincount(sh, weights=np.real(fa * np.conj(fb)), minlength=nsh)
    d1 = np.bincount(sh, weights=np.abs(fa) ** 2, minlength=nsh)
    d2 = np.bincount(sh, weights=np.abs(fb) ** 2, minlength=nsh)
    den = np.sqrt(d1 * d2)
    curve = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
    freq = np.arange(nsh) / (n * pixel_size)
    return FSCResult(freq, curve, resolution_at(freq, curve, 0.143, pixel_size),
                     resolution_at(freq, curve, 0.5, pixel_size))


def relative_error(x, ref, mask=None) -> float:
    """``||x - ref|| / ||ref||`` (over the ``mask`` entries if given); works for complex arrays."""
    x, ref = np.asarray(x), np.asarray(ref)
    if mask is not None:
        m = np.asarray(mask, bool)
        x, ref = x[m], ref[m]
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))
