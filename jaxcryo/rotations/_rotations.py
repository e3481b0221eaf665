"""Rotations in RELION's convention, and conversions from the conventions of other packages.

The one rotation representation used inside jaxcryo is RELION's matrix ``A = Euler_angles2matrix(rot,
tilt, psi)`` (ZYZ, degrees). An image's Fourier transform at the 2D frequency ``k = (kx, ky)`` equals the
volume's Fourier transform at the 3D point ``(kx, ky, 0) @ A`` (row vector times ``A``).

cryoDRGN's pose matrices ``R`` act on row vectors in the same way (``coords @ R``), so they equal ``A``.
cryoSPARC's ``alignments3D/pose`` is an axis-angle vector ``w``; ``A = expm(skew(w)).T``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def euler_to_matrix(rot, tilt, psi):
    """RELION ``Euler_angles2matrix``: ZYZ Euler angles in degrees -> rotation matrices.

    Args:
        rot, tilt, psi: arrays of the same shape ``(...)`` in degrees.

    Returns:
        ``(..., 3, 3)`` matrices ``A``.
    """
    xp = jnp if any(isinstance(a, jax.Array) for a in (rot, tilt, psi)) else np
    a, b, g = (xp.deg2rad(xp.asarray(t)) for t in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = xp.cos(a), xp.sin(a), xp.cos(b), xp.sin(b), xp.cos(g), xp.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    row0 = xp.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], axis=-1)
    row1 = xp.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], axis=-1)
    row2 = xp.stack([sc, ss, cb], axis=-1)
    return xp.stack([row0, row1, row2], axis=-2)


def matrix_to_euler(A):
    """RELION ``Euler_matrix2angles``: rotation matrices ``(..., 3, 3)`` -> (rot, tilt, psi) in degrees.

    NumPy, float64. Round trip: ``euler_to_matrix(*matrix_to_euler(A)) == A``.
    """
    A = np.asarray(A, dtype=np.float64)
    eps = np.finfo(np.float32).eps
    abs_sb = np.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    regular = abs_sb > 16 * eps
    gamma = np.arctan2(A[..., 1, 2], -A[..., 0, 2])
    alpha = np.arctan2(A[..., 2, 1], A[..., 2, 0])
    sg = np.sin(gamma)
    with np.errstate(divide="ignore", invalid="ignore"):
        sign_sb = np.where(
            np.abs(sg) < eps,
            np.sign(-A[..., 0, 2] / np.cos(gamma)),
            np.where(sg > 0, np.sign(A[..., 1, 2]), -np.sign(A[..., 1, 2])),
        )
    beta = np.arctan2(sign_sb * abs_sb, A[..., 2, 2])
    # Gimbal lock: tilt = 0 or 180.
    up = A[..., 2, 2] > 0
    alpha = np.where(regular, alpha, 0.0)
    beta = np.where(regular, beta, np.where(up, 0.0, np.pi))
    gamma = np.where(
        regular,
        gamma,
        np.where(up, np.arctan2(-A[..., 1, 0], A[..., 0, 0]), np.arctan2(A[..., 1, 0], -A[..., 0, 0])),
    )
    return np.rad2deg(alpha), np.rad2deg(beta), np.rad2deg(gamma)


def quaternion_to_matrix(q):
    """Unit quaternions ``(..., 4)`` as ``(w, x, y, z)`` -> rotation matrices ``(..., 3, 3)``.

    The matrix is the usual active rotation of column vectors, ``R v``; use it as a RELION ``A`` (which acts
    on row vectors) only if that is the convention of the source.
    """
    xp = jnp if isinstance(q, jax.Array) else np
    q = q / xp.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return xp.stack(
        [
            xp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            xp.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            xp.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def matrix_to_quaternion(R):
    """Rotation matrices ``(..., 3, 3)`` -> unit quaternions ``(..., 4)`` ``(w, x, y, z)`` with ``w >= 0``.

    Inverse of :func:`quaternion_to_matrix` (NumPy, float64).
    """
    R = np.asarray(R, dtype=np.float64)
    tr = R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2]
    # Shepperd's method, vectorised by choosing the largest of the four candidates.
    cands = np.stack(
        [1 + tr, 1 + 2 * R[..., 0, 0] - tr, 1 + 2 * R[..., 1, 1] - tr, 1 + 2 * R[..., 2, 2] - tr], -1
    )
    i = np.argmax(cands, axis=-1)
    s = np.sqrt(np.maximum(np.take_along_axis(cands, i[..., None], -1)[..., 0], 1e-300))
    q = np.empty(R.shape[:-2] + (4,))
    w = np.stack([s / 2, (R[..., 2, 1] - R[..., 1, 2]) / (2 * s), (R[..., 0, 2] - R[..., 2, 0]) / (2 * s),
                  (R[..., 1, 0] - R[..., 0, 1]) / (2 * s)], -1)
    x = np.stack([(R[..., 2, 1] - R[..., 1, 2]) / (2 * s), s / 2, (R[..., 0, 1] + R[..., 1, 0]) / (2 * s),
                  (R[..., 0, 2] + R[..., 2, 0]) / (2 * s)], -1)
    y = np.stack([(R[..., 0, 2] - R[..., 2, 0]) / (2 * s), (R[..., 0, 1] + R[..., 1, 0]) / (2 * s), s / 2,
                  (R[..., 1, 2] + R[..., 2, 1]) / (2 * s)], -1)
    z = np.stack([(R[..., 1, 0] - R[..., 0, 1]) / (2 * s), (R[..., 0, 2] + R[..., 2, 0]) / (2 * s),
                  (R[..., 1, 2] + R[..., 2, 1]) / (2 * s), s / 2], -1)
    q = np.choose(i[..., None], [w, x, y, z])
    q = q * np.where(q[..., :1] < 0, -1.0, 1.0)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def axis_angle_to_matrix(w):
    """Axis-angle vectors ``(..., 3)`` (angle = norm, radians) -> ``expm(skew(w))`` ``(..., 3, 3)`` (Rodrigues).

    This is the rotation cryoSPARC stores in ``alignments3D/pose``; RELION's ``A`` is its transpose, see
    :func:`cryosparc_pose_to_relion`.
    """
    w = np.asarray(w, dtype=np.float64)
    theta = np.linalg.norm(w, axis=-1)[..., None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        k = np.where(theta[..., 0] > 1e-12, w / np.maximum(theta[..., 0], 1e-300), 0.0)
    K = np.zeros(w.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2] = -k[..., 2], k[..., 1]
    K[..., 1, 0], K[..., 1, 2] = k[..., 2], -k[..., 0]
    K[..., 2, 0], K[..., 2, 1] = -k[..., 1], k[..., 0]
    eye = np.broadcast_to(np.eye(3), K.shape)
    return eye + np.sin(theta) * K + (1 - np.cos(theta)) * (K @ K)


def cryosparc_pose_to_relion(w):
    """cryoSPARC ``alignments3D/pose`` axis-angle ``(..., 3)`` -> RELION matrices ``A`` ``(..., 3, 3)``."""
    return np.swapaxes(axis_angle_to_matrix(w), -1, -2)


def random_rotations(key, n: int, dtype=jnp.float32):
    """``n`` rotation matrices drawn uniformly (Haar measure) from SO(3), via random unit quaternions.

    Deterministic for a given ``key``. Returns a ``(n, 3, 3)`` JAX array.
    """
    q = jax.random.normal(key, (n, 4), dtype=jnp.float64 if dtype == jnp.float64 else jnp.float32)
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    return quaternion_to_matrix(q).astype(dtype)


def preferred_orientations(seed: int, n: int, views=((0.0, 0.0, 1.0), (1.0, 0.0, 0.0)), concentration: float = 8.0,
                           background: float = 0.4) -> np.ndarray:
    """``n`` RELION rotation matrices ``(n, 3, 3)`` float64 with a preferred-orientation distribution, as real
    data sets have: a fraction ``background`` uniform on SO(3), the rest with viewing directions (the third
    row of ``A``, the beam direction in the map's frame) drawn from von Mises-Fisher distributions of
    ``concentration`` about the unit ``views`` (chosen evenly), in-plane angle uniform. Seeded."""
    rng = np.random.default_rng(seed)
    views = np.asarray(views, np.float64)
    views = views / np.linalg.norm(views, axis=1, keepdims=True)
    rots = np.asarray(random_rotations(jax.random.PRNGKey(seed), n, jnp.float64 if jax.config.jax_enable_x64
                                       else jnp.float32), np.float64)
    pref = rng.random(n) >= background
    k = int(pref.sum())
    if k:
        mu = views[rng.integers(0, len(views), k)]
        # von Mises-Fisher on S^2 (Wood's method for p = 3): w = cos(angle to mu)
        u = rng.random(k)
        w = 1.0 + np.log(u + (1.0 - u) * np.exp(-2.0 * concentration)) / concentration
        t = rng.standard_normal((k, 3))
        t -= np.sum(t * mu, axis=1, keepdims=True) * mu
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        d = w[:, None] * mu + np.sqrt(np.maximum(1.0 - w * w, 0.0))[:, None] * t
        # a rotation whose third row is d, then a uniform in-plane angle about it
        a = np.where(np.abs(d[:, :1]) < 0.9, np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 1.0, 0.0]]))
        r0 = np.cross(a, d)
        r0 /= np.linalg.norm(r0, axis=1, keepdims=True)
        r1 = np.cross(d, r0)
        psi = rng.uniform(0.0, 2 * np.pi, k)
        c, s_ = np.cos(psi)[:, None], np.sin(psi)[:, None]
        rots[pref] = np.stack([c * r0 + s_ * r1, -s_ * r0 + c * r1, d], axis=1)
    return rots


def perturb_rotations(rotations, angle_deg: float, seed: int = 0) -> np.ndarray:
    """Each RELION matrix ``A`` rotated by exactly ``angle_deg`` about a uniformly random axis (``A @ R_i``,
    a rotation of the map's frame seen by that image): ``(n, 3, 3)`` float64, seeded. The geodesic distance
    of each result to its input is ``angle_deg``."""
    rots = np.asarray(rotations, np.float64)
    rng = np.random.default_rng(seed)
    axis = rng.standard_normal((len(rots), 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    return rots @ axis_angle_to_matrix(axis * np.deg2rad(float(angle_deg)))
