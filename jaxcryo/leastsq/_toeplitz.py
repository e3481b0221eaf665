"""The exact normal operator of the NUFFT model as a convolution on the ``2N`` grid (ASPIRE's approach).

For the NUFFT forward model (:class:`jaxcryo.forward.NUFFT`, :class:`jaxcryo.forward.Projector`)

    ``Y_i(k) = M(k) CTF_i(k) phase_i(k) V(q_ik)``,   ``V(q) = sum_r v(r) exp(-2 pi i q . r / N)``,

with ``v = ifft3c(vol_f)`` on the centred grid and ``q_ik`` the slice point of pixel ``k`` of image ``i``
(:func:`jaxcryo.forward.slice_points`), write ``A`` for the type-2 NUFFT ``v -> V(q)`` and
``F = fft3c`` (unnormalised, so ``ifft3c = F^H / N^3``). Since ``|phase| = 1`` and ``M`` (0/1), ``CTF`` are
real, the Hessian of the loss (:mod:`jaxcryo.leastsq`, :func:`~jaxcryo.leastsq.normal_equations`) is

    ``H z = (1/n) sum_i w_i S_i^H M S_i z + lam z = F T F^H z / N^6 + lam z = fft3c(T ifft3c(z)) / N^3 + lam z``

with ``T = (1/n) sum_i A_i^H diag(w_i M CTF_i^2) A_i`` a Toeplitz operator on the ``N^3`` real-space grid:

    ``(T v)(r) = sum_r' K(r - r') v(r')``,   ``K(d) = (1/n) sum_{i,k} w_i M(k) CTF_i(k)^2 exp(+2 pi i q_ik . d / N)``

for ``d`` in ``[-(N-1), N-1]^3``: a type-1 NUFFT (``iflag=+1``) of the weights at the slice points onto
``2N`` centred modes, computed once per data set (:func:`toeplitz_kernel`, streamed in chunks of images,
reading metadata only). Embedded in a circulant on the ``2N`` grid,

    ``T v = crop(ifftn(fftn(K_circ) * fftn(pad(v, 2N))))``,

so every Hessian-vector product costs four FFTs and no pass over the data, whatever the number of
particles. ``fftn(K_circ)`` is real: ``K`` is Hermitian (``K(-d) = conj K(d)``) once the unused ``d = -N``
planes are zeroed; taking its real part keeps the operator exactly Hermitian. The right-hand side
``b = (1/n) sum_i w_i S_i^H M y_i`` still needs one adjoint pass over the images.

Accuracy: the kernel is exact up to the NUFFT tolerance (default ``1e-6`` in single precision, ``1e-12`` in
double, or the operator's ``eps``); the operator agrees with the explicit data-pass operator to about
``1e-6`` relative in complex64 and ``1e-12`` in complex128.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Complex, Float, Int

from ..data._batch import complex_dtype, epoch_batches, load_batch, to_batch
from ..forward._ctf import CTFParams, evaluate_ctf
from ..errors import InputError
from ..ndimage._fourier import fft3c, ifft3c
from ._hessian import NormalEquations
from ._linalg import CGResult, conjugate_gradient
from ..forward._operators import NUFFT, describe, finufft
from ._priors import Prior, prior_diagonal
from ..forward._projection import Projector


class ToeplitzKernel(NamedTuple):
    """The normal operator's convolution kernel, ready to apply.

    Attributes:
        fourier: real ``(2N, 2N, 2N)``: ``fftn`` of the circulant embedding of ``sum_i w_i K_i`` (not yet
            divided by the number of images), in the real dtype of the build.
        n_images: number of images summed (``indices`` of the source).
        n: box size ``N``.
    """

    fourier: jax.Array
    n_images: int
    n: int


def _check(projector: Projector):
    if not isinstance(projector.operator, NUFFT):
        raise InputError(f"the Toeplitz normal operator is the NUFFT model's; {{param}} is "
                         f"{describe(projector.operator)}", param="interp")


def _eps(projector: Projector, rdt) -> float:
    eps = getattr(projector.operator, "eps", None)
    if eps is not None:
        return float(eps)
    return 1e-12 if rdt == jnp.float64 else 1e-6


def _pixel_sets(projector: Projector):
    """Static pixel sets of the modelled image frequencies (``M = 1``), as ``(iy, ix, strength)``.

    ``M CTF^2`` is even in ``k`` and ``q(-k) = -q(k)``, so each pair ``{k, -k}`` inside the mask is summed
    once (``k`` in the upper half plane; the origin with strength 1/2), and the unpaired pixels (the
    Nyquist row/column of even boxes) with strength ``i``; :func:`_kernel_from_half` rebuilds ``K``.
    """
    n = projector.n
    m = np.asarray(projector.image_mask(jnp.float32)) > 0
    c = n // 2
    iy, ix = np.nonzero(m)
    ky, kx = iy - c, ix - c
    py, px = c - ky, c - kx  # the pixel of -k
    inside = (py >= 0) & (py < n) & (px >= 0) & (px < n)
    paired = np.zeros_like(inside)
    paired[inside] = m[py[inside], px[inside]]
    upper = (ky > 0) | ((ky == 0) & (kx > 0))
    origin = (ky == 0) & (kx == 0)
    keep = (paired & (upper | origin)) | ~paired
    strength = np.where(~paired, 1j, np.where(origin, 0.5, 1.0))
    return iy[keep], ix[keep], strength[keep]


def _negate(f):
    """``f(-d)`` on the centred ``2N`` grid of modes ``-N..N-1`` (``d = -N`` maps to itself)."""
    for ax in range(f.ndim):
        f = jnp.roll(jnp.flip(f, ax), 1, ax)
    return f


def _kernel_from_half(g):
    """``K`` from ``G = sum_pairs W e^{i q.d} + i sum_unpaired W e^{i q.d}``: with ``C``/``S`` the cosine
    and sine sums, ``Re G = C_pairs - S_unpaired`` and ``Im G = S_pairs + C_unpaired``, so
    ``K = 2 C_pairs + C_unpaired + i S_unpaired = 2 even(Re G) + even(Im G) - i odd(Re G)``."""
    re, im = jnp.real(g), jnp.imag(g)
    re_n, im_n = _negate(re), _negate(im)
    even_re, odd_re, even_im = (re + re_n) / 2, (re - re_n) / 2, (im + im_n) / 2
    return jax.lax.complex(2 * even_re + even_im, -odd_re)


#: Points (image pixels) per type-1 NUFFT call of the kernel build when ``batch_size`` is not given: large
#: calls amortise the NUFFT's FFT on the upsampled ``2N`` grid; about 20 bytes per point (float32).
CHUNK_POINTS = 2**23


def _metadata_chunks(source, indices, batch_size: int, weights, rdt):
    """Per chunk (static size ``batch_size``, ragged end padded with zero weight): rotations, CTF, ``w mask``."""
    # the values load_batch gives the data-pass operator (float32 metadata), so both build the same model
    md = source.metadata
    if indices is None:
        indices = np.arange(len(md))
    for idx, mask in epoch_batches(indices, batch_size):
        f32 = lambda a: jnp.asarray(np.asarray(a, np.float32), rdt)  # noqa: E731
        w = np.ones(len(idx), np.float32) if weights is None else np.asarray(weights, np.float32)[idx]
        ctf = None if md.ctf is None else CTFParams(*(f32(np.asarray(f)[idx]) for f in md.ctf))
        yield f32(np.asarray(md.rotations)[idx]), ctf, f32(w) * f32(mask), float(mask.sum())


@partial(jax.jit, static_argnames=("projector", "eps"))
def _kernel_chunk(projector: Projector, eps: float, pix, rots, ctf, wm):
    """``G`` (see :func:`_kernel_from_half`) of one chunk of images: a type-1 NUFFT onto ``2N`` modes."""
    n = projector.n
    m = 2 * n
    k2, freqs, strength = pix
    # the slice points (kx, ky, 0) @ A of the kept pixels, (B, P, 3) xyz in voxel units (as
    # projection.slice_points), and the CTF at those pixels only
    pts = jnp.einsum("pi,bij->bpj", k2, rots[:, :2, :])
    w = wm[:, None] * strength
    if ctf is not None:
        c = evaluate_ctf(ctf, freqs[None])[:, 0]
        w = w * (c * c)
    x = pts.reshape(-1, 3) * (2 * jnp.pi / n)
    x = x - 2 * jnp.pi * jnp.round(x / (2 * jnp.pi))  # into [-pi, pi]: exact for integer modes
    # modes [dz, dy, dx] in -N..N-1 (CMCL), points paired (z, y, x): sum_j w_j exp(+i d . x_j)
    return finufft().nufft1((m, m, m), w.reshape(-1), x[:, 2], x[:, 1], x[:, 0], iflag=1, eps=eps)


@partial(jax.jit, static_argnames=("rdt",))
def _finish(g, rdt):
    """``fftn`` of the circulant embedding of ``K`` (real)."""
    k = _kernel_from_half(g)
    # d = -N (index 0 of each centred axis) is never used by the crop; zero it so K is Hermitian
    k = k.at[0].set(0).at[:, 0].set(0).at[:, :, 0].set(0)
    return jnp.real(jnp.fft.fftn(jnp.fft.ifftshift(k))).astype(rdt)


def toeplitz_kernel(projector: Projector, source, indices: Int[ArrayLike, " k"] | None = None,
                    batch_size: int | None = None,
                    dtype=jnp.float32, weights: Float[ArrayLike, " n"] | None = None) -> ToeplitzKernel:
    """The convolution kernel of ``sum_i w_i S_i^H M S_i`` for the NUFFT ``projector`` over ``indices`` of
    ``source`` (see the module docstring).

    Streams the metadata (rotations, CTF) in chunks of ``batch_size`` images, one jitted type-1 NUFFT per
    chunk (static shape; the last chunk padded with zero weights); images are not read.

    Args:
        projector: a :class:`~jaxcryo.forward.Projector` with the :class:`~jaxcryo.forward.NUFFT`
            operator (others raise :class:`~jaxcryo.errors.InputError`, parameter ``interp``).
        source: a particle source (only its ``metadata`` is used).
        indices: the particles (default all).
        batch_size: images per chunk (static: one compilation); default about :data:`CHUNK_POINTS` image
            pixels per chunk (few large NUFFT calls amortise their FFT on the upsampled ``2N`` grid; memory
            about 40 bytes per pixel in float32).
        dtype: ``jnp.float32`` or ``jnp.float64`` (needs ``jax_enable_x64``).
        weights: per-particle weights ``w_i`` of the source (default ones), as :func:`~jaxcryo.data.load_batch`.
    """
    _check(projector)
    rdt = jnp.dtype(dtype)
    cdt = complex_dtype(rdt)
    n = projector.n
    m = 2 * n
    eps = _eps(projector, rdt)
    iy, ix, strength = _pixel_sets(projector)
    pix = (jnp.asarray(np.stack([ix - n // 2, iy - n // 2], axis=-1), rdt),  # (kx, ky) of the kept pixels
           projector.freqs(rdt)[iy, ix], jnp.asarray(strength, cdt))
    n_total = len(source.metadata) if indices is None else len(np.asarray(indices).reshape(-1))
    if batch_size is None:
        batch_size = max(1, min(n_total, CHUNK_POINTS // max(1, len(iy))))

    total = jnp.zeros((m, m, m), cdt)
    count = 0.0
    for rots, ctf, wm, c in _metadata_chunks(source, indices, batch_size, weights, rdt):
        total = total + _kernel_chunk(projector, eps, pix, rots, ctf, wm)
        count += c
    if count == 0:
        raise InputError("{param} selects no particles", param="indices")
    return ToeplitzKernel(_finish(total, rdt), int(count), n)


def _apply(kf, z, scale, lam):
    n = z.shape[-1]
    v = ifft3c(z)
    t = jnp.fft.ifftn(kf * jnp.fft.fftn(v, s=(2 * n,) * 3))[:n, :n, :n]
    return fft3c(t) * scale + lam * z


_apply_jit = jax.jit(_apply)


def toeplitz_matvec(kernel: ToeplitzKernel, lam: float | Prior = 0.0):
    """The matvec ``z -> H z`` (complex centred Fourier volumes ``(N, N, N)``) of the kernel: one jitted
    function of four FFTs; ``H = (1/n) sum_i w_i S_i^H M S_i + lam I``."""
    n = kernel.n
    kf = kernel.fourier
    scale = jnp.asarray(1.0 / (kernel.n_images * float(n) ** 3), kf.dtype)
    lam_ = jnp.asarray(prior_diagonal(lam, kernel.n, kf.dtype), kf.dtype)
    cdt = complex_dtype(kf.dtype)

    def matvec(z):
        return _apply_jit(kf, jnp.asarray(z, cdt), scale, lam_)

    return matvec


def _rhs(projector: Projector, source, batch_size: int, indices, rdt, weights):
    cdt = complex_dtype(rdt)
    n = projector.n

    @jax.jit
    def batch_rhs(raw):
        b = to_batch(raw, rdt)
        wm = (b.weights * b.mask)[:, None, None]
        return projector.adjoint(b.images_f * projector.image_mask(rdt) * wm, b.rotations, b.shifts, b.ctf)

    if indices is None:
        indices = np.arange(len(source.metadata))
    rhs = jnp.zeros((n,) * 3, cdt)
    count = 0.0
    for idx, mask in epoch_batches(indices, batch_size):
        rhs = rhs + batch_rhs(load_batch(source, idx, mask, weights))
        count += float(mask.sum())
    return rhs, count


def toeplitz_normal_equations(projector: Projector, source, batch_size: int = 256, lam: float | Prior = 0.0,
                              indices: Int[ArrayLike, " k"] | None = None, dtype=jnp.float32,
                              weights: Float[ArrayLike, " n"] | None = None, kernel_batch_size: int | None = None
                              ) -> NormalEquations:
    """The normal equations ``H v = b`` of :func:`jaxcryo.leastsq.normal_equations` for the NUFFT model,
    with ``H`` applied by the Toeplitz kernel (:func:`toeplitz_kernel`, one metadata pass; chunks of
    ``kernel_batch_size`` images) and ``b`` from one adjoint pass over the images in batches of
    ``batch_size``. Same arguments and return type as :func:`~jaxcryo.leastsq.normal_equations`;
    ``weights``: per-particle ``w_i`` (default ones)."""
    _check(projector)
    kernel = toeplitz_kernel(projector, source, indices, kernel_batch_size, dtype, weights)
    rhs, count = _rhs(projector, source, batch_size, indices, jnp.dtype(dtype), weights)
    return NormalEquations(toeplitz_matvec(kernel, lam), rhs / count, kernel.n_images)


def solve_cg_toeplitz(projector: Projector, source, lam: float | Prior = 0.0, tol: float = 1e-4, maxiter: int = 500,
                      batch_size: int = 256, indices: Int[ArrayLike, " k"] | None = None, dtype=jnp.float32,
                      x0: Complex[ArrayLike, "n n n"] | None = None, callback=None, exact_residual: bool = True,
                      weights: Float[ArrayLike, " n"] | None = None, kernel_batch_size: int | None = None) -> CGResult:
    """:func:`jaxcryo.leastsq.solve_cg` with the Toeplitz normal operator (NUFFT model): CG iterations cost
    FFTs only. With ``exact_residual`` the final ``||b - Hx|| / ||b||`` is recomputed and appended."""
    ne = toeplitz_normal_equations(projector, source, batch_size, lam, indices, dtype, weights, kernel_batch_size)
    res = conjugate_gradient(ne.matvec, ne.rhs, x0, tol, maxiter, callback)
    if exact_residual:
        true = float(jnp.linalg.norm(ne.rhs - ne.matvec(res.x)) / jnp.linalg.norm(ne.rhs))
        res.residuals.append(true)
    return res
