"""Pose grids for unknown-pose refinement: rotations (global and local) and in-plane shifts, plus the
rotation distances and the global alignment of two pose sets that pose-error metrics need.

Conventions (RELION's, as everywhere in jaxcryo): a rotation is the matrix ``A`` of
:func:`jaxcryo.rotations.euler_to_matrix` (ZYZ, degrees), acting on row vectors: an image's Fourier transform
at ``(kx, ky)`` is the volume's at ``(kx, ky, 0) @ A``. The third row of ``A`` is the viewing direction (the
beam direction in the map's frame, ``(sin tilt cos rot, sin tilt sin rot, cos tilt)``); ``psi`` turns the
image in its plane. Shifts are RELION origins ``(rlnOriginXAngst, rlnOriginYAngst)`` in Å.

* :func:`so3_grid`: a near-uniform grid of SO(3) at a given angular step (global search);
* :func:`local_offsets` / :func:`local_grid`: the finer-grid neighbours ``A @ O`` of current poses (local
  search);
* :func:`shift_grid`: candidate origins on a square grid or a disc;
* :func:`geodesic_distance_deg`, :func:`covering_radius_deg`, :func:`align_rotations`: distances, the grid's
  measured covering radius, and the pose error after removing the global rotation (and hand) ambiguity.

Grids are NumPy float64 (host-side, built once); :func:`local_grid` also composes JAX arrays (jit-friendly).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ..errors import InputError
from ._rotations import axis_angle_to_matrix, euler_to_matrix, matrix_to_quaternion

#: ``diag(1, 1, -1)``: the mirror through the image plane. A map mirrored by it and seen at pose ``A`` gives
#: the images of the original map at ``J A J`` (``(kx, ky, 0) J = (kx, ky, 0)``), the hand ambiguity of
#: single-particle reconstruction.
MIRROR = np.diag([1.0, 1.0, -1.0])


def _check_positive(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{{param}} must be a number, got {value!r}", param=name) from None
    if not np.isfinite(v) or v <= 0:
        raise InputError(f"{{param}} must be a positive finite number, got {value!r}", param=name)
    return v


def sphere_directions(n: int) -> Float[np.ndarray, "n 3"]:
    """``n`` near-uniform unit vectors ``(n, 3)`` float64 on the sphere: the Fibonacci (golden-angle) spiral
    ``z_i = 1 - (2 i + 1) / n``, azimuth ``i * pi (3 - sqrt 5)``. Deterministic, every point carries the same
    area ``4 pi / n`` (to within the spiral's irregularity)."""
    i = np.arange(n, dtype=np.float64)
    z = 1.0 - (2.0 * i + 1.0) / n
    r = np.sqrt(np.maximum(1.0 - z * z, 0.0))
    phi = i * np.pi * (3.0 - np.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def so3_grid_size(angular_step_deg: float) -> tuple[int, int]:
    """``(n_directions, n_psi)`` of :func:`so3_grid`: ``round(12 (60 / step)^2)`` viewing directions (RELION's
    HEALPix count at its steps 60/2^k: 48 at 30 deg, 192 at 15, 768 at 7.5) and ``round(360 / step)`` in-plane
    angles."""
    step = _check_positive(angular_step_deg, "angular_step_deg")
    if step > 180:
        raise InputError(f"{{param}} must be at most 180 degrees, got {angular_step_deg!r}",
                         param="angular_step_deg")
    return max(1, int(round(12.0 * (60.0 / step) ** 2))), max(1, int(round(360.0 / step)))


def so3_grid(angular_step_deg: float) -> Float[np.ndarray, "r 3 3"]:
    """A near-uniform grid of rotations at about ``angular_step_deg`` sampling: RELION matrices ``(R, 3, 3)``
    float64.

    Viewing directions (third row of ``A``) on the Fibonacci sphere (:func:`sphere_directions`; as many as
    RELION's HEALPix grid has at the same step, :func:`so3_grid_size`), each combined with ``n_psi`` in-plane
    angles ``psi = j * 360 / n_psi``: ``A = euler_to_matrix(rot, tilt, psi)`` with ``(rot, tilt)`` the
    direction's azimuth and polar angle. Uniform directions times uniform in-plane angles sample the Haar
    measure of SO(3). The order is direction-major: ``A[d * n_psi + j]``. Deterministic, no dependency.

    Measured (``tests/test_grids.py``; covering radius = the largest geodesic distance from a Haar-random
    rotation to its nearest grid rotation, the maximum over 20,000 seeded random rotations: a slight
    underestimate of the supremum, e.g. 24.4 and 12.4 deg at steps 30 and 15 with 200,000):

    ========  ==============  ===========  ================
    step      directions      rotations    covering radius
    ========  ==============  ===========  ================
    30 deg    48 x 12 psi         576          24.1 deg
    15 deg    192 x 24 psi      4,608          11.9 deg
    7.5 deg   768 x 48 psi     36,864           6.0 deg
    ========  ==============  ===========  ================

    The covering radius is about 0.8 step. Staggering the in-plane angles from one direction to the next was
    measured not to help (24.1 -> 25.1 deg at step 30, 11.9 -> 12.1 at 15).
    """
    n_dir, n_psi = so3_grid_size(angular_step_deg)
    d = sphere_directions(n_dir)
    rot = np.rad2deg(np.arctan2(d[:, 1], d[:, 0]))
    tilt = np.rad2deg(np.arccos(np.clip(d[:, 2], -1.0, 1.0)))
    psi = np.arange(n_psi, dtype=np.float64) * (360.0 / n_psi)
    rot, psi_ = np.repeat(rot, n_psi), np.tile(psi, n_dir)
    tilt = np.repeat(tilt, n_psi)
    return np.asarray(euler_to_matrix(rot, tilt, psi_))


def local_offsets(step_deg: float, radius_deg: float) -> Float[np.ndarray, "k 3 3"]:
    """The small rotations of a local search: ``expm(skew(w))`` for the axis-angle vectors ``w`` on the cubic
    lattice of spacing ``step_deg`` with ``|w| <= radius_deg`` (a ball of rotation angles), ``(K, 3, 3)``
    float64. The identity is first (``w = 0``), the rest ordered by angle. ``radius_deg < step_deg`` gives
    the identity alone; ``radius = step`` gives 7 offsets, ``2 step`` 33, ``3 step`` 123."""
    step = _check_positive(step_deg, "step_deg")
    radius = _check_positive(radius_deg, "radius_deg")
    if radius > 180:
        raise InputError(f"{{param}} must be at most 180 degrees, got {radius_deg!r}", param="radius_deg")
    m = int(np.floor(radius / step + 1e-9))
    i = np.arange(-m, m + 1, dtype=np.float64)
    w = np.stack(np.meshgrid(i, i, i, indexing="ij"), axis=-1).reshape(-1, 3) * step
    norm = np.linalg.norm(w, axis=-1)
    keep = norm <= radius * (1 + 1e-9)
    w, norm = w[keep], norm[keep]
    w = w[np.argsort(norm, kind="stable")]
    return axis_angle_to_matrix(np.deg2rad(w))


def local_grid(rotations: Float[Array, "b 3 3"], step_deg: float, radius_deg: float) -> Float[Array, "b k 3 3"]:
    """Candidate rotations ``A_b @ O_k`` ``(B, K, 3, 3)`` around each current pose ``A_b`` (``(B, 3, 3)``) for
    the offsets ``O_k`` of :func:`local_offsets` (``geodesic_distance(A_b, A_b O_k) = angle(O_k) <=
    radius_deg``; ``k = 0`` is the current pose itself). NumPy in, NumPy out (float64); a JAX array in gives a
    JAX array of its dtype (usable inside jit, the offsets being constants)."""
    offsets = local_offsets(step_deg, radius_deg)
    if isinstance(rotations, jax.Array):
        if rotations.ndim != 3 or rotations.shape[1:] != (3, 3):
            raise InputError(f"{{param}} must have shape (B, 3, 3), got {tuple(rotations.shape)}", param="rotations")
        return jnp.einsum("bij,kjl->bkil", rotations, jnp.asarray(offsets, rotations.dtype))
    rot = np.asarray(rotations, np.float64)
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise InputError(f"{{param}} must have shape (B, 3, 3), got {rot.shape}", param="rotations")
    return np.einsum("bij,kjl->bkil", rot, offsets)


def shift_grid(max_shift_angstrom: float, step_angstrom: float, disc: bool = False) -> Float[np.ndarray, "t 2"]:
    """Candidate origins ``(T, 2)`` float64 in Å (RELION's ``rlnOriginX/YAngst``): the square grid
    ``step * (i, j)`` with ``|step * i|, |step * j| <= max_shift`` (``disc=True``: ``|o| <= max_shift``,
    RELION's offset range). Ordered by distance from the origin, so ``(0, 0)`` is first (a tie in a score's
    argmax resolves to the smallest shift). ``max_shift = 0`` gives ``[[0, 0]]``."""
    step = _check_positive(step_angstrom, "step_angstrom")
    try:
        ms = float(max_shift_angstrom)
    except (TypeError, ValueError):
        raise InputError(f"{{param}} must be a number, got {max_shift_angstrom!r}",
                         param="max_shift_angstrom") from None
    if not np.isfinite(ms) or ms < 0:
        raise InputError(f"{{param}} must be >= 0, got {max_shift_angstrom!r}", param="max_shift_angstrom")
    m = int(np.floor(ms / step + 1e-9))
    i = np.arange(-m, m + 1, dtype=np.float64) * step
    gy, gx = np.meshgrid(i, i, indexing="ij")
    g = np.stack([gx.reshape(-1), gy.reshape(-1)], axis=-1)
    r = np.linalg.norm(g, axis=-1)
    if disc:
        g, r = g[r <= ms * (1 + 1e-9) + 1e-12], r[r <= ms * (1 + 1e-9) + 1e-12]
    return g[np.argsort(r, kind="stable")]


def geodesic_distance_deg(a: Float[ArrayLike, "... 3 3"],
                          b: Float[ArrayLike, "... 3 3"]) -> Float[Array, "..."] | Float[np.ndarray, "..."]:
    """The rotation angle of ``a b^T`` in degrees (``[0, 180]``; broadcasting over leading axes), the geodesic
    distance on SO(3). Accurate at small and large angles: ``theta = 2 atan2(|a - b|_F / sqrt 8,
    sqrt((1 + tr(a b^T)) / 4))`` (float64: 1e-9 relative below 179 degrees; within 1e-6 degrees of 180, where
    the square root amplifies rounding). NumPy or JAX (JAX if either input is a JAX array)."""
    xp = jnp if isinstance(a, jax.Array) or isinstance(b, jax.Array) else np
    a, b = xp.asarray(a), xp.asarray(b)
    tr = xp.sum(a * b, axis=(-2, -1))
    s = xp.sqrt(xp.sum((a - b) ** 2, axis=(-2, -1)) / 8.0)
    c = xp.sqrt(xp.maximum((1.0 + tr) / 4.0, 0.0))
    return xp.rad2deg(2.0 * xp.arctan2(s, c))


def _nearest_angle_deg(qq: np.ndarray, qg: np.ndarray) -> np.ndarray:
    """Angle (degrees) from each unit quaternion of ``qq`` to the nearest of ``qg``: ``2 acos max |<q, g>|``
    (chunks of about 2**22 dot products)."""
    chunk = max(1, (1 << 22) // max(len(qg), 1))
    dots = np.empty(len(qq))
    for s in range(0, len(qq), chunk):
        dots[s:s + chunk] = np.max(np.abs(qq[s:s + chunk] @ qg.T), axis=1)
    return np.rad2deg(2.0 * np.arccos(np.clip(dots, 0.0, 1.0)))


def nearest_rotation_distance_deg(queries: Float[np.ndarray, "q 3 3"],
                                  grid: Float[np.ndarray, "r 3 3"]) -> Float[np.ndarray, " q"]:
    """For each query rotation the geodesic distance (degrees) to the nearest rotation of ``grid`` (NumPy,
    float64, by unit quaternions, chunked over the queries)."""
    return _nearest_angle_deg(matrix_to_quaternion(np.asarray(queries, np.float64)),
                              matrix_to_quaternion(np.asarray(grid, np.float64)))


def covering_radius_deg(grid: Float[np.ndarray, "r 3 3"], n_samples: int = 20000, seed: int = 0) -> float:
    """The grid's covering radius in degrees, measured: the largest distance from ``n_samples`` Haar-random
    rotations (uniform unit quaternions, seeded) to their nearest grid rotation. A lower bound of the true
    covering radius that approaches it as ``n_samples`` grows."""
    q = np.random.default_rng(seed).standard_normal((int(n_samples), 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return float(_nearest_angle_deg(q, matrix_to_quaternion(np.asarray(grid, np.float64))).max())


class RotationAlignment(NamedTuple):
    """The global alignment of estimated poses to true ones (:func:`align_rotations`).

    Attributes:
        rotation: ``(3, 3)`` proper rotation ``G`` with ``true_i ~ est'_i @ G``.
        mirrored: whether ``est'_i = J est_i J`` (the mirrored hand, ``J = diag(1, 1, -1)``) fitted better
            than ``est'_i = est_i``.
        errors_deg: ``(n,)`` geodesic distance of ``est'_i @ G`` to ``true_i``.
        median_deg, mean_deg: their median and mean.
    """

    rotation: np.ndarray
    mirrored: bool
    errors_deg: np.ndarray
    median_deg: float
    mean_deg: float


def _procrustes(m: np.ndarray) -> np.ndarray:
    """The proper rotation ``G`` maximising ``tr(G^T m)`` (SVD, determinant fixed to +1)."""
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    return u @ np.diag([1.0, 1.0, d]) @ vt


def _fit_global(est: np.ndarray, true: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    # least squares on the chordal distance, then iteratively reweighted toward the geodesic L1 median
    # (weights 1 / error), so that a minority of wrong poses does not pull the alignment
    w = np.ones(len(est))
    g = _procrustes(np.einsum("n,nji,njk->ik", w, est, true))
    for _ in range(iterations):
        err = geodesic_distance_deg(est @ g, true)
        w = 1.0 / np.maximum(err, 1e-3)
        g = _procrustes(np.einsum("n,nji,njk->ik", w, est, true))
    return g, np.asarray(geodesic_distance_deg(est @ g, true))


def align_rotations(est: Float[ArrayLike, "n 3 3"], true: Float[ArrayLike, "n 3 3"], mirror: bool = False,
                    iterations: int = 20) -> RotationAlignment:
    """Align estimated poses to the true ones up to the global ambiguity of a reconstruction, and the pose
    errors after it.

    A map reconstructed from poses ``est`` is the true map in another frame: if it is ``V'(p) = V(p G)``,
    its images at ``est_i`` are the true map's at ``est_i G``, so ``true_i ~ est_i @ G`` for one rotation
    ``G``. With ``mirror=True`` the map may also have the wrong hand (a mirrored map at ``A`` gives the
    images of the original at ``J A J``, ``J = diag(1, 1, -1)``), and the better of ``est`` and ``J est J``
    is used.

    ``G``: the orthogonal Procrustes solution (SVD of ``sum_i est_i^T true_i``), refined by ``iterations``
    steps of iteratively reweighted least squares toward the minimum of the summed geodesic errors (robust
    to a minority of wrong poses). NumPy, float64.
    """
    e = np.asarray(est, np.float64)
    t = np.asarray(true, np.float64)
    if e.ndim != 3 or e.shape[1:] != (3, 3) or t.shape != e.shape or len(e) == 0:
        raise InputError(f"est and true must both have the shape (n, 3, 3) with n >= 1, got {e.shape} and "
                         f"{t.shape}")
    best: RotationAlignment | None = None
    for mirrored in ((False, True) if mirror else (False,)):
        ee = MIRROR @ e @ MIRROR if mirrored else e
        g, err = _fit_global(ee, t, iterations)
        cand = RotationAlignment(g, mirrored, err, float(np.median(err)), float(np.mean(err)))
        if best is None or (cand.median_deg, cand.mean_deg) < (best.median_deg, best.mean_deg):
            best = cand
    assert best is not None
    return best
