"""Pose grids (issue 11): the SO(3) grid's size and measured covering radius (the numbers in
jaxcryo.rotations._grids.so3_grid's docstring), local grids, shift grids, geodesic distances, global alignment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcryo.errors import InputError
from jaxcryo.rotations._grids import (MIRROR, align_rotations, covering_radius_deg, geodesic_distance_deg, local_grid,
                           local_offsets, nearest_rotation_distance_deg, shift_grid, so3_grid, so3_grid_size)
from jaxcryo.rotations._rotations import axis_angle_to_matrix, euler_to_matrix, random_rotations


def _random_rotations(seed, n):
    q = np.random.default_rng(seed).standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
                     np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
                     np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], -2)


@pytest.mark.parametrize("step,n_dir,n_psi,covering", [(30.0, 48, 12, 24.1), (15.0, 192, 24, 11.9),
                                                       (7.5, 768, 48, 6.0)])
def test_so3_grid_size_and_covering_radius(step, n_dir, n_psi, covering):
    """The documented table: sizes, and the covering radius measured with 20,000 random rotations."""
    g = so3_grid(step)
    assert so3_grid_size(step) == (n_dir, n_psi)
    assert g.shape == (n_dir * n_psi, 3, 3) and g.dtype == np.float64
    np.testing.assert_allclose(g @ np.swapaxes(g, -1, -2), np.broadcast_to(np.eye(3), g.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(g), 1.0, atol=1e-12)
    r = covering_radius_deg(g, n_samples=20000, seed=0)
    assert abs(r - covering) < 0.05, r
    assert r < 0.85 * step
    # near-uniform (Haar): the mean of the matrices vanishes; no two grid rotations nearly coincide
    assert np.abs(g.mean(axis=0)).max() < 0.02
    if step >= 15:
        d = geodesic_distance_deg(g[:, None], g[None])
        d[np.arange(len(g)), np.arange(len(g))] = np.inf
        assert d.min() > 0.4 * step


def test_so3_grid_directions_and_psi():
    g = so3_grid(30.0)
    # direction-major: the 12 in-plane angles of a direction share the third row (the viewing direction)
    blocks = g.reshape(48, 12, 3, 3)
    np.testing.assert_allclose(blocks[:, :, 2, :], np.broadcast_to(blocks[:, :1, 2, :], (48, 12, 3)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(blocks[:, 0, 2, :], axis=-1), 1.0)
    # consecutive in-plane angles are one step apart
    np.testing.assert_allclose(geodesic_distance_deg(blocks[:, 1:], blocks[:, :-1]), 30.0, atol=1e-9)
    with pytest.raises(InputError, match="angular_step_deg"):
        so3_grid(0.0)
    with pytest.raises(InputError, match="angular_step_deg"):
        so3_grid(200.0)


def test_local_grid_contains_identity_and_stays_within_radius():
    current = _random_rotations(1, 5)
    for step, radius, k in [(2.0, 1.0, 1), (2.0, 2.0, 7), (2.0, 4.0, 33), (1.5, 4.5, 123), (2.0, 5.0, 81)]:
        off = local_offsets(step, radius)
        assert off.shape == (k, 3, 3)
        np.testing.assert_allclose(off[0], np.eye(3), atol=0)
        cand = local_grid(current, step, radius)
        assert cand.shape == (5, k, 3, 3)
        np.testing.assert_allclose(cand[:, 0], current, atol=1e-12)  # the current pose is candidate 0
        d = geodesic_distance_deg(cand, current[:, None])
        assert d.max() <= radius + 1e-9
        np.testing.assert_allclose(d, np.broadcast_to(geodesic_distance_deg(off, np.eye(3)), d.shape), atol=1e-9)
        assert np.all(np.diff(d, axis=1) >= -1e-9)  # ordered by angle
        if k > 1:
            assert abs(np.sort(d[0])[1] - step) < 1e-9  # the nearest neighbours are one step away
    # JAX in, JAX out (usable in jit), same values
    cj = jax.jit(lambda r: local_grid(r, 2.0, 4.0))(jnp.asarray(current, jnp.float32))
    assert isinstance(cj, jax.Array) and cj.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(cj), local_grid(current, 2.0, 4.0), atol=1e-6)
    with pytest.raises(InputError, match="step_deg"):
        local_offsets(-1.0, 3.0)
    with pytest.raises(InputError, match="rotations"):
        local_grid(np.eye(3), 2.0, 4.0)


def test_shift_grid():
    g = shift_grid(6.0, 3.0)
    assert g.shape == (25, 2)
    np.testing.assert_array_equal(g[0], [0.0, 0.0])
    assert np.abs(g).max() == 6.0 and len(np.unique(g, axis=0)) == 25
    assert np.all(np.diff(np.linalg.norm(g, axis=1)) >= 0)
    d = shift_grid(6.0, 3.0, disc=True)
    assert d.shape == (13, 2) and np.linalg.norm(d, axis=1).max() == 6.0
    assert shift_grid(2.0, 0.5).shape == (81, 2)
    np.testing.assert_array_equal(shift_grid(0.0, 1.0), [[0.0, 0.0]])
    assert shift_grid(2.9, 1.5).shape == (9, 2)  # +-1.5, 0
    with pytest.raises(InputError, match="step_angstrom"):
        shift_grid(3.0, 0.0)
    with pytest.raises(InputError, match="max_shift_angstrom"):
        shift_grid(-1.0, 1.0)


def test_geodesic_distance():
    for theta in (1e-5, 0.3, 30.0, 90.0, 179.0, 180.0):
        tol = 1e-5 if theta == 180.0 else 1e-9 * max(theta, 1.0)  # at 180 the sqrt of a rounding error
        rz = euler_to_matrix(np.array(theta), np.array(0.0), np.array(0.0))
        assert abs(geodesic_distance_deg(rz, np.eye(3)) - theta) < tol
        ax = axis_angle_to_matrix(np.deg2rad(theta) * np.array([0.48, 0.6, 0.64]))
        a = _random_rotations(2, 3)
        np.testing.assert_allclose(geodesic_distance_deg(a @ ax, a), theta, rtol=1e-9, atol=tol)
        np.testing.assert_allclose(geodesic_distance_deg(ax @ a, a), theta, rtol=1e-9, atol=tol)
    a, b = _random_rotations(3, 50), _random_rotations(4, 50)
    d = geodesic_distance_deg(a, b)
    np.testing.assert_allclose(d, geodesic_distance_deg(b, a))
    tr = np.einsum("nij,nij->n", a, b)
    np.testing.assert_allclose(d, np.rad2deg(np.arccos((tr - 1) / 2)), atol=1e-6)
    dj = geodesic_distance_deg(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    assert isinstance(dj, jax.Array)
    np.testing.assert_allclose(np.asarray(dj), d, atol=1e-3)
    # nearest-neighbour distances through quaternions agree with the matrix formula
    g = so3_grid(60.0)
    np.testing.assert_allclose(nearest_rotation_distance_deg(a, g), geodesic_distance_deg(a[:, None], g[None]).min(1),
                               atol=1e-6)


@pytest.mark.parametrize("mirrored", [False, True])
def test_align_rotations_recovers_global_rotation(mirrored):
    n = 300
    true = _random_rotations(5, n)
    g = axis_angle_to_matrix(np.array([0.4, -1.1, 2.0]))  # a 130-degree global rotation
    rng = np.random.default_rng(6)
    axes = rng.standard_normal((n, 3))
    noise = axis_angle_to_matrix(np.deg2rad(2.0) * axes / np.linalg.norm(axes, axis=1, keepdims=True))
    est = true @ noise @ g.T  # so that true ~ est @ g, each pose 2 degrees off
    est[:30] = _random_rotations(7, 30)  # 10% wrong poses
    if mirrored:
        est = MIRROR @ est @ MIRROR
    res = align_rotations(est, true, mirror=True)
    assert res.mirrored == mirrored
    assert geodesic_distance_deg(res.rotation, g) < 0.3
    assert abs(res.median_deg - 2.0) < 0.05
    np.testing.assert_allclose(res.errors_deg[30:], 2.0, atol=0.35)
    assert res.mean_deg > res.median_deg  # the outliers
    # without the mirror option the hand is not searched
    plain = align_rotations(est, true)
    assert not plain.mirrored
    if mirrored:
        assert plain.median_deg > 10
    # exact poses align exactly
    exact = align_rotations(true @ g.T, true)
    assert exact.median_deg < 1e-6 and geodesic_distance_deg(exact.rotation, g) < 1e-6
    # the JAX sampler's rotations work too (float32 in)
    r32 = np.asarray(random_rotations(jax.random.PRNGKey(0), 20))
    assert align_rotations(r32, r32.astype(np.float64)).median_deg < 1e-3
    with pytest.raises(InputError):
        align_rotations(est[:5], true)
