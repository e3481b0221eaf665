"""Issue 19 prototype: the noise spectrum, whitened scores and the offset prior of ``jaxcryo.poses._noise``."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcryo.data import ArrayDataset, phantom, simulate, to_batch, load_batch
from jaxcryo.forward import Projector, volume_to_fourier
from jaxcryo.ndimage import fft2c
from jaxcryo.poses import score_local, score_pixels
from jaxcryo.poses._noise import (noise_spectrum, offset_log_prior, residual_shell_power, shell_filter,
                                  whiten_batch)


@pytest.fixture(scope="module")
def small():
    sim = simulate(n_particles=40, box=24, snr=float("inf"), seed=2)
    return sim


def test_noise_spectrum_of_white_noise(small):
    """Against a zero map the residual is the image: white noise of variance 4 gives a flat spectrum equal to
    the images' mean Fourier power."""
    md = small.metadata
    noise = 2.0 * np.random.default_rng(0).standard_normal(small.images.shape).astype(np.float32)
    ds = ArrayDataset(md, noise)
    proj = Projector(n=24, pixel_size=md.pixel_size)
    s2 = noise_spectrum(ds, np.arange(len(md)), jnp.zeros((24,) * 3, jnp.complex64), proj, batch_size=16)
    assert s2.shape == (13,)
    power = float(np.mean(np.abs(np.asarray(fft2c(jnp.asarray(noise)))) ** 2))
    np.testing.assert_allclose(s2[2:], power, rtol=0.15)


def test_residual_is_small_at_the_true_poses(small):
    md = small.metadata
    proj = Projector(n=24, pixel_size=md.pixel_size)
    vf = volume_to_fourier(jnp.asarray(small.volume))
    b = to_batch(load_batch(ArrayDataset(md, small.images), np.arange(8)))
    at_truth, _ = residual_shell_power(vf, b, proj)
    against_zero, _ = residual_shell_power(jnp.zeros_like(vf), b, proj)
    assert float(jnp.sum(at_truth[:8])) < 0.05 * float(jnp.sum(against_zero[:8]))


def test_whitened_scores_are_weighted_residuals(small):
    """Scoring the whitened images against the whitened map = -(1/2) sum_k s(k)^2 |C P - y|^2."""
    md = small.metadata
    proj = Projector(n=24, pixel_size=md.pixel_size)
    rng = np.random.default_rng(1)
    imgs = small.images + rng.standard_normal(small.images.shape).astype(np.float32)
    b = to_batch(load_batch(ArrayDataset(md, imgs), np.arange(6)))
    vf = volume_to_fourier(jnp.asarray(phantom(24)))
    table = 1.0 / np.sqrt(np.linspace(0.5, 3.0, 13))
    w3, w2 = jnp.asarray(shell_filter(table, 24, 3)), jnp.asarray(shell_filter(table, 24, 2))
    kmax = 9.0
    sc = score_local(vf * w3, whiten_batch(b, w2), proj, b.rotations[:, None], b.shifts[:, None], kmax=kmax)
    resid = np.asarray(proj(vf, b.rotations, b.shifts, b.ctf) - b.images_f).reshape(6, -1)
    idx = score_pixels(proj, kmax)
    manual = -0.5 * np.sum((np.asarray(w2).reshape(-1)[idx] ** 2) * np.abs(resid[:, idx]) ** 2, axis=1)
    np.testing.assert_allclose(np.asarray(sc)[:, 0, 0], manual, rtol=0.02)


def test_shell_filter_and_prior():
    t = np.arange(5.0)
    f = shell_filter(t, 8, 2)
    assert f.shape == (8, 8) and f[4, 4] == 0 and f[4, 5] == 1 and f[0, 0] == 4  # corners: the last value
    p = offset_log_prior(jnp.asarray([[0.0, 0.0], [3.0, 4.0]]), 5.0)
    np.testing.assert_allclose(np.asarray(p), [0.0, -0.5])
