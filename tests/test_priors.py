"""The spectral (Wiener / MAP) prior: its weights, its place in the objective, and its solution."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxcryo as jc
from jaxcryo.ndimage._fourier import shell_index
from jaxcryo.leastsq._priors import SpectralPrior, Tikhonov, as_prior, fourier_fsc, prior_diagonal, shell_means
from jaxcryo.solvers._spectral import HalfMapFSC, estimate_spectral_prior


def test_from_fsc_and_tau2_weights():
    fsc = np.array([1.0, 0.9, 0.5, 0.0, -0.2])
    d = np.array([2.0, 1.0, 0.5, 0.25, 0.1])
    p = SpectralPrior.from_fsc(fsc, d)
    snr = np.clip(fsc, 1e-3, 0.999) / (1 - np.clip(fsc, 1e-3, 0.999))
    np.testing.assert_allclose(np.asarray(p.shell_lambda), d / snr, rtol=1e-6)
    assert float(p.shell_lambda[2]) == pytest.approx(0.5)  # FSC 0.5: SNR 1, lambda = <d>
    q = SpectralPrior.from_tau2([4.0, 1.0, 0.25], n_images=10)
    np.testing.assert_allclose(np.asarray(q.shell_lambda), [1 / 40, 1 / 10, 1 / 2.5], rtol=1e-6)
    # per-voxel weights follow the shells; shells beyond the array use its last value
    lam = np.asarray(q.diagonal(8))
    sh = np.minimum(shell_index(8, 3), 2)
    np.testing.assert_allclose(lam, np.asarray(q.shell_lambda)[sh])
    assert prior_diagonal(0.25, 8) == 0.25 and isinstance(as_prior(0.1), Tikhonov)


def test_prior_in_objective_value_and_gradient():
    sim = jc.simulate(n_particles=6, box=8, snr=1.0, seed=1)
    b = jc.make_batch(sim.images, sim.metadata.rotations, sim.metadata.shifts, sim.metadata.ctf)
    proj = jc.Projector(n=8, pixel_size=sim.metadata.pixel_size, operator="nearest")
    prior = SpectralPrior(jnp.linspace(0.1, 2.0, 5))
    rng = np.random.default_rng(0)
    v = jnp.asarray(rng.standard_normal((8,) * 3) + 1j * rng.standard_normal((8,) * 3), jnp.complex64)
    lam = np.asarray(prior.diagonal(8))
    d0 = jc.loss(v, b, proj, 0.0)
    assert float(jc.loss(v, b, proj, prior) - d0) == pytest.approx(0.5 * float(np.sum(lam * np.abs(v) ** 2)), rel=1e-4)
    g = jc.gradient(jc.objective(b, proj, prior))(v) - jc.gradient(jc.objective(b, proj, 0.0))(v)
    np.testing.assert_allclose(np.asarray(g), lam * np.asarray(v), rtol=1e-3, atol=1e-4)


def test_spectral_prior_solution_is_the_wiener_filter_for_nearest():
    """With nearest slices the Hessian is diagonal: the optimum of the spectral-prior objective is the
    closed-form Wiener filter b_j / (d_j + lambda_j); CG on the normal equations must reach it."""
    sim = jc.simulate(n_particles=300, box=12, snr=0.5, seed=2)
    ds = jc.ArrayDataset(sim.metadata, sim.images)
    proj = jc.Projector(n=12, pixel_size=sim.metadata.pixel_size, operator="nearest")
    prior = SpectralPrior(jnp.asarray(np.geomspace(1e-3, 1.0, 7), jnp.float32))
    # all pixels (hermitian=False): the exact normal-equation sums; the default Friedel-half version differs
    # from them on the N-grid's -n/2 faces (tests/test_wiener_fast.py)
    v0, den = jc.wiener_backprojection(proj, ds, lam=0.0, batch_size=100, hermitian=False)   # b / d
    b = np.asarray(v0) * np.asarray(den)
    lam = np.asarray(prior.diagonal(12))
    wiener = np.where(np.asarray(den) + lam > 0, b / (np.asarray(den) + lam), 0)
    cg = jc.solve_cg(proj, ds, lam=prior, tol=1e-7, maxiter=200, batch_size=100)
    m = np.asarray(den) > 0
    err = np.linalg.norm((np.asarray(cg.x) - wiener)[m]) / np.linalg.norm(wiener[m])
    assert err < 1e-4, err
    # and the one-pass strategy uses the same prior: identical to the closed form
    v1, _ = jc.wiener_backprojection(proj, ds, lam=prior, batch_size=100, hermitian=False)
    np.testing.assert_allclose(np.asarray(v1)[m], wiener[m], rtol=2e-4, atol=1e-6)


def test_estimate_from_half_maps_and_reconstruct():
    sim = jc.simulate(n_particles=400, box=16, snr=1.0, seed=3)
    ds = jc.ArrayDataset(sim.metadata, sim.images)
    proj = jc.Projector(n=16, pixel_size=sim.metadata.pixel_size, operator="trilinear")
    h1, h2 = jc.split_halves(sim.metadata, 0)
    est = estimate_spectral_prior(proj, ds, (h1, h2), lam=1e-3, batch_size=100)
    lam = np.asarray(est.prior.shell_lambda)
    good, bad = np.flatnonzero(est.fsc > 0.5)[-1], np.flatnonzero(est.fsc < 0.143)[0]
    assert est.fsc[0] > 0.9 and lam[bad] > 10 * lam[good]  # where the halves disagree the prior dominates
    v1, d1 = jc.wiener_backprojection(proj, ds, lam=1e-3, batch_size=100, indices=h1)
    v2, d2 = jc.wiener_backprojection(proj, ds, lam=1e-3, batch_size=100, indices=h2)
    np.testing.assert_allclose(est.fsc, fourier_fsc(v1, v2), atol=1e-6)
    np.testing.assert_allclose(est.shell_weight, shell_means(0.5 * (np.asarray(d1) + np.asarray(d2))), rtol=1e-6)

    res = jc.reconstruct(ds, optimizer="backproject", prior="fsc", interp="trilinear", reference=sim.volume,
                         progress=False)
    assert res.prior["kind"] == "spectral" and len(res.prior["shell_lambda"]) == 9 and res.config["prior"] == "fsc"
    assert res.fsc_ref.resolution_05 < 4 * sim.metadata.pixel_size * 2
    res2 = jc.reconstruct(ds, optimizer="backproject", prior=HalfMapFSC(fudge=4.0), interp="trilinear",
                          progress=False)
    assert np.all(np.asarray(res2.prior["shell_lambda"]) <= np.asarray(res.prior["shell_lambda"]) + 1e-9)
    with pytest.raises(jc.InputError, match="prior 'wiener'"):
        jc.reconstruct(ds, prior="wiener", progress=False)
