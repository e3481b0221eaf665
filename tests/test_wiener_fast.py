"""The fast one-pass (Wiener) sums: the lifted-grid accumulation and the Friedel-half backprojection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcryo as jc
from jaxcryo.ndimage._fourier import fft2c
from jaxcryo.forward._operators import Nearest, Trilinear
from jaxcryo.ndimage._fourier import shell_index
from jaxcryo.forward._projection import hermitian_mirror
from jaxcryo.rotations._rotations import random_rotations

OPS = [Nearest(), Trilinear(), Trilinear(oversample=2, gridding=False), Trilinear(oversample=2)]


def _setup(n=12, b=6, seed=0):
    rng = np.random.default_rng(seed)
    rot = random_rotations(jax.random.PRNGKey(seed), b)
    sh = jnp.asarray(rng.normal(size=(b, 2)), jnp.float32)
    img = jnp.asarray(rng.normal(size=(b, n, n)), jnp.float32)
    return rot, sh, fft2c(img.astype(jnp.complex64))


@pytest.mark.parametrize("op", OPS, ids=str)
def test_lifted_backprojection_equals_adjoint(op):
    n = 12
    rot, sh, y = _setup(n)
    p = jc.Projector(n, 2.0, operator=op)
    a = p.adjoint(y, rot, sh)
    a2 = p.unlift_adjoint(p.backproject_lifted(y, rot, p.filters(sh, None, dtype=jnp.complex64)))
    np.testing.assert_allclose(np.asarray(a2), np.asarray(a), rtol=0, atol=1e-5 * float(jnp.abs(a).max()))


@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("n", [12, 13])
def test_friedel_half_is_the_hermitian_part(op, n):
    """Half the pixels plus the mirror = the Hermitian part of the all-pixel backprojection of real images:
    exactly on periodic (lifted) grids; on the plain N-grid except the Nyquist shell (its -n/2 faces)."""
    rot, sh, y = _setup(n)
    p = jc.Projector(n, 2.0, operator=op)
    f = p.filters(sh, None, dtype=jnp.complex64)
    full = p.unlift_adjoint(p.backproject_lifted(y, rot, f))
    herm = (full + hermitian_mirror(full)) / 2
    half = p.unlift_adjoint(p.backproject_lifted(y, rot, f, p.hermitian_pixels()))
    half = half + hermitian_mirror(half)
    keep = shell_index(n, 3) < n // 2 if p.operator.has_local_stencil and n % 2 == 0 else np.ones((n,) * 3, bool)
    scale = float(jnp.abs(herm).max())
    np.testing.assert_allclose(np.asarray(half)[keep], np.asarray(herm)[keep], rtol=0, atol=2e-6 * scale)
    idx, w = p.hermitian_pixels()
    assert len(idx) < 0.45 * n * n and set(np.unique(w)) <= {0.5, 1.0}


def test_hermitian_mirror_is_the_real_part():
    rng = np.random.default_rng(1)
    for n in (8, 9):
        v = jnp.asarray(rng.normal(size=(n,) * 3) + 1j * rng.normal(size=(n,) * 3), jnp.complex64)
        vf = jc.volume_to_fourier(v)
        herm = (vf + hermitian_mirror(vf)) / 2
        np.testing.assert_allclose(np.asarray(herm), np.asarray(jc.volume_to_fourier(jnp.real(v))), atol=1e-4)


def test_wiener_hermitian_matches_all_pixels():
    """The default one-pass estimate (Friedel half, lifted accumulation) on a CTF set with shifts
    (trilinear x2, the reconstruct default): its sums are the Hermitian parts of the all-pixel sums, and
    its real map matches the all-pixel map (they differ by what the unpaired -n/2 pixels put in shells 7-8)."""
    sim = jc.simulate(n_particles=200, box=16, snr=1.0, seed=4)
    ds = jc.ArrayDataset(sim.metadata, sim.images)
    p = jc.Projector(16, sim.metadata.pixel_size, operator=Trilinear(oversample=2))
    v0, d0 = jc.wiener_backprojection(p, ds, lam=1e-3, batch_size=64, hermitian=False)
    v1, d1 = jc.wiener_backprojection(p, ds, lam=1e-3, batch_size=64)
    herm = lambda x: (x + hermitian_mirror(x)) / 2  # noqa: E731
    off_edge = np.ones((16,) * 3, bool)  # the CTF^2 weights use the plain N-grid kernel: not periodic at -n/2
    off_edge[0] = off_edge[:, 0] = off_edge[:, :, 0] = False
    np.testing.assert_allclose(np.asarray(d1)[off_edge], np.asarray(herm(d0))[off_edge], rtol=1e-5, atol=1e-7)
    lam = 1e-3
    b0 = v0 * (d0 + lam)
    np.testing.assert_allclose(np.asarray(v1 * (d1 + lam)), np.asarray(herm(b0)), rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(b0).max()))
    # the maps: per-shell relative difference below the shells the unpaired pixels touch
    sh = shell_index(16, 3)
    h0 = herm(v0)  # the all-pixel estimate of a real map
    diff = [float(jnp.linalg.norm((v1 - h0)[sh == s]) / jnp.linalg.norm(h0[sh == s])) for s in range(7)]
    assert max(diff) < 1e-4, diff


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("op", OPS + ["nufft"], ids=str)
@pytest.mark.parametrize("half", [True, False], ids=["hermitian", "all"])
def test_batch_sums_match_the_library_backprojections(op, half, x64):
    """The Wiener step's per-batch sums (CTF and points at the chosen pixels only, one joint transpose) equal
    the library's backprojections of the same pixels: the lifted adjoint of w y through the filters, and the
    weight backprojection of w CTF^2 (float64, CTF, shifts, per-image weights)."""
    from jaxcryo.data._batch import make_batch
    from jaxcryo.leastsq._hessian import weight_backprojection
    from jaxcryo.solvers._wiener import batch_sums
    if op == "nufft":
        pytest.importorskip("jax_finufft")
    n, b = 13, 5
    rng = np.random.default_rng(3)
    rot = random_rotations(jax.random.PRNGKey(2), b).astype(jnp.float64)
    ctf = jc.CTFParams.create(rng.uniform(1e4, 2.5e4, b), defocus_v=rng.uniform(1e4, 2.5e4, b),
                              astig_angle=rng.uniform(0, 180, b))
    batch = make_batch(rng.normal(size=(b, n, n)), rot, rng.normal(0, 3, (b, 2)), ctf,
                       weights=rng.uniform(0.5, 1.5, b), mask=np.array([1, 1, 1, 0, 1.0]), dtype=jnp.float64)
    p = jc.Projector(n, 2.5, operator=op)
    pixels = p.hermitian_pixels() if half else p.mask_pixels()
    num, den = batch_sums(p, batch, pixels)
    y = batch.images_f * (batch.weights * batch.mask)[:, None, None]
    want_num = p.backproject_lifted(y, batch.rotations, p.filters(batch.shifts, batch.ctf, dtype=jnp.complex128),
                                    pixels)
    want_den = weight_backprojection(p, batch, squared=False, pixels=pixels)
    assert num.dtype == jnp.complex128 and den.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(num), np.asarray(want_num), rtol=0,
                               atol=1e-11 * float(jnp.abs(want_num).max()))
    np.testing.assert_allclose(np.asarray(den), np.asarray(want_den), rtol=0,
                               atol=1e-11 * float(jnp.abs(want_den).max()))


@pytest.mark.parametrize("with_ctf", [True, False], ids=["ctf", "no-ctf"])
def test_batch_sums_all_pixels_jitted_equals_the_unrestricted_backprojections(with_ctf, x64):
    """``mask_pixels`` under jit (as the Wiener step calls it) against the backprojections of every pixel
    (``pixels=None``: the mask through the filters and the weight image), with a mask radius under n/2."""
    from jaxcryo.data._batch import make_batch
    from jaxcryo.leastsq._hessian import weight_backprojection
    from jaxcryo.solvers._wiener import batch_sums
    n, b = 12, 4
    rng = np.random.default_rng(5)
    rot = random_rotations(jax.random.PRNGKey(4), b).astype(jnp.float64)
    ctf = jc.CTFParams.create(rng.uniform(1e4, 2.5e4, b)) if with_ctf else None
    batch = make_batch(rng.normal(size=(b, n, n)), rot, rng.normal(0, 3, (b, 2)), ctf,
                       weights=rng.uniform(0.5, 1.5, b), dtype=jnp.float64)
    p = jc.Projector(n, 2.0, mask_radius=4.3)
    num, den = jax.jit(lambda bt: batch_sums(p, bt, p.mask_pixels()))(batch)
    y = batch.images_f * batch.weights[:, None, None]
    want_num = p.backproject_lifted(y, batch.rotations, p.filters(batch.shifts, batch.ctf, dtype=jnp.complex128))
    want_den = weight_backprojection(p, batch, squared=False)
    np.testing.assert_allclose(np.asarray(num), np.asarray(want_num), rtol=0, atol=1e-11 * float(jnp.abs(want_num).max()))
    np.testing.assert_allclose(np.asarray(den), np.asarray(want_den), rtol=0, atol=1e-11 * float(jnp.abs(want_den).max()))
