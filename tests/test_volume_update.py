"""Refinement's volume update (issue 19, :mod:`jaxcryo.poses._volume`): half maps re-estimated from the current
poses with the half-map FSC's spectral prior, independent of the previous half maps."""

import numpy as np
import pytest

import jaxcryo as jc
from jaxcryo.data._sources import ArrayDataset, split_halves
from jaxcryo.errors import InputError
from jaxcryo.forward._operators import make_operator
from jaxcryo.forward._projection import Projector
from jaxcryo.poses._state import RefineSettings
from jaxcryo.poses._volume import update_half_maps, update_strategy
from jaxcryo.solvers._spectral import estimate_spectral_prior
from jaxcryo.solvers._wiener import wiener_backprojection


@pytest.fixture(scope="module")
def problem():
    sim = jc.simulate(n_particles=400, box=24, snr=1.0, seed=5)
    ds = ArrayDataset(sim.metadata, sim.images)
    proj = Projector(n=24, pixel_size=float(sim.metadata.pixel_size), operator=make_operator("trilinear"))
    return ds, proj, [np.asarray(h) for h in split_halves(sim.metadata, 0)]


def _run(problem, settings, previous):
    ds, proj, rows = problem
    return update_half_maps(ds, rows, proj, previous, settings, update_strategy(settings, proj), {})


def test_backproject_is_the_wiener_filter_of_the_fsc_prior(problem):
    ds, proj, rows = problem
    s = RefineSettings(batch_size=64)
    maps, rec = _run(problem, s, [None, None])
    assert rec["volume_update"] == "reestimated"
    est = estimate_spectral_prior(proj, ds, rows, s.lam, 64)
    for h in range(2):  # the reused one-pass sums equal a fresh pass with the prior itself
        direct, _ = wiener_backprojection(proj, ds, lam=est.prior, batch_size=64, indices=rows[h])
        np.testing.assert_allclose(np.asarray(maps[h]), np.asarray(direct), rtol=2e-3,
                                   atol=2e-4 * float(np.abs(np.asarray(direct)).max()))


def test_reestimated_maps_forget_the_previous_ones(problem):
    s = RefineSettings(optimizer="psgd", epochs_per_iteration=1, batch_size=64)
    rng = np.random.default_rng(0)
    junk = [rng.normal(size=(24,) * 3).astype(np.complex64) * 100 for _ in range(2)]
    a, _ = _run(problem, s, [np.zeros((24,) * 3, np.complex64)] * 2)
    b, _ = _run(problem, s, junk)
    for h in range(2):
        np.testing.assert_array_equal(np.asarray(a[h]), np.asarray(b[h]))
    warm, rec = _run(problem, RefineSettings(optimizer="psgd", reestimate=False, epochs_per_iteration=1,
                                             batch_size=64), junk)
    assert rec["volume_update"] == "warm"
    assert np.abs(np.asarray(warm[0]) - np.asarray(a[0])).max() > 1.0  # the warm start keeps the junk


def test_warm_start_needs_a_minibatch_strategy():
    with pytest.raises(InputError, match="optimizer"):
        RefineSettings(optimizer="backproject", reestimate=False)
