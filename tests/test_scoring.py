"""Pose scoring (issue 11): the scores equal minus the data term of jaxcryo.leastsq._loss.loss for every candidate
(nearest, trilinear, NUFFT; CTF, non-zero shifts, with and without kmax; global and local search), chunking
does not change them, and noise-free images simulated at grid poses are assigned exactly those poses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcryo.data._batch import Batch, make_batch
from jaxcryo.forward._ctf import CTFParams
from jaxcryo.errors import InputError
from jaxcryo.rotations._grids import geodesic_distance_deg, local_grid, shift_grid, so3_grid
from jaxcryo.leastsq._loss import loss
from jaxcryo.forward._particles import ParticleMetadata
from jaxcryo.forward._projection import Projector, volume_to_fourier
from jaxcryo.rotations._rotations import random_rotations
from jaxcryo.poses._scoring import best_poses, score_local, score_pixels, score_poses, soft_weights
from jaxcryo.data._simulate import phantom, project_metadata, random_ctf_params

N = 16
PIXEL = 2.0
SHIFTS = np.array([[0.0, 0.0], [3.1, -2.2], [-5.0, 1.5], [0.7, 4.0]])


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _problem(seed=0, b=3, dtype=jnp.float32):
    """A random map and random images (scores far from zero: no cancellation), random CTFs and weights."""
    rng = np.random.default_rng(seed)
    vol_f = volume_to_fourier(jnp.asarray(rng.standard_normal((N,) * 3), dtype))
    imgs = 3.0 * rng.standard_normal((b, N, N))
    ctf = CTFParams.create(defocus_u=rng.uniform(8000, 20000, b), defocus_v=rng.uniform(8000, 20000, b),
                           astig_angle=rng.uniform(0, 180, b), amp_contrast=0.07, bfactor=10.0)
    weights = rng.uniform(0.5, 2.0, b)
    batch = make_batch(imgs, np.tile(np.eye(3), (b, 1, 1)), np.zeros((b, 2)), ctf, weights, dtype=dtype)
    return vol_f, batch


def _direct(vol_f, batch, projector, rots, shifts):
    """``-loss`` (lam = 0) of one-image batches, one per (image, rotation, shift): ``(B, R, T)``.
    ``rots``: ``(B, R, 3, 3)``; ``shifts``: ``(B, T, 2)``."""
    b, r, t = rots.shape[0], rots.shape[1], shifts.shape[1]
    bi, ri, ti = (a.reshape(-1) for a in np.meshgrid(np.arange(b), np.arange(r), np.arange(t), indexing="ij"))
    m = len(bi)
    one = lambda a: a[:, None]  # noqa: E731  (M, 1, ...) single-image batches
    rdt = jnp.real(vol_f).dtype
    big = Batch(one(batch.images_f[bi]), one(jnp.asarray(rots, rdt)[bi, ri]), one(jnp.asarray(shifts, rdt)[bi, ti]),
                None if batch.ctf is None else CTFParams(*(one(f[bi]) for f in batch.ctf)),
                one(batch.weights[bi]), jnp.ones((m, 1), rdt))
    per = jax.jit(jax.vmap(lambda bb: loss(vol_f, bb, projector, lam=0.0)))(big)
    return -np.asarray(per).reshape(b, r, t)


def _projector(interp, kmax):
    # scoring with kmax is the loss of a projector whose mask is the smaller of its own and kmax
    return (Projector(n=N, pixel_size=PIXEL, operator=interp),
            Projector(n=N, pixel_size=PIXEL, operator=interp, mask_radius=kmax))


@pytest.mark.parametrize("interp", ["nearest", "trilinear", "nufft"])
@pytest.mark.parametrize("kmax", [None, 5.0])
def test_global_scores_equal_direct_loss(interp, kmax):
    vol_f, batch = _problem(0)
    proj, proj_ref = _projector(interp, kmax)
    rots = np.asarray(random_rotations(jax.random.PRNGKey(1), 5), np.float64)
    s = np.asarray(score_poses(vol_f, batch, proj, rots, SHIFTS, kmax=kmax))
    assert s.shape == (3, 5, 4) and s.dtype == np.float32
    ref = _direct(vol_f, batch, proj_ref, np.broadcast_to(rots, (3,) + rots.shape),
                  np.broadcast_to(SHIFTS, (3,) + SHIFTS.shape))
    rel = np.max(np.abs(s - ref) / np.abs(ref))
    assert rel < 1e-4, rel
    # the test sees the shift's sign convention: the opposite origins score differently
    flipped = np.asarray(score_poses(vol_f, batch, proj, rots, -SHIFTS, kmax=kmax))
    assert np.max(np.abs(flipped - ref)[..., 1:] / np.abs(ref[..., 1:])) > 1e-2


@pytest.mark.parametrize("interp", ["nearest", "trilinear"])
@pytest.mark.parametrize("kmax", [None, 4.5])
def test_local_scores_equal_direct_loss(interp, kmax):
    vol_f, batch = _problem(1)
    proj, proj_ref = _projector(interp, kmax)
    current = np.asarray(random_rotations(jax.random.PRNGKey(2), 3), np.float64)
    cand = local_grid(current, 5.0, 5.0)  # (3, 7, 3, 3)
    per_image_shifts = SHIFTS[None] + np.array([[[0.0, 0.0]], [[1.5, -0.5]], [[-2.0, 2.5]]])  # (3, 4, 2)
    for shifts in (SHIFTS, per_image_shifts):
        s = np.asarray(score_local(vol_f, batch, proj, cand, shifts, kmax=kmax, chunk_size=3))
        assert s.shape == (3, 7, 4)
        ref = _direct(vol_f, batch, proj_ref, cand, np.broadcast_to(shifts, (3, 4, 2)))
        rel = np.max(np.abs(s - ref) / np.abs(ref))
        assert rel < 1e-4, rel


def test_global_and_local_agree_and_chunking_does_not_matter():
    vol_f, batch = _problem(2)
    proj = Projector(n=N, pixel_size=PIXEL, operator="trilinear")
    rots = so3_grid(60.0)  # 12 directions x 6 psi
    full = np.asarray(score_poses(vol_f, batch, proj, rots, SHIFTS, kmax=6.0, chunk_size=len(rots)))
    for c in (1, 5, 7, 1000):  # 72 = 14 x 5 + 2: padded last chunk
        np.testing.assert_allclose(score_poses(vol_f, batch, proj, rots, SHIFTS, kmax=6.0, chunk_size=c), full,
                                   rtol=1e-5)
    per_image = np.broadcast_to(rots, (3,) + rots.shape)
    for c in (4, 72):
        np.testing.assert_allclose(score_local(vol_f, batch, proj, per_image, SHIFTS, kmax=6.0, chunk_size=c), full,
                                   rtol=1e-5)


def test_padding_entries_score_zero():
    vol_f, batch = _problem(3)
    batch = batch._replace(mask=jnp.asarray([1.0, 0.0, 1.0]))
    proj = Projector(n=N, pixel_size=PIXEL)
    s = np.asarray(score_poses(vol_f, batch, proj, so3_grid(90.0), SHIFTS))
    assert np.all(s[1] == 0) and np.all(s[[0, 2]] < 0)


def test_float64_scores_exact(x64):
    vol_f, batch = _problem(4, dtype=jnp.float64)
    assert vol_f.dtype == jnp.complex128
    proj, proj_ref = _projector("trilinear", 6.0)
    rots = np.asarray(random_rotations(jax.random.PRNGKey(5), 4, jnp.float64))
    s = np.asarray(score_poses(vol_f, batch, proj, rots, SHIFTS, kmax=6.0, chunk_size=3))
    assert s.dtype == np.float64
    ref = _direct(vol_f, batch, proj_ref, np.broadcast_to(rots, (3,) + rots.shape),
                  np.broadcast_to(SHIFTS, (3,) + SHIFTS.shape))
    assert np.max(np.abs(s - ref) / np.abs(ref)) < 1e-11


@pytest.mark.parametrize("interp,simulated_with", [("trilinear", "nufft"), ("nufft", "nufft"),
                                                    ("nearest", "nearest")])
def test_best_pose_of_noise_free_images_is_exact(interp, simulated_with):
    """Noise-free images (CTF, non-zero shifts) simulated at grid rotations (30 degrees) and grid shifts
    (1 px) get exactly those back. Exact (NUFFT) images are recovered by trilinear and NUFFT scoring;
    nearest-voxel scoring is tested on its own images: on exact ones it picks poses 120-176 degrees off for 3
    of these 6 images (measured, at every kmax from 6 to Nyquist: its rounding error is large at low
    frequencies too)."""
    n, pixel, b = 24, 3.0, 6
    rots = so3_grid(30.0)
    shifts = shift_grid(6.0, 3.0)  # 5 x 5, step 1 px
    rng = np.random.default_rng(7)
    ri, ti = rng.choice(len(rots), b, replace=False), rng.integers(1, len(shifts), b)
    md = ParticleMetadata(rotations=rots[ri], shifts=shifts[ti], ctf=random_ctf_params(rng, b),
                          image_files=np.array(["x.mrcs"] * b, object), image_indices=np.arange(b),
                          pixel_size=pixel, box=n)
    vol = phantom(n)
    images = project_metadata(vol, md, operator=simulated_with)
    batch = make_batch(images, np.tile(np.eye(3), (b, 1, 1)), np.zeros((b, 2)), md.ctf)
    proj = Projector(n=n, pixel_size=pixel, operator=interp)
    vol_f = volume_to_fourier(jnp.asarray(vol))
    s = score_poses(vol_f, batch, proj, rots, shifts, chunk_size=128)
    best = best_poses(s, rots, shifts)
    np.testing.assert_array_equal(np.asarray(best.rotation_index), ri)
    np.testing.assert_array_equal(np.asarray(best.shift_index), ti)
    np.testing.assert_allclose(np.asarray(best.rotations), rots[ri], atol=1e-6)
    np.testing.assert_allclose(np.asarray(best.shifts), shifts[ti], atol=1e-6)


@pytest.mark.parametrize("interp", ["trilinear", "nearest"])
def test_local_search_recovers_the_pose(interp):
    """From a pose 4 degrees off, a local grid (step 4, radius 8) that contains the true pose finds it, and
    the true shift: noise-free images of the scorer's own forward model, whose true pose scores 0 (the
    maximum; with NUFFT images a trilinear model can prefer a pose a few degrees off, as measured here)."""
    n, pixel, b = 24, 3.0, 4
    rng = np.random.default_rng(8)
    true = np.asarray(random_rotations(jax.random.PRNGKey(9), b, jnp.float32), np.float64)
    shifts = shift_grid(3.0, 1.5)  # 3 x 3
    ti = rng.integers(1, len(shifts), b)
    md = ParticleMetadata(rotations=true, shifts=shifts[ti], ctf=random_ctf_params(rng, b),
                          image_files=np.array(["x.mrcs"] * b, object), image_indices=np.arange(b),
                          pixel_size=pixel, box=n)
    vol = phantom(n)
    batch = make_batch(project_metadata(vol, md, operator=interp), np.tile(np.eye(3), (b, 1, 1)),
                       np.zeros((b, 2)), md.ctf)
    proj = Projector(n=n, pixel_size=pixel, operator=interp)
    start = true @ local_grid(np.eye(3)[None], 4.0, 4.0)[0, 3]  # one 4-degree offset away
    cand = local_grid(start, 4.0, 8.0)  # (B, 33, 3, 3): contains true = start @ offset^-1
    s = score_local(volume_to_fourier(jnp.asarray(vol)), batch, proj, cand, shifts)
    best = best_poses(s, cand, shifts)
    assert np.max(geodesic_distance_deg(np.asarray(best.rotations, np.float64), true)) < 1e-3
    np.testing.assert_array_equal(np.asarray(best.shift_index), ti)
    assert np.all(np.asarray(best.score) > -1e-4 * np.abs(np.asarray(s)).max())  # the exact fit scores ~0


def test_best_poses_and_soft_weights():
    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.standard_normal((4, 6, 3)) * 3, jnp.float32)
    rots = so3_grid(120.0)[:6]
    shifts = shift_grid(1.0, 1.0)[:3]
    best = best_poses(scores, rots, shifts)
    flat = np.asarray(scores).reshape(4, -1)
    np.testing.assert_array_equal(np.asarray(best.rotation_index) * 3 + np.asarray(best.shift_index),
                                  flat.argmax(1))
    np.testing.assert_allclose(np.asarray(best.score), flat.max(1))
    sw = soft_weights(scores, 5)
    w = np.asarray(sw.weights)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)
    assert np.all(np.diff(w, axis=1) <= 0)
    top = np.sort(flat, axis=1)[:, ::-1][:, :5]
    ref = np.exp(top - top[:, :1]) / np.exp(top - top[:, :1]).sum(1, keepdims=True)
    np.testing.assert_allclose(w, ref, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(sw.rotation_index[:, 0]), np.asarray(best.rotation_index))
    np.testing.assert_array_equal(np.asarray(sw.shift_index[:, 0]), np.asarray(best.shift_index))
    # soft weights over every candidate = the full posterior
    full = np.asarray(soft_weights(scores, 18).weights)
    np.testing.assert_allclose(full.sum(1), 1.0, rtol=1e-5)
    # per-image candidates
    per_rot = np.broadcast_to(rots, (4, 6, 3, 3))
    per_sh = np.broadcast_to(shifts, (4, 3, 2))
    b2 = best_poses(scores, per_rot, per_sh)
    np.testing.assert_allclose(np.asarray(b2.rotations), np.asarray(best.rotations))
    np.testing.assert_allclose(np.asarray(b2.shifts), np.asarray(best.shifts))


def test_score_pixels():
    proj = Projector(n=64, pixel_size=1.0)
    assert score_pixels(proj).size == np.sum(np.asarray(proj.image_mask()) > 0)
    assert score_pixels(proj, 16).size == 797
    assert score_pixels(proj, 100).size == score_pixels(proj).size  # the mask bounds kmax


def test_bad_arguments():
    vol_f, batch = _problem(5)
    proj = Projector(n=N, pixel_size=PIXEL)
    rots = so3_grid(90.0)
    with pytest.raises(InputError, match="rotations"):
        score_poses(vol_f, batch, proj, rots[:, :2], SHIFTS)
    with pytest.raises(InputError, match="shifts"):
        score_poses(vol_f, batch, proj, rots, SHIFTS[:, :1])
    with pytest.raises(InputError, match="shifts"):
        score_poses(vol_f, batch, proj, rots, np.zeros((2, 4, 2)))
    with pytest.raises(InputError, match="kmax"):
        score_poses(vol_f, batch, proj, rots, SHIFTS, kmax=-1.0)
    with pytest.raises(InputError, match="kmax"):
        score_poses(vol_f, batch, proj, rots, SHIFTS, kmax="high")
    with pytest.raises(InputError, match="chunk_size"):
        score_poses(vol_f, batch, proj, rots, SHIFTS, chunk_size=0)
    with pytest.raises(InputError, match="vol_f"):
        score_poses(vol_f[:8, :8, :8], batch, proj, rots, SHIFTS)
    with pytest.raises(InputError, match="vol_f"):
        score_poses(jnp.real(vol_f), batch, proj, rots, SHIFTS)
    with pytest.raises(InputError, match="rotations"):
        score_local(vol_f, batch, proj, np.broadcast_to(rots, (2,) + rots.shape), SHIFTS)
    with pytest.raises(InputError, match="top_k"):
        soft_weights(jnp.zeros((2, 3, 4)), 13)
    with pytest.raises(InputError, match="scores"):
        best_poses(jnp.zeros((2, 3)), rots, SHIFTS)
