"""The Toeplitz (kernel) normal operator of the NUFFT model (issue 9, item 5) against the explicit data-pass
operator of :func:`jaxcryo.leastsq._hessian.normal_equations`: same matvec (acceptance: 1e-5 relative), Hermitian,
same CG solution. Timing is not asserted (see ``benchmarks/toeplitz_cg.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcryo.leastsq._hessian as hessian
from jaxcryo.data._batch import complex_dtype, epoch_batches, load_batch
from jaxcryo.errors import InputError
from jaxcryo.leastsq._linalg import conjugate_gradient, relative_error_in_ball
from jaxcryo.forward._projection import Projector
from jaxcryo.data._simulate import simulate
from jaxcryo.data._sources import ArrayDataset
from jaxcryo.leastsq._toeplitz import solve_cg_toeplitz, toeplitz_kernel, toeplitz_normal_equations


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _data(n, n_img=200, seed=0):
    s = simulate(n_img, n, snr=1.0, seed=seed)  # CTF on, shifts up to 2 px
    src = ArrayDataset(s.metadata, s.images)
    weights = np.random.default_rng(seed).uniform(0.3, 2.0, n_img)  # per-particle w_i != 1
    return src, weights, Projector(n=n, pixel_size=s.metadata.pixel_size, operator="nufft")


@pytest.fixture
def weighted(monkeypatch):
    """Make hessian.normal_equations read per-particle weights (its batches have w_i = 1 otherwise)."""
    box = {}

    def iterate(source, batch_size, indices=None, rng=None):
        idx = np.arange(len(source.metadata)) if indices is None else indices
        for i, m in epoch_batches(idx, batch_size, rng):
            yield load_batch(source, i, m, box.get("w"))

    monkeypatch.setattr(hessian, "iterate_batches", iterate)
    return box


def _random(n, dtype, seed):
    r = np.random.default_rng(seed)
    return jnp.asarray(r.standard_normal((n,) * 3) + 1j * r.standard_normal((n,) * 3), complex_dtype(dtype))


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _compare(n, dtype, weighted, lam=0.0, indices=None):
    src, w, proj = _data(n)
    weighted["w"] = w
    ne = hessian.normal_equations(proj, src, 64, lam, indices, dtype)
    # kernel chunks of 48 images: several chunks and a padded (zero-weight) last one
    nt = toeplitz_normal_equations(proj, src, 64, lam, indices, dtype, weights=w, kernel_batch_size=48)
    assert nt.n_images == ne.n_images
    errs = [_rel(nt.matvec(z), ne.matvec(z)) for z in (_random(n, dtype, 1), _random(n, dtype, 2))]
    return max(errs), _rel(nt.rhs, ne.rhs)


@pytest.mark.parametrize("n", [12, 9])
def test_kernel_operator_equals_explicit_normal_operator(n, weighted):
    """Even and odd boxes, CTF, shifts, weights != 1, lam > 0: the acceptance bound 1e-5 in float32."""
    err, rhs_err = _compare(n, jnp.float32, weighted, lam=1e-3)
    assert err < 1e-5, err
    assert rhs_err < 1e-6, rhs_err


def test_kernel_operator_float64(x64, weighted):
    err, rhs_err = _compare(10, jnp.float64, weighted, indices=np.arange(7, 190))
    assert err < 1e-10, err
    assert rhs_err < 1e-12, rhs_err


def test_kernel_chunking_and_dtype():
    src, w, proj = _data(8, 150)
    a = toeplitz_kernel(proj, src, weights=w)  # one chunk
    b = toeplitz_kernel(proj, src, batch_size=32, weights=w)  # five chunks, the last padded
    assert a.fourier.shape == (16, 16, 16) and a.fourier.dtype == jnp.float32 and a.n_images == 150
    assert _rel(b.fourier, a.fourier) < 1e-6


def test_toeplitz_operator_is_hermitian_positive():
    src, w, proj = _data(8)
    mv = toeplitz_normal_equations(proj, src, weights=w).matvec
    x, y = _random(8, jnp.float32, 3), _random(8, jnp.float32, 4)
    lhs, rhs = jnp.vdot(mv(x), y), jnp.vdot(x, mv(y))
    assert abs(lhs - rhs) < 1e-6 * abs(lhs)
    q = jnp.vdot(x, mv(x))
    assert float(q.real) > 0 and abs(q.imag) < 1e-6 * q.real


def test_cg_converges_to_the_explicit_solution(weighted):
    n = 10
    src, w, proj = _data(n, 300)
    weighted["w"] = w
    lam = 1e-2
    ne = hessian.normal_equations(proj, src, 100, lam)
    ref = conjugate_gradient(ne.matvec, ne.rhs, tol=1e-6, maxiter=300)
    res = solve_cg_toeplitz(proj, src, lam, tol=1e-6, maxiter=300, batch_size=100, weights=w)
    assert res.residuals[-1] < 1e-5  # the recomputed true residual
    assert abs(res.iterations - ref.iterations) <= max(3, ref.iterations // 10)
    assert relative_error_in_ball(res.x, ref.x) < 1e-4


def test_needs_the_nufft_operator():
    src, _, _ = _data(8, 10)
    with pytest.raises(InputError) as e:
        toeplitz_kernel(Projector(n=8, pixel_size=3.0, operator="trilinear"), src)
    assert e.value.param == "interp"
