"""CTF against RELION's documented formula; rotation conventions."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxcryo.forward._ctf import CTFParams, electron_wavelength, evaluate_ctf
from jaxcryo.ndimage._fourier import freq_grid_2d
from jaxcryo.rotations._rotations import (axis_angle_to_matrix, cryosparc_pose_to_relion, euler_to_matrix, matrix_to_euler,
                               matrix_to_quaternion, quaternion_to_matrix, random_rotations)


def _relion_reference_ctf(kx, ky, du, dv, ang, kv, cs_mm, q0, phase, bfac, scale):
    """RELION's CTF::getCTF written out independently (float64), as in RELION's ctf.h / documentation:
    lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V)); K1 = pi lambda; K2 = pi/2 Cs lambda^3;
    K3 = atan(Q0 / sqrt(1 - Q0^2)); K4 = -B/4; K5 = phase shift (rad);
    deltaf = -(dU + dV)/2 - (dU - dV)/2 cos(2 (atan2(Y, X) - azimuth))   (RELION's negative underfocus);
    CTF = -scale * sin(K1 deltaf u^2 + K2 u^4 - K5 - K3) * exp(K4 u^2)."""
    v = kv * 1e3
    lam = 12.2643247 / np.sqrt(v * (1 + v * 0.978466e-6))
    cs = cs_mm * 1e7
    k1 = np.pi * lam
    k2 = np.pi / 2 * cs * lam**3
    k3 = np.arctan(q0 / np.sqrt(1 - q0 * q0))
    k4 = -bfac / 4.0
    k5 = np.deg2rad(phase)
    u2 = kx * kx + ky * ky
    defocus_average = -(du + dv) * 0.5
    defocus_deviation = -(du - dv) * 0.5
    ell = np.arctan2(ky, kx) - np.deg2rad(ang)
    deltaf = defocus_average + defocus_deviation * np.cos(2 * ell)
    arg = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
    return -scale * np.sin(arg) * np.exp(k4 * u2)


def test_ctf_matches_relion_formula():
    n, px = 64, 1.3
    freqs = freq_grid_2d(n, px, dtype=np.float64)
    cases = [
        (15000.0, 14000.0, 37.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0),
        (22000.0, 21000.0, -60.0, 200.0, 1.4, 0.07, 90.0, 50.0, 0.8),
        (8000.0, 9500.0, 120.0, 300.0, 0.01, 0.2, 35.0, 120.0, 1.0),
    ]
    jax.config.update("jax_enable_x64", True)
    try:
        for c in cases:
            p = CTFParams.create(*c, dtype=np.float64)
            got = np.asarray(evaluate_ctf(p, jnp.asarray(freqs)))
            ref = _relion_reference_ctf(freqs[..., 0], freqs[..., 1], *c)
            assert np.max(np.abs(got - ref)) <= 1e-5, c
    finally:
        jax.config.update("jax_enable_x64", False)
    # float32 default path agrees too
    p = CTFParams.create(*cases[1])
    got32 = np.asarray(evaluate_ctf(p, jnp.asarray(freqs, jnp.float32)))
    assert np.max(np.abs(got32 - _relion_reference_ctf(freqs[..., 0], freqs[..., 1], *cases[1]))) < 1e-3


def test_ctf_batch_shape_and_wavelength():
    p = CTFParams.create(np.array([10000.0, 20000.0, 30000.0]))
    out = evaluate_ctf(p, jnp.asarray(freq_grid_2d(16, 2.0)))
    assert out.shape == (3, 16, 16)
    assert abs(float(electron_wavelength(300.0)) - 0.019687) < 1e-5  # Å at 300 kV


def test_euler_roundtrip_and_relion_matrix():
    rng = np.random.default_rng(0)
    rot, tilt, psi = rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50), rng.uniform(-180, 180, 50)
    A = euler_to_matrix(rot, tilt, psi)
    np.testing.assert_allclose(euler_to_matrix(*matrix_to_euler(A)), A, atol=1e-10)
    # RELION: rot = 90 about z maps x -> ... A(0,1) = cos(psi) cos(tilt) sin(rot) + sin(psi) cos(rot)
    a = euler_to_matrix(90.0, 0.0, 0.0)
    np.testing.assert_allclose(a, [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)
    b = euler_to_matrix(0.0, 90.0, 0.0)
    np.testing.assert_allclose(b, [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-12)
    np.testing.assert_allclose(quaternion_to_matrix(matrix_to_quaternion(A)), A, atol=1e-10)
    R = np.asarray(random_rotations(jax.random.PRNGKey(0), 1000), np.float64)
    np.testing.assert_allclose(R @ np.swapaxes(R, 1, 2), np.broadcast_to(np.eye(3), R.shape), atol=1e-5)
    # Uniform: the mean of each entry vanishes.
    assert np.abs(R.mean(0)).max() < 0.06


def test_axis_angle():
    w = np.array([0.0, 0.0, np.pi / 2])
    np.testing.assert_allclose(axis_angle_to_matrix(w), [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(cryosparc_pose_to_relion(w), axis_angle_to_matrix(w).T)
    np.testing.assert_allclose(axis_angle_to_matrix(np.zeros(3)), np.eye(3))
