"""The exact optimum of the known-pose objective and the exact loss gap (jaxcryo.leastsq._optimum)."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxcryo as jc
from jaxcryo.errors import InputError
from jaxcryo.leastsq._optimum import Optimum


@pytest.fixture(scope="module")
def problem():
    sim = jc.simulate(n_particles=150, box=10, snr=1.0, seed=5)
    ds = jc.ArrayDataset(sim.metadata, sim.images)
    proj = jc.Projector(n=10, pixel_size=sim.metadata.pixel_size, operator="trilinear", mask_radius=4)
    return ds, proj


def full_loss(v, ds, proj, lam, mask=None):
    vm = v if mask is None else v * mask
    b = jc.to_batch(jc.load_batch(ds, np.arange(len(ds))))
    return float(jc.loss(jnp.asarray(vm, jnp.complex64), b, proj, lam))


@pytest.mark.parametrize("radius", [None, 4.0])
def test_optimum_is_the_minimiser_and_the_gap_is_exact(problem, radius):
    ds, proj = problem
    lam = 1e-3
    opt = Optimum(proj, ds, lam, radius=radius, tol=1e-10)
    assert opt.residual < 1e-8
    m = None if radius is None else jc.ndimage.ball_mask(10, radius)
    # the CG solution of the data-pass normal equations (no mask) agrees
    if radius is None:
        cg = jc.solve_cg(proj, ds, lam=lam, tol=1e-7, maxiter=500, batch_size=150)
        assert np.linalg.norm(np.asarray(cg.x) - opt.solution) / np.linalg.norm(opt.solution) < 1e-4
    # F(v) - F(v*) from two loss evaluations equals the stencil's 1/2 e^H H e (float32 losses: rel 1e-3)
    rng = np.random.default_rng(0)
    for scale in (0.3, 1.0):
        v = opt.solution + scale * np.abs(opt.solution).mean() * (rng.normal(size=(10,) * 3) + 1j * rng.normal(size=(10,) * 3))
        if m is not None:
            v = np.where(m, v, 0)
        direct = full_loss(v, ds, proj, lam, m) - full_loss(opt.solution, ds, proj, lam, m)
        assert opt.gap(v) == pytest.approx(direct, rel=2e-3)
    assert opt.gap(opt.solution) == pytest.approx(0.0, abs=1e-12 * opt.gap_at_zero)
    assert opt.gap_closed(np.zeros((10,) * 3)) == 0.0 and opt.gap_closed(opt.solution) == pytest.approx(100.0)
    d = opt.diagonal()
    assert d.shape == (10,) * 3 and d.min() >= lam - 1e-12


def test_optimum_needs_a_local_operator(problem):
    ds, _ = problem
    proj = jc.Projector(n=10, pixel_size=3.0, operator=jc.forward.Trilinear(oversample=2))
    with pytest.raises(InputError, match="local stencil"):
        Optimum(proj, ds, 1e-3)
