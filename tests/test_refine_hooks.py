"""Issue 19's hooks on the pose-search engine: whitening and the offset prior go through the one
:class:`jaxcryo.poses.Scorer` (``shell_weights``, ``offset_sigma``), and a refinement with every prototype on
runs and records them."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcryo.data import ArrayDataset, load_batch, phantom, simulate, to_batch
from jaxcryo.data._simulate import perturbed_metadata
from jaxcryo.errors import InputError
from jaxcryo.forward import Projector, volume_to_fourier
from jaxcryo.poses import RefineSettings, Scorer, refine, score_local, score_pixels
from jaxcryo.poses._noise import score_options, shell_filter, whiten_batch


@pytest.fixture(scope="module")
def small():
    return simulate(n_particles=60, box=24, snr=1.0, seed=2)


def test_scorer_shell_weights_are_the_whitened_likelihood(small):
    """The Scorer's ``shell_weights = 1 / sigma^2`` give ``-(1/2) sum_k |C P - y|^2 / sigma^2(|k|)``, the whitened
    log-likelihood robust's prototype approximated by whitening the images and the map (to 2%: the 3D filter
    does not commute with the slice interpolation)."""
    md = small.metadata
    proj = Projector(n=24, pixel_size=md.pixel_size)
    b = to_batch(load_batch(ArrayDataset(md, small.images), np.arange(6)))
    vf = volume_to_fourier(jnp.asarray(phantom(24)))
    sig2 = np.linspace(0.5, 3.0, 13)
    kmax = 9.0
    rots, sh = b.rotations[:, None], b.shifts[:, None]
    sc = np.asarray(Scorer(proj, kmax, jnp.asarray(1 / sig2, jnp.float32)).per_image(vf, b, rots, sh))[:, 0, 0]
    resid = np.asarray(proj(vf, b.rotations, b.shifts, b.ctf) - b.images_f).reshape(6, -1)
    idx = score_pixels(proj, kmax)
    w2 = shell_filter(1 / sig2, 24, 2).reshape(-1)[idx]
    manual = -0.5 * np.sum(w2 * np.abs(resid[:, idx]) ** 2, axis=1)
    np.testing.assert_allclose(sc, manual, rtol=1e-3)
    w3, w2d = jnp.asarray(shell_filter(1 / np.sqrt(sig2), 24, 3)), jnp.asarray(shell_filter(1 / np.sqrt(sig2), 24, 2))
    whitened = np.asarray(score_local(vf * w3, whiten_batch(b, w2d), proj, rots, sh, kmax=kmax))[:, 0, 0]
    np.testing.assert_allclose(whitened, manual, rtol=0.02)


def test_score_options(small):
    md = small.metadata
    ds = ArrayDataset(md, small.images)
    proj = Projector(n=24, pixel_size=md.pixel_size)
    vf = volume_to_fourier(jnp.asarray(small.volume))
    idx = np.arange(30)
    assert score_options(RefineSettings(), ds, idx, vf, proj, 8.0, True) == (None, None, None)
    w, sigma, spec = score_options(RefineSettings(whiten=True, offset_sigma_px=2.0), ds, idx, vf, proj, 8.0, True)
    assert w.shape == (13,) and sigma == pytest.approx(2.0 * md.pixel_size)
    np.testing.assert_allclose(w, 1 / np.asarray(spec), rtol=1e-5)
    w_white, _, spec_white = score_options(RefineSettings(offset_sigma_px=2.0), ds, idx, vf, proj, 8.0, True)
    assert np.ptp(w_white) == 0 and spec_white[0] == pytest.approx(np.mean(spec[1:9]), rel=1e-6)
    with pytest.raises(InputError, match="offset_sigma_px"):
        RefineSettings(offset_sigma_px=-1.0)


def test_refine_with_every_prototype(small):
    md = perturbed_metadata(small.metadata, 3.0, 1.0, seed=0)
    ds = ArrayDataset(md, small.images)
    s = RefineSettings(iterations=2, batch_size=30, whiten=True, offset_sigma_px=3.0, solvent_mask=True,
                       recentre=True, particle_diameter=60.0)
    res = refine(ds, np.asarray(small.volume), s, local_only=True, progress=False)
    h = res.history
    assert len(h) == 2 and "reference_scale" in h[0] and 0.5 < h[0]["reference_scale"] < 2.0
    assert len(h[0]["noise_spectrum"]) == 2 and len(h[0]["noise_spectrum"][0]) == 13
    assert len(h[0]["centre_offset_px"]) == 3
    assert res.mask_diameter == 60.0  # one particle diameter: the solvent mask's and the postprocess's
    assert isinstance(res.warnings, tuple)


def test_resume_keeps_the_solvent_mask_diameter(tmp_path):
    """The particle diameter may change on resume (it shapes only the postprocess), unless it also shapes
    the scored references (``solvent_mask``)."""
    from jaxcryo.poses import RefineState, load_state, save_state

    state = RefineState([jnp.zeros((8,) * 3, jnp.complex64)] * 2, None, np.zeros((4, 2)), 30.0, 7.5, 1.0)
    for masked in (False, True):
        s = RefineSettings(solvent_mask=masked, particle_diameter=50.0)
        save_state(tmp_path / "ck", state, s, False)
        other = RefineSettings(solvent_mask=masked, particle_diameter=60.0)
        if masked:
            with pytest.raises(InputError, match="particle_diameter"):
                load_state(tmp_path / "ck", state, other)
        else:
            assert load_state(tmp_path / "ck", state, other)[0].iteration == 0


def test_global_refine_whitened(small):
    """The first (global) search whitens with the images' own spectrum (no poses yet)."""
    from jaxcryo.data._simulate import without_poses

    ds = ArrayDataset(without_poses(small.metadata), small.images)
    s = RefineSettings(iterations=1, batch_size=30, whiten=True, offset_sigma_px=2.0, global_step=30.0)
    res = refine(ds, np.asarray(small.volume), s, progress=False)
    h = res.history[0]
    assert h["global_search"] and len(h["noise_spectrum"]) == 2 and min(h["noise_spectrum"][0]) > 0
    assert res.state.rotations is not None and np.all(np.isfinite(res.state.rotations))
