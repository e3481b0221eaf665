"""Full-batch reference solvers of the same objective: conjugate gradient and Wiener backprojection.

Both go through the forward model and its adjoint of :mod:`jaxcryo.projection`, one jitted function per
batch, so they stream over data sets of any size (one pass over the data per CG iteration).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .data_source import RawBatch, iterate_batches, to_batch
from .projection import Projector, slice_nearest, slice_points, slice_trilinear


class NormalEquations(NamedTuple):
    """``H v = b`` with ``H = (1/n) sum_i w_i S_i^H M S_i + lam I`` and ``b = (1/n) sum_i w_i S_i^H M y_i``."""

    matvec: Callable
    rhs: jax.Array
    n_images: int


def _cast(raw: RawBatch, dtype):
    return to_batch(raw, dtype)


def normal_equations(projector: Projector, source, batch_size: int = 256, lam: float = 0.0, indices=None,
                     dtype=jnp.float32, cache: bool = True) -> NormalEquations:
    """Build the normal equations of the least-squares loss over ``indices`` of ``source``.

    With ``cache=True`` the batches are held in host memory (fine for the small sets of tests and
    benchmarks); otherwise every matvec streams the images from ``source`` again.
    """
    rdt = dtype
    cdt = jnp.complex128 if dtype == jnp.float64 else jnp.complex64
    n = projector.n

    @jax.jit
    def batch_matvec(z, raw):
        b = _cast(raw, rdt)
        wm = (b.weights * b.mask)[:, None, None]
        y = projector(z, b.rotations, b.shifts, b.ctf) * projector.image_mask(rdt) * wm
        return projector.adjoint(y, b.rotations, b.shifts, b.ctf)

    @jax.jit
    def batch_rhs(raw):
        b = _cast(raw, rdt)
        wm = (b.weights * b.mask)[:, None, None]
        return projector.adjoint(b.images_f * projector.image_mask(rdt) * wm, b.rotations, b.shifts, b.ctf)

    batches = list(iterate_batches(source, batch_size, indices)) if cache else None

    def each():
        return batches if cache else iterate_batches(source, batch_size, indices)

    n_img = 0
    rhs = jnp.zeros((n,) * 3, cdt)
    for raw in each():
        rhs = rhs + batch_rhs(raw)
        n_img += int(raw.mask.sum())
    rhs = rhs / n_img

    def matvec(z):
        out = jnp.zeros((n,) * 3, cdt)
        for raw in each():
            out = out + batch_matvec(z, raw)
        return out / n_img + lam * z

    return NormalEquations(matvec, rhs, n_img)


class CGResult(NamedTuple):
    x: jax.Array
    residuals: list  # relative residual ||b - Hx|| / ||b|| per iteration
    iterations: int


def conjugate_gradient(matvec: Callable, b, x0=None, tol: float = 1e-4, maxiter: int = 500,
                       callback: Callable | None = None) -> CGResult:
    """Conjugate gradient for a Hermitian positive (semi)definite ``matvec`` (Python loop, one matvec per
    iteration so that ``matvec`` may stream data). Stops at relative residual ``tol``."""
    x = jnp.zeros_like(b) if x0 is None else x0
    r = b - matvec(x) if x0 is not None else b
    p = r
    rs = jnp.real(jnp.vdot(r, r))
    bnorm = float(jnp.sqrt(jnp.real(jnp.vdot(b, b))))
    res = [float(jnp.sqrt(rs)) / bnorm]
    it = 0
    while res[-1] > tol and it < maxiter:
        hp = matvec(p)
        alpha = rs / jnp.real(jnp.vdot(p, hp))
        x = x + alpha * p
        r = r - alpha * hp
        rs_new = jnp.real(jnp.vdot(r, r))
        p = r + (rs_new / rs) * p
        rs = rs_new
        it += 1
        res.append(float(jnp.sqrt(rs)) / bnorm)
        if callback is not None:
            callback(it, x, res[-1])
    return CGResult(x, res, it)


def solve_cg(projector: Projector, source, lam: float = 0.0, tol: float = 1e-4, maxiter: int = 500,
             batch_size: int = 256, indices=None, dtype=jnp.float32, x0=None, callback=None,
             exact_residual: bool = True) -> CGResult:
    """Solve the normal equations of the least-squares objective by CG (full batch).

    With ``exact_residual`` the reported final residual is recomputed as ``||b - Hx|| / ||b||``.
    """
    ne = normal_equations(projector, source, batch_size, lam, indices, dtype)
    res = conjugate_gradient(ne.matvec, ne.rhs, x0, tol, maxiter, callback)
    if exact_residual:
        true = float(jnp.linalg.norm(ne.rhs - ne.matvec(res.x)) / jnp.linalg.norm(ne.rhs))
        res.residuals.append(true)
    return res


def wiener_backprojection(projector: Projector, source, lam: float = 0.0, batch_size: int = 256,
                          indices=None, dtype=jnp.float32):
    """Direct Wiener-filter reconstruction ``(sum_i S_i^H w_i y_i) / (sum_i P_i^T (w_i CTF_i^2) + lam)``.

    ``S_i^H`` is the adjoint of the forward model (CTF, shift phase, slice) and ``P_i^T`` backprojects a
    real weight image through the same slice kernel without phases, as RELION and cryoDRGN do
    (the CTF^2 "weights" volume). Both sums are divided by the number of images so ``lam`` is on the scale
    of the loss. Exact for noise-free ``nearest`` data in every voxel some slice hits (with ``lam -> 0``).

    Returns ``(vol_f, weights)``: the centred Fourier volume and the weight volume.
    """
    rdt = dtype
    cdt = jnp.complex128 if dtype == jnp.float64 else jnp.complex64
    n = projector.n
    if projector.method == "nufft" or projector.oversample != 1:
        kernel = "trilinear"
    else:
        kernel = projector.method

    @jax.jit
    def one(raw):
        b = to_batch(raw, rdt)
        wm = (b.weights * b.mask)[:, None, None]
        num = projector.adjoint(b.images_f * projector.image_mask(rdt) * wm, b.rotations, b.shifts, b.ctf)
        ctf = projector.ctf(b.ctf, rdt)
        w = jnp.broadcast_to(projector.image_mask(rdt), b.images_f.shape) * wm
        if ctf is not None:
            w = w * ctf * ctf
        pts = slice_points(b.rotations, n, rdt)
        fwd = (lambda v: slice_nearest(v, pts)) if kernel == "nearest" else (lambda v: slice_trilinear(v, pts))
        (den,) = jax.linear_transpose(fwd, jax.ShapeDtypeStruct((n,) * 3, rdt))(w)
        return num, den

    num = jnp.zeros((n,) * 3, cdt)
    den = jnp.zeros((n,) * 3, rdt)
    count = 0
    for raw in iterate_batches(source, batch_size, indices):
        a, d = one(raw)
        num, den = num + a, den + d
        count += int(raw.mask.sum())
    num, den = num / count, den / count
    safe = den + lam
    vol = jnp.where(safe > 0, num / jnp.where(safe > 0, safe, 1), 0)
    return vol, den


def relative_error_in_ball(x, ref, radius: float | None = None) -> float:
    """``||x - ref|| / ||ref||`` over the Fourier voxels with ``|k| <= radius`` (default ``n/2``)."""
    from .fourier import ball_mask

    m = jnp.asarray(ball_mask(x.shape[-1], radius))
    return float(jnp.linalg.norm(jnp.where(m, x - ref, 0)) / jnp.linalg.norm(jnp.where(m, ref, 0)))


def largest_eigenvalue(matvec: Callable, shape, dtype=jnp.complex64, iters: int = 30, seed: int = 0) -> float:
    """Power-iteration estimate of the largest eigenvalue of a Hermitian PSD ``matvec``."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    lam = 0.0
    for _ in range(iters):
        y = matvec(x)
        lam = float(jnp.real(jnp.vdot(x, y)) / jnp.real(jnp.vdot(x, x)))
        x = y / jnp.linalg.norm(y)
    return lam
