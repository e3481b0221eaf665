"""``Optimum.compare`` (the paper's measures of an iterate against the exact optimum, shared by ``jaxcryo demo``
and the benchmarks) and the stencil matvec in JAX (``benchmarks/paper_experiment.py``'s L-BFGS check)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcryo as jc
from jaxcryo.leastsq import Optimum, fourier_fsc, matvec


@pytest.fixture(scope="module")
def opt():
    sim = jc.simulate(n_particles=150, box=10, snr=1.0, seed=5)
    ds = jc.ArrayDataset(sim.metadata, sim.images)
    proj = jc.Projector(n=10, pixel_size=sim.metadata.pixel_size, operator="trilinear", mask_radius=4)
    return Optimum(proj, ds, 1e-3, radius=4.0, tol=1e-10)


def test_compare_is_the_optimum_s_own_measures(opt):
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(10,) * 3) + 1j * rng.normal(size=(10,) * 3)
    v = np.where(opt.mask, opt.solution + 0.3 * np.abs(opt.solution).mean() * noise, 0).astype(np.complex64)
    m = opt.compare(v, (2, 4))
    assert m["loss_gap"] == opt.gap(v)
    assert m["loss_gap_closed"] == opt.gap_closed(v)
    assert m["relative_error"] == opt.relative_error(v)
    np.testing.assert_array_equal(m["fsc"], fourier_fsc(v, opt.solution))
    assert m["min_fsc"] == float(np.min(m["fsc"][2:5]))
    assert 0 < m["loss_gap_closed"] < 100 and 0 < m["min_fsc"] < 1 and 0 < m["relative_error"] < 1
    at = opt.compare(opt.solution)
    assert "min_fsc" not in at
    assert at["loss_gap_closed"] == pytest.approx(100.0) and at["relative_error"] == 0.0
    np.testing.assert_allclose(at["fsc"][:5], 1.0, atol=1e-12)  # shells inside the ball


def test_stencil_matvec_in_jax_matches_the_host_and_differentiates(opt):
    s = opt.hessian.stencil
    rng = np.random.default_rng(2)
    z = (rng.normal(size=(10,) * 3) + 1j * rng.normal(size=(10,) * 3)).astype(np.complex64)
    host = matvec(s)(z)
    assert host.dtype == np.complex128
    mv = matvec(np.asarray(s, np.float32), xp=jnp)
    dev = jax.jit(mv)(jnp.asarray(z))
    assert dev.dtype == jnp.complex64
    assert np.linalg.norm(np.asarray(dev) - host) / np.linalg.norm(host) < 1e-5
    # H is real symmetric: the gradient of 1/2 x^T H x is H x
    x = jnp.asarray(rng.normal(size=(10,) * 3), jnp.float32)
    g = jax.grad(lambda y: 0.5 * jnp.vdot(y, mv(y)))(x)
    np.testing.assert_allclose(np.asarray(g), matvec(s)(np.asarray(x, np.float64)), rtol=1e-4, atol=1e-6)
