"""Issue 19: the solvent mask and the recentring of ``jaxcryo.poses._centring``."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage as ndi

from jaxcryo.data import phantom, project_metadata, simulate
from jaxcryo.errors import InputError
from jaxcryo.forward import fourier_to_volume, volume_to_fourier
from jaxcryo.poses._centring import masked_fourier, recentre, shift_fourier, solvent_mask
from jaxcryo.poses._diagnostics import centre_of_mass_offset


def test_solvent_mask():
    m = solvent_mask(32, 3.0, 60.0)  # radius 10 px, edge 3.2 px
    assert m.shape == (32,) * 3 and m.dtype == np.float32
    assert m[16, 16, 16] == 1.0 and m[16, 16, 26] == pytest.approx(1.0) and m[16, 16, 30] == 0.0
    assert 0 < m[16, 16, 28] < 1
    assert np.array_equal(solvent_mask(32, 3.0), solvent_mask(32, 3.0, 0.8 * 32 * 3.0) * 0 + solvent_mask(32, 3.0))
    with pytest.raises(InputError, match="particle_diameter"):
        solvent_mask(32, 3.0, -5.0)


def test_masked_fourier_flattens_solvent():
    v = np.random.default_rng(0).standard_normal((32,) * 3).astype(np.float32)
    m = solvent_mask(32, 3.0, 60.0)
    out = np.asarray(fourier_to_volume(masked_fourier(volume_to_fourier(jnp.asarray(v)), m)))
    np.testing.assert_allclose(out, v * m, atol=1e-4)


def test_shift_fourier_moves_content():
    v = np.asarray(phantom(32), np.float32)
    s = (2.0, -3.0, 4.0)
    out = np.asarray(fourier_to_volume(shift_fourier(volume_to_fourier(jnp.asarray(v)), s)))
    np.testing.assert_allclose(out, ndi.shift(v, s, order=1, mode="grid-wrap"), atol=0.05 * np.abs(v).max())
    c0, c1 = centre_of_mass_offset(v, 3.0), centre_of_mass_offset(out, 3.0)
    np.testing.assert_allclose(c1 - c0, s, atol=0.3)


def test_recentre_keeps_the_images_model():
    """The images of the recentred map at the moved origins are the images of the original map."""
    vol = ndi.shift(np.asarray(phantom(32), np.float32), (3.0, -4.0, 5.0), order=1)
    md = simulate(n_particles=6, box=32, snr=float("inf"), seed=1).metadata
    vf = volume_to_fourier(jnp.asarray(vol))
    maps, shifts, c = recentre([vf, vf], md.rotations, md.shifts, md.pixel_size)
    assert np.linalg.norm(c) > 5
    moved = np.asarray(fourier_to_volume(maps[0]), np.float32)
    assert np.linalg.norm(centre_of_mass_offset(moved, md.pixel_size)) < 1.0
    before = project_metadata(vol, md)
    after = project_metadata(moved, dataclasses.replace(md, shifts=shifts))
    err = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert err < 0.02, err
    # a map already centred is left alone
    same, s2, _ = recentre(maps, md.rotations, shifts, md.pixel_size)
    np.testing.assert_array_equal(s2, shifts)
