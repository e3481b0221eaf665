"""Forward model: adjoint (dot-product) test, Fourier slice theorem against analytic projections, vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcryo.forward._ctf import CTFParams
from jaxcryo.ndimage._fourier import freq_indices
from jaxcryo.forward._operators import OPERATOR_NAMES, make_operator
from jaxcryo.forward._projection import Projector, volume_to_fourier
from jaxcryo.rotations._rotations import random_rotations

N = 16


def _random_ctf(rng, b):
    return CTFParams.create(
        defocus_u=rng.uniform(8000, 20000, b), defocus_v=rng.uniform(8000, 20000, b),
        astig_angle=rng.uniform(0, 180, b), voltage=300.0, cs=2.7, amp_contrast=0.07,
        phase_shift=rng.uniform(0, 30, b), bfactor=20.0,
    )


@pytest.mark.parametrize("method,oversample,gridding", [
    ("nearest", 1, None), ("trilinear", 1, None), ("trilinear", 2, None), ("nufft", 1, None),
    # gridding correction (issue 9): on by default for oversampled trilinear; forced on/off elsewhere
    ("trilinear", 2, False), ("trilinear", 3, None), ("trilinear", 1, True),
    ("nearest", 2, None), ("nearest", 2, True), ("nearest", 1, True), ("nearest", 3, True),
])
def test_adjoint_dot_product(method, oversample, gridding):
    rng = np.random.default_rng(0)
    b = 5
    opts = {"oversample": oversample} if oversample > 1 else {}
    opts |= {"gridding": gridding} if gridding is not None else {}
    proj = Projector(n=N, pixel_size=2.0, operator=make_operator(method, **opts))
    x = jnp.asarray(rng.standard_normal((N,) * 3) + 1j * rng.standard_normal((N,) * 3), jnp.complex64)
    y = jnp.asarray(rng.standard_normal((b, N, N)) + 1j * rng.standard_normal((b, N, N)), jnp.complex64)
    rots = random_rotations(jax.random.PRNGKey(3), b)
    shifts = jnp.asarray(rng.uniform(-6, 6, (b, 2)), jnp.float32)
    ctf = _random_ctf(rng, b)
    ax = proj(x, rots, shifts, ctf)
    aty = proj.adjoint(y, rots, shifts, ctf)
    lhs = jnp.vdot(y, ax)  # <Ax, y> = sum conj(y) Ax
    rhs = jnp.vdot(aty, x)  # <x, A^H y>
    bound = 1e-5 * float(jnp.linalg.norm(ax)) * float(jnp.linalg.norm(y))
    assert abs(complex(lhs) - complex(rhs)) <= bound, (method, lhs, rhs, bound)
    assert float(jnp.linalg.norm(ax)) > 0


def _gaussian_blobs(n, centers, sigmas, amps):
    r = freq_indices(n).astype(np.float64)
    Z, Y, X = np.meshgrid(r, r, r, indexing="ij")
    v = np.zeros((n,) * 3)
    for c, s, a in zip(centers, sigmas, amps):
        v += a * np.exp(-((X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2) / (2 * s * s))
    return v


def _analytic_projection(n, centers, sigmas, amps, A):
    """Line integral along z of the blobs rotated by r -> A r: a sum of 2D Gaussians."""
    r = freq_indices(n).astype(np.float64)
    Y, X = np.meshgrid(r, r, indexing="ij")
    img = np.zeros((n, n))
    for c, s, a in zip(centers, sigmas, amps):
        cp = A @ np.asarray(c)
        img += a * np.sqrt(2 * np.pi) * s * np.exp(-((X - cp[0]) ** 2 + (Y - cp[1]) ** 2) / (2 * s * s))
    return img


@pytest.mark.parametrize("method,oversample,tol", [("nufft", 1, 1e-3), ("trilinear", 2, 5e-2)])
def test_fourier_slice_theorem_gaussians(method, oversample, tol):
    n = 32
    rng = np.random.default_rng(1)
    k = 12
    centers = rng.uniform(-5, 5, (k, 3))
    sigmas = rng.uniform(1.5, 2.5, k)
    amps = rng.uniform(0.5, 1.5, k)
    vol = _gaussian_blobs(n, centers, sigmas, amps)
    rots = np.asarray(random_rotations(jax.random.PRNGKey(7), 6), np.float64)
    proj = Projector(n=n, pixel_size=1.0, operator=make_operator(method, **({"oversample": oversample} if oversample > 1 else {})),
                     mask_radius=n)
    imgs = np.asarray(proj.images(volume_to_fourier(jnp.asarray(vol, jnp.float32)), jnp.asarray(rots, jnp.float32),
                                  jnp.zeros((6, 2), jnp.float32)))
    for i in range(6):
        ref = _analytic_projection(n, centers, sigmas, amps, rots[i])
        err = np.linalg.norm(imgs[i] - ref) / np.linalg.norm(ref)
        assert err <= tol, (method, i, err)


def test_identity_pose_is_sum_along_z():
    rng = np.random.default_rng(2)
    vol = rng.standard_normal((N,) * 3).astype(np.float32)
    vf = volume_to_fourier(jnp.asarray(vol))
    for method in OPERATOR_NAMES:
        proj = Projector(n=N, pixel_size=1.0, operator=method, mask_radius=N)
        img = proj.images(vf, jnp.eye(3)[None], jnp.zeros((1, 2)))[0]
        np.testing.assert_allclose(np.asarray(img), vol.sum(0), atol=2e-4 * np.abs(vol.sum(0)).max())


def test_shift_convention_moves_particle_to_minus_origin():
    """RELION: image = projection shifted by -origin (origin in Å)."""
    n, px = N, 2.0
    vol = np.zeros((n,) * 3, np.float32)
    vol[n // 2, n // 2, n // 2] = 1.0
    proj = Projector(n=n, pixel_size=px, operator="nearest", mask_radius=n)
    img = np.asarray(proj.images(volume_to_fourier(jnp.asarray(vol)), jnp.eye(3)[None], jnp.asarray([[4.0, -2.0]])))[0]
    iy, ix = np.unravel_index(np.argmax(img), img.shape)
    assert (ix - n // 2, iy - n // 2) == (-2, 1)


def test_nufft_vmap():
    """Guards the jax<0.10 pin: vmapping through jax-finufft (images and forward-over-reverse HVPs)."""
    rng = np.random.default_rng(4)
    proj = Projector(n=8, pixel_size=1.0, operator="nufft")
    vf = jnp.asarray(rng.standard_normal((8,) * 3) + 0j, jnp.complex64)
    rots = random_rotations(jax.random.PRNGKey(0), 3)
    sh = jnp.zeros((3, 2))
    batched = proj(vf, rots, sh)
    per = jax.vmap(lambda R, s: proj(vf, R[None], s[None])[0])(rots, sh)
    np.testing.assert_allclose(np.asarray(per), np.asarray(batched), rtol=1e-4, atol=1e-4)

    def loss(v):
        r = proj(v, rots, sh)
        return 0.5 * jnp.sum(jnp.abs(r) ** 2)

    probes = jnp.asarray(rng.choice([-1.0, 1.0], (2, 8, 8, 8)), jnp.complex64)
    hvp = jax.vmap(lambda z: jax.jvp(jax.grad(loss), (vf,), (z,))[1])(probes)
    assert hvp.shape == (2, 8, 8, 8) and bool(jnp.all(jnp.isfinite(hvp)))


def test_separable_shift_phase_equals_the_grid_formula():
    """The projector's phase ramps (outer product of 1-D ramps) equal ``shift_phase`` on the full grid."""
    from jaxcryo.forward import shift_phase, shift_phase_separable
    from jaxcryo.ndimage._fourier import freq_grid_2d, freq_indices

    n, px = 24, 1.7
    rng = np.random.default_rng(3)
    shifts = jnp.asarray(rng.normal(0, 6.0, (5, 2)), jnp.float32)
    k = freq_indices(n) / (n * px)
    got = np.asarray(shift_phase_separable(shifts, k, k))
    ref = np.asarray(shift_phase(shifts, jnp.asarray(freq_grid_2d(n, px))))
    f = freq_grid_2d(n, px, dtype=np.float64)
    o = np.asarray(shifts, np.float64)
    exact = np.exp(2j * np.pi * (f[..., 0] * o[:, 0, None, None] + f[..., 1] * o[:, 1, None, None]))
    assert got.shape == (5, n, n)
    # float32 rounding of phases up to ~60 rad: both forms are as close to the exact ramp
    err_sep, err_grid = np.max(np.abs(got - exact)), np.max(np.abs(ref - exact))
    assert err_sep < 1e-5 and err_grid < 1e-5, (err_sep, err_grid)
