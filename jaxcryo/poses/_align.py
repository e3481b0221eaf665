"""Maps and poses against a ground truth (simulations): a map put into a reference's frame, and the FSC and pose
errors after that alignment.

Projections determine a map only up to a global rotation (and, ab initio, its mirror image): given the global
rotation and hand found by :func:`jaxcryo.rotations.align_rotations` from the poses, :func:`align_map_to` rotates
the map in real space (order-1 interpolation) and translates it by FFT cross-correlation; :func:`truth_metrics`
reports the FSC to the truth after that alignment and the pose errors.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float

from ..errors import InputError
from ..ndimage._metrics import first_shell_below, fsc as fsc_fn
from ..rotations._grids import MIRROR, align_rotations


class MapAlignment(NamedTuple):
    """A map put into a reference's frame (:func:`align_map_to`).

    Attributes:
        volume: the aligned map ``(n, n, n)`` float32.
        shift_px: ``(3,)`` the translation applied after the rotation, ``(x, y, z)`` voxels.
        correlation: the normalised cross-correlation with the reference at that translation.
    """

    volume: np.ndarray
    shift_px: np.ndarray
    correlation: float


def rotate_map(volume: Float[ArrayLike, "n n n"], matrix: Float[ArrayLike, "3 3"]) -> Float[np.ndarray, "n n n"]:
    """``out(x) = volume(x @ matrix)`` for real-space maps ``[z, y, x]`` and row vectors ``x = (x, y, z)``
    about the centre voxel ``n // 2`` (order-1 interpolation, zero outside). A map ``V'(x) = V(x R)`` has the
    Fourier transform ``V'^(k) = V^(k R)`` for orthogonal ``R``, so its images at pose ``A`` are ``V``'s at
    ``A R``."""
    vol = jnp.asarray(volume, jnp.float32)
    n = vol.shape[0]
    c = n // 2
    i = jnp.arange(n, dtype=jnp.float32) - c
    z, y, x = jnp.meshgrid(i, i, i, indexing="ij")
    pts = jnp.stack([x.ravel(), y.ravel(), z.ravel()], axis=-1) @ jnp.asarray(matrix, jnp.float32)
    out = jax.scipy.ndimage.map_coordinates(vol, [pts[:, 2] + c, pts[:, 1] + c, pts[:, 0] + c], order=1,
                                            mode="constant", cval=0.0)
    return np.asarray(out.reshape(vol.shape), np.float32)


def _parabolic(cm, c0, cp) -> float:
    den = cm - 2 * c0 + cp
    return float(np.clip(0.5 * (cm - cp) / den, -0.5, 0.5)) if den < 0 else 0.0


def translate_to(volume: Float[ArrayLike, "n n n"], reference: Float[ArrayLike, "n n n"]) -> MapAlignment:
    """The translation of ``volume`` that best matches ``reference`` (peak of the FFT cross-correlation,
    refined to a fraction of a voxel by a parabola per axis) and the volume so translated (Fourier phase
    shift, periodic)."""
    a = np.asarray(volume, np.float64)
    r = np.asarray(reference, np.float64)
    n = a.shape[0]
    fa, fr = np.fft.fftn(a), np.fft.fftn(r)
    cc = np.real(np.fft.ifftn(np.conj(fa) * fr))  # cc[t] = sum_x a(x) r(x + t)
    peak = np.array(np.unravel_index(int(np.argmax(cc)), cc.shape))
    sub = np.zeros(3)
    for ax in range(3):
        m, p = peak.copy(), peak.copy()
        m[ax], p[ax] = (peak[ax] - 1) % n, (peak[ax] + 1) % n
        sub[ax] = _parabolic(cc[tuple(m)], cc[tuple(peak)], cc[tuple(p)])
    t_zyx = (peak + n // 2) % n - n // 2 + sub  # wrapped to [-n/2, n/2)
    k = np.fft.fftfreq(n)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    phase = np.exp(-2j * np.pi * (kz * t_zyx[0] + ky * t_zyx[1] + kx * t_zyx[2]))  # a(x - t)
    out = np.real(np.fft.ifftn(fa * phase))
    den = np.sqrt(np.sum(out * out) * np.sum(r * r))
    corr = float(np.sum(out * r) / den) if den > 0 else 0.0
    return MapAlignment(out.astype(np.float32), t_zyx[::-1].copy(), corr)


def align_map_to(volume: Float[ArrayLike, "n n n"], reference: Float[ArrayLike, "n n n"],
                 rotation: Float[ArrayLike, "3 3"], mirrored: bool) -> MapAlignment:
    """Put ``volume`` (reconstructed from poses ``est``) into ``reference``'s frame, given
    :func:`jaxcryo.rotations.align_rotations` ``(est, true, mirror=True)``'s ``rotation`` ``G`` and ``mirrored``.

    Poses with ``true_i ~ est'_i @ G`` (``est' = J est J`` when mirrored, ``J`` = :data:`~jaxcryo.rotations.MIRROR`)
    mean that the volume seen at ``est_i`` matches the reference seen at ``true_i``; the aligned map is
    ``V(x G^T J)`` (mirrored) or ``V(x G^T)`` (:func:`rotate_map`, order-1 interpolation in real space),
    then translated onto the reference by cross-correlation (:func:`translate_to`; a map's origin is free
    when the shifts are searched).
    """
    g = np.asarray(rotation, np.float64)
    if g.shape != (3, 3):
        raise InputError(f"{{param}} must be a (3, 3) rotation matrix, got shape {g.shape}", param="rotation")
    m = g.T @ MIRROR if mirrored else g.T
    vol, ref = np.asarray(volume, np.float32), np.asarray(reference, np.float32)
    if vol.shape != ref.shape or vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"volume {vol.shape} and reference {ref.shape} must be cubic maps of the same box")
    return translate_to(rotate_map(vol, m), ref)


def truth_metrics(volume: Float[ArrayLike, "n n n"], rotations: Float[ArrayLike, "m 3 3"],
                  truth: Float[ArrayLike, "n n n"], true_rotations: Float[ArrayLike, "m 3 3"], pixel_size: float,
                  shifts: Float[ArrayLike, "m 2"] | None = None,
                  true_shifts: Float[ArrayLike, "m 2"] | None = None) -> dict:
    """FSC to the ground truth after aligning ``volume`` (poses ``rotations``) to it (:func:`align_map_to`
    with :func:`jaxcryo.rotations.align_rotations` ``mirror=True``), and the pose errors. Shift errors are given
    only when no global rotation or mirror was needed (otherwise the two frames' origins differ)."""
    a = align_rotations(np.asarray(rotations), np.asarray(true_rotations), mirror=True)
    al = align_map_to(volume, truth, a.rotation, a.mirrored)
    f = fsc_fn(al.volume, np.asarray(truth, np.float32), pixel_size=pixel_size)
    angle = float(np.degrees(np.arccos(np.clip((np.trace(a.rotation) - 1) / 2, -1, 1))))
    out = {"fsc05_shell": first_shell_below(f.fsc, 0.5), "fsc0143_shell": first_shell_below(f.fsc, 0.143),
           "resolution_05": float(f.resolution_05), "resolution_0143": float(f.resolution_0143),
           "mirrored": bool(a.mirrored), "global_rotation_deg": angle,
           "map_shift_px": [float(x) for x in al.shift_px], "map_correlation": al.correlation,
           "pose_error_median_deg": float(a.median_deg), "pose_error_mean_deg": float(a.mean_deg),
           "fsc": [float(x) for x in f.fsc]}
    if shifts is not None and true_shifts is not None and not a.mirrored and angle < 0.5:
        out["shift_error_median_px"] = float(np.median(np.linalg.norm(np.asarray(shifts) - np.asarray(true_shifts),
                                                                      axis=1)) / pixel_size)
    return out
