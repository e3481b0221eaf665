"""Resolution metrics: Fourier shell correlation, resolution at thresholds, relative errors, masks.

Shells are one Fourier voxel wide (``round(|k|)``, :func:`jaxcryo.ndimage.shell_index`), from shell 0 (DC)
to shell ``n // 2`` (Nyquist); the frequency of shell ``s`` is ``s / (n * pixel_size)`` in 1/Å.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
from jaxtyping import ArrayLike, Bool, Float, Num

from ..errors import InputError
from ._fourier import radius_grid, shell_index
from ._masks import soft_sphere_mask  # noqa: F401  (re-exported where it was)


#: Relative power below which a Fourier shell counts as empty (FSC 0) in :func:`fsc`.
EMPTY_SHELL_POWER = 1e-12


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

    def shell_below(self, threshold: float) -> int:
        """The first shell > 0 whose FSC is below ``threshold`` (:func:`first_shell_below`)."""
        return first_shell_below(self.fsc, threshold)



@lru_cache(maxsize=8)
def _shells(n: int) -> np.ndarray:
    """Flattened shell index of a centred ``n^3`` grid (cached: the fit loop calls :func:`fsc` every epoch)."""
    sh = shell_index(n, 3).ravel()
    sh.setflags(write=False)
    return sh


def _check_maps(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"maps have different shapes {a.shape} and {b.shape}")
    if a.ndim != 3 or len(set(a.shape)) != 1:
        raise InputError(f"maps must be cubic 3D volumes, got shape {a.shape}")
    return a, b


def first_shell_below(fsc: Float[ArrayLike, " s"], threshold: float) -> int:
    """Index of the first shell > 0 whose FSC is below ``threshold`` (``len(fsc)`` if none)."""
    f = np.asarray(fsc)
    below = np.flatnonzero(f[1:] < threshold)
    return int(below[0] + 1) if below.size else len(f)


def resolution_at(frequency: Float[ArrayLike, " s"], fsc: Float[ArrayLike, " s"], threshold: float,
                  pixel_size: float | None = None) -> float:
    """Resolution (Å) where the FSC first falls below ``threshold`` (shell 0 skipped), interpolating
    linearly between the last shell above and the first below. A curve that never falls below reports
    Nyquist, ``2 * pixel_size`` (``pixel_size`` defaults to ``1 / (2 * frequency[-1])``, exact for even
    boxes; pass it for odd ones)."""
    freq = np.asarray(frequency, np.float64)
    f = np.asarray(fsc, np.float64)
    if pixel_size is None:
        pixel_size = 1.0 / (2.0 * freq[-1]) if freq[-1] > 0 else 1.0
    i = first_shell_below(f, threshold)
    if i >= len(f):
        return 2.0 * float(pixel_size)
    f0, f1 = f[i - 1], f[i]
    if f0 < threshold:  # only when shell 0 is already below: nothing resolved, report the box size
        return float(1.0 / freq[i]) if freq[i] > 0 else float("inf")
    t = (f0 - threshold) / (f0 - f1) if f0 != f1 else 0.0
    k = freq[i - 1] + t * (freq[i] - freq[i - 1])
    return float(1.0 / k) if k > 0 else float("inf")


def fsc(map1: Num[ArrayLike, "n n n"], map2: Num[ArrayLike, "n n n"], pixel_size: float = 1.0,
        mask: Float[ArrayLike, "n n n"] | None = None, fourier: bool = False) -> FSCResult:
    """Fourier shell correlation of two maps.

    Args:
        map1, map2: real-space ``(n, n, n)`` maps ``[z, y, x]``, or centred Fourier volumes with
            ``fourier=True``.
        pixel_size: Å/px.
        mask: optional real-space mask (e.g. :func:`soft_sphere_mask`) applied to both (real space only).
        fourier: the inputs are centred Fourier volumes (``jaxcryo.ndimage.fft3c`` convention).

    ``FSC_s = Re sum F1 conj(F2) / sqrt(sum |F1|^2 sum |F2|^2)`` over shell ``s`` (float64 sums), for
    ``s = 0..n//2``; shells where either map has no power (below ``EMPTY_SHELL_POWER`` of its total) get 0.
    Raises :class:`InputError` for maps of different shapes or non-cubic maps.
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
    sh = _shells(n)
    nsh = n // 2 + 1
    keep = sh < nsh
    sh = sh[keep]
    fa, fb = fa.ravel()[keep], fb.ravel()[keep]
    num = np.bincount(sh, weights=np.real(fa * np.conj(fb)), minlength=nsh)
    d1 = np.bincount(sh, weights=np.abs(fa) ** 2, minlength=nsh)
    d2 = np.bincount(sh, weights=np.abs(fb) ** 2, minlength=nsh)
    # A shell is empty when either map has no power there, or only rounding residue: less than
    # EMPTY_SHELL_POWER of that map's total power (float32 rounding leaves ~1e-15), e.g. beyond a sharp
    # low-pass. Its FSC is 0 rather than the correlation of rounding noise.
    empty = (d1 <= EMPTY_SHELL_POWER * d1.sum()) | (d2 <= EMPTY_SHELL_POWER * d2.sum())
    den = np.sqrt(d1 * d2)
    curve = np.where(empty, 0.0, num / np.where(empty, 1.0, den))
    freq = np.arange(nsh) / (n * pixel_size)
    return FSCResult(freq, curve, resolution_at(freq, curve, 0.143, pixel_size),
                     resolution_at(freq, curve, 0.5, pixel_size))


def fsc_record(volume: Num[ArrayLike, "n n n"] | None, reference: Num[ArrayLike, "n n n"] | None,
               pixel_size: float = 1.0, mask: Float[ArrayLike, "n n n"] | None = None, fourier: bool = False,
               key: str = "ref") -> dict:
    """The per-epoch record of the FSC of ``volume`` against ``reference`` (one definition for every loop
    that tracks a reference: ``fit``, ``reconstruct``, refinement, ab initio).

    Returns ``{"resolution_05_<key>": Å, "fsc_<key>": [per shell]}`` from :func:`fsc` (same arguments);
    both ``None`` when ``reference`` (or ``volume``) is ``None``.
    """
    if volume is None or reference is None:
        return {f"resolution_05_{key}": None, f"fsc_{key}": None}
    r = fsc(volume, reference, pixel_size=pixel_size, mask=mask, fourier=fourier)
    return {f"resolution_05_{key}": float(r.resolution_05), f"fsc_{key}": [float(x) for x in r.fsc]}


def relative_error(x: Num[ArrayLike, "*d"], ref: Num[ArrayLike, "*d"],
                   mask: Bool[ArrayLike, "*d"] | None = None) -> float:
    """``||x - ref|| / ||ref||`` (over the ``mask`` entries if given); works for complex arrays."""
    x, ref = np.asarray(x), np.asarray(ref)
    if x.shape != ref.shape:
        raise InputError(f"relative_error: shapes differ, {x.shape} and {ref.shape}")
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask, bool), ref.shape)
        x, ref = x[m], ref[m]
    x, ref = x.astype(np.complex128 if np.iscomplexobj(x) or np.iscomplexobj(ref) else np.float64), ref
    num = float(np.linalg.norm(x - ref))
    den = float(np.linalg.norm(ref))
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den
