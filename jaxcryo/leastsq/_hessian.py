"""The Hessian of the known-pose objective and its exact pieces: diagonal, stencil, operator, normal equations.

For the loss of :mod:`jaxcryo.loss` the Hessian is constant,

    ``H = (1/n) sum_i w_i S_i^H M S_i + lam I``,

and does not depend on the in-plane shifts (``|exp(2 pi i k.o)| = 1``). With the CTF and the image mask
folded into per-pixel weights ``W_i = M CTF_i^2 w_i`` (:func:`weight_image`, the one place they are formed):

* **diagonal**: ``diag H = (1/n) sum_i P_i^T W_i + lam`` with ``P_i`` the slice with squared interpolation
  weights, exact for operators with a local stencil (:func:`batch_diagonal_sum`, :func:`exact_diagonal`);
* **stencil**: for those operators ``H`` itself is a 27-point stencil (:func:`hessian_stencil`,
  :mod:`jaxcryo.leastsq`); :func:`hessian_operator` wraps it, or Hessian-vector products for the others;
* **minibatch diagonal**: the exact diagonal of one minibatch's Hessian (:func:`minibatch_diagonal`, the
  preconditioner of :func:`jaxcryo.solvers.batch_diagonal`);
* **normal equations** ``H v = b``, ``b = (1/n) sum_i w_i S_i^H M y_i`` (:func:`normal_equations`), solved by
  CG (:func:`solve_cg`) or approximated in one pass by the Wiener filter
  (:func:`jaxcryo.solvers.wiener_backprojection`, whose ``CTF^2`` weights are the same backprojection of
  ``W_i``, :func:`weight_backprojection`).

Which of these apply is read from the slice operator's properties (``has_local_stencil``,
``has_diagonal_hessian``, ``weight_kernel()``), never from its name.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Complex, Float, Int

from ..errors import InputError
from ..jax_util import primal_like, psum
from . import _stencil as stencil
from ..data._batch import Batch, complex_dtype, iterate_batches, make_batch, to_batch
from ..forward._ctf import CTFParams
from ._linalg import CGResult, conjugate_gradient
from ._loss import batch_filters, hvp, loss
from ..forward._operators import describe, local_stencil_operator
from ._priors import Prior, prior_diagonal
from ..forward._projection import Projector, slice_points


# --------------------------------------------------------------------------------------------------
# Pixel weights and their backprojection
# --------------------------------------------------------------------------------------------------
def weight_image(projector: Projector, n_images: int, ctf: CTFParams | None = None,
                 scale: Float[ArrayLike, " b"] | None = None, dtype=jnp.float32, host: bool = False
                 ) -> Float[ArrayLike, "b n n"]:
    """The per-pixel Hessian weights ``M CTF_i^2 scale_i`` ``(n_images, n, n)``.

    ``M`` is the projector's image-frequency mask, ``CTF_i`` the CTF of ``ctf`` (omitted if ``None``) and
    ``scale`` ``(n_images,)`` per-image factors (``w_i mask_i``; omitted if ``None``). JAX in ``dtype``
    (traceable), or with ``host`` NumPy float64 products of the float32 mask and CTF values (the stencil's
    arithmetic).
    """
    edt = jnp.float32 if host else dtype
    m, c = projector.image_mask(edt), projector.ctf(ctf, edt)
    xp = np if host else jnp
    if host:
        m, c = np.asarray(m, np.float64), (None if c is None else np.asarray(c, np.float64))
    w = xp.broadcast_to(m, (n_images, projector.n, projector.n))
    if c is not None:
        w = w * c * c
    if scale is not None:
        w = w * scale[:, None, None]
    return w


def weight_backprojection(projector: Projector, batch: Batch, squared: bool = True,
                          pixels: tuple[Int[ArrayLike, " p"], Float[ArrayLike, " p"]] | None = None
                          ) -> Float[Array, "n n n"]:
    """``sum_i P_i^T (M CTF_i^2 w_i mask_i)`` over one batch, real ``(n, n, n)`` in the batch's precision.

    ``squared=True``: ``P_i`` is the projector operator's slice with squared interpolation weights, so this is
    ``sum_i w_i mask_i diag(S_i^H M S_i)`` exactly (operators with a local stencil; others raise
    ``NotImplementedError``). ``squared=False``: ``P_i`` is the plain slice of ``operator.weight_kernel()``,
    the ``CTF^2`` weights of a one-pass Wiener estimate (as RELION and cryoDRGN).
    """
    n = projector.n
    rdt = jnp.real(batch.images_f).dtype
    op = projector.operator
    fwd = local_stencil_operator(op).squared_weight_slice if squared else op.weight_kernel().slice
    pts = slice_points(batch.rotations, n, rdt)
    b = batch.images_f.shape[0]
    w = weight_image(projector, b, batch.ctf, batch.weights * batch.mask, rdt)
    if pixels is not None:  # a subset of the pixels, each scaled (Projector.hermitian_pixels)
        idx, pw = pixels
        pts, w = pts.reshape(b, -1, 3)[:, idx], w.reshape(b, -1)[:, idx] * jnp.asarray(pw, rdt)
    # in a data-parallel pass (shard_map): this device's partial sum (parallel.primal_like), reduced by the caller
    (d,) = jax.linear_transpose(lambda v: fwd(v, pts), primal_like((n,) * 3, rdt, w, pts))(w)
    return d


# --------------------------------------------------------------------------------------------------
# Exact diagonal
# --------------------------------------------------------------------------------------------------
def batch_diagonal_sum(projector: Projector, batch: Batch) -> Float[Array, "n n n"]:
    """``sum_i w_i mask_i diag(S_i^H M S_i)`` over one batch (real ``(n, n, n)``), exact for operators with a
    local stencil: the backprojection of ``w CTF^2 M`` through the hit counts / squared interpolation weights."""
    return weight_backprojection(projector, batch, squared=True)


def exact_diagonal(projector: Projector, batches, lam: float | Prior = 0.0, n_images: int | None = None
                   ) -> Float[Array, "n n n"]:
    """The exact diagonal of the full-data Hessian ``(1/n) sum_i w_i S_i^H M S_i + lam``, in one data pass.

    Args:
        projector: a :class:`~jaxcryo.forward.Projector` whose operator has a local stencil (nearest or
            trilinear without oversampling).
        batches: an iterable of :class:`~jaxcryo.data.Batch` (padding masked out) or a single Batch.
        lam: Tikhonov weight or a :class:`~jaxcryo.leastsq.Prior` (its ``lambda_j`` are added).
        n_images: number of real images (default: the sum of the batch masks).
    """
    if isinstance(batches, Batch):
        batches = [batches]
    f = jax.jit(lambda b: batch_diagonal_sum(projector, b))
    total, count = None, 0.0
    for b in batches:
        d = f(b)
        total = d if total is None else total + d
        count += float(jnp.sum(b.mask))
    if total is None:
        raise InputError("exact_diagonal: no batches")
    n = count if n_images is None else n_images
    return total / n + prior_diagonal(lam, total.shape[-1], total.dtype)


# --------------------------------------------------------------------------------------------------
# The Hessian as an operator
# --------------------------------------------------------------------------------------------------
def hessian_stencil(projector: Projector, rotations: Float[ArrayLike, "b 3 3"], ctf: CTFParams | None = None,
                    lam: float = 0.0, chunk: int | None = None) -> Float[np.ndarray, "27 n n n"]:
    """The exact Hessian of a local slice operator as a 27-point stencil ``(27, N, N, N)`` float64.

    See :mod:`jaxcryo.leastsq` for the layout (``S[13]`` is the diagonal). ``H = (1/B) sum_i T_i^T
    (M CTF_i^2) T_i + lam I`` with ``T_i`` the interpolation matrix of image ``i``. Assembled with
    ``np.bincount`` in chunks of ``chunk`` images (default: about 1e7 terms per chunk).
    """
    op = projector.operator
    if not op.has_local_stencil:
        raise NotImplementedError(f"the assembled Hessian needs a slice operator with a local stencil, not "
                                  f"{describe(op)}; use hessian_operator(..., mode='hvp')")
    n = projector.n
    rots = jnp.asarray(rotations, jnp.float32)
    nimg = int(rots.shape[0])
    npix = max(1, int(np.asarray(projector.image_mask()).sum()))
    if chunk is None:  # about 1e7 (pixel, corner pair) terms per bincount
        chunk = max(1, int(1e7 // (stencil.TERMS_PER_POINT * npix)))

    def chunks():
        for b0 in range(0, nimg, chunk):
            b1 = min(b0 + chunk, nimg)
            c = None if ctf is None else CTFParams(*(jnp.asarray(np.asarray(f)[b0:b1], jnp.float32) for f in ctf))
            w = weight_image(projector, b1 - b0, c, host=True)
            keep = w != 0
            yield np.asarray(slice_points(rots[b0:b1], n, jnp.float32))[keep], w[keep]

    return stencil.assemble(chunks(), n, nimg, op.has_diagonal_hessian, lam)


class HessianOperator:
    """A matvec ``z -> H z`` on complex ``(N, N, N)`` volumes (returns ``np.complex128``).

    Attributes:
        n: box size.
        is_real: True when ``H`` is a real symmetric matrix (real interpolation weights and CTF), so its
            eigenvalues can be computed with real vectors.
        stencil: the assembled ``(27, N, N, N)`` stencil, or ``None`` (HVP mode).
        n_matvecs: matvecs applied so far.
    """

    def __init__(self, n: int, fn: Callable, is_real: bool, stencil: np.ndarray | None = None):
        self.n, self._fn, self.is_real, self.stencil, self.n_matvecs = n, fn, is_real, stencil, 0

    def __call__(self, z):
        self.n_matvecs += 1
        return self._fn(z)

    def diagonal(self) -> np.ndarray:
        """``diag H`` (real ``(N, N, N)``; stencil mode only)."""
        if self.stencil is None:
            raise NotImplementedError("diagonal() needs the assembled stencil; use hessian.exact_diagonal")
        return self.stencil[13].copy()


def hessian_operator(projector: Projector, rotations: Float[ArrayLike, "b 3 3"],
                     shifts: Float[ArrayLike, "b 2"] | None = None, ctf: CTFParams | None = None,
                     lam: float = 0.0, mode: str = "auto", chunk: int = 250) -> HessianOperator:
    """The Hessian ``H`` of the known-pose loss (:func:`jaxcryo.leastsq.loss`, weights 1) as a matvec.

    Args:
        projector: the forward model.
        rotations: ``(B, 3, 3)`` RELION matrices.
        shifts: ``(B, 2)`` origins in Å (default zeros; ``H`` does not depend on them).
        ctf: per-image :class:`CTFParams` or ``None``.
        lam: Tikhonov weight.
        mode: ``"stencil"`` (assemble once; operators with a local stencil), ``"hvp"`` (Hessian-vector
            products of :func:`jaxcryo.leastsq.loss` at ``v = 0`` with all-zero images, jitted, in chunks of
            ``chunk`` images) or ``"auto"`` (stencil where possible).

    Returns:
        a :class:`HessianOperator` (callable ``z -> H z``, complex in, ``np.complex128`` out).
    """
    n = projector.n
    if mode == "auto":
        mode = "stencil" if projector.operator.has_local_stencil else "hvp"
    if mode == "stencil":
        s = hessian_stencil(projector, rotations, ctf, lam)
        smv = stencil.matvec(s)
        return HessianOperator(n, lambda z: smv(np.asarray(z, np.complex128)), True, s)
    if mode != "hvp":
        raise ValueError(f"mode must be 'auto', 'stencil' or 'hvp', got {mode!r}")

    rdt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    cdt = complex_dtype(rdt)
    nimg = int(np.shape(rotations)[0])
    sh = np.zeros((nimg, 2)) if shifts is None else np.asarray(shifts)
    batches = []
    for b0 in range(0, nimg, chunk):
        b1 = min(b0 + chunk, nimg)
        c = None if ctf is None else CTFParams(*(np.asarray(f)[b0:b1] for f in ctf))
        batches.append(make_batch(np.zeros((b1 - b0, n, n)), np.asarray(rotations)[b0:b1], sh[b0:b1], c,
                                  dtype=rdt))
    v0 = jnp.zeros((n,) * 3, cdt)

    @jax.jit
    def one(z, batch):
        return hvp(lambda v: loss(v, batch, projector), v0, z)

    def mv(z):
        z = jnp.asarray(z, cdt)
        out = np.zeros((n,) * 3, np.complex128)
        for b in batches:
            out += (b.mask.shape[0] / nimg) * np.asarray(one(z, b), np.complex128)
        return out + lam * np.asarray(z, np.complex128)

    return HessianOperator(n, mv, False, None)


# --------------------------------------------------------------------------------------------------
# Normal equations, CG and Wiener
# --------------------------------------------------------------------------------------------------
class NormalEquations(NamedTuple):
    """``H v = b`` with ``H = (1/n) sum_i w_i S_i^H M S_i + lam I`` and ``b = (1/n) sum_i w_i S_i^H M y_i``."""

    matvec: Callable
    rhs: jax.Array
    n_images: int


def normal_equations(projector: Projector, source, batch_size: int = 256, lam: float | Prior = 0.0,
                     indices: Int[ArrayLike, " k"] | None = None, dtype=jnp.float32, cache: bool = True
                     ) -> NormalEquations:
    """Build the normal equations of the least-squares loss over ``indices`` of ``source``.

    One jitted function per batch, so they stream over data sets of any size (one pass over the data per
    matvec). With ``cache=True`` the batches are held in host memory (fine for the small sets of tests and
    benchmarks); otherwise every matvec streams the images from ``source`` again.
    """
    rdt = dtype
    cdt = complex_dtype(dtype)
    n = projector.n

    @jax.jit
    def batch_matvec(z, raw):
        b = to_batch(raw, rdt)
        wm = (b.weights * b.mask)[:, None, None]
        y = projector(z, b.rotations, b.shifts, b.ctf) * projector.image_mask(rdt) * wm
        return projector.adjoint(y, b.rotations, b.shifts, b.ctf)

    @jax.jit
    def batch_rhs(raw):
        b = to_batch(raw, rdt)
        wm = (b.weights * b.mask)[:, None, None]
        return projector.adjoint(b.images_f * projector.image_mask(rdt) * wm, b.rotations, b.shifts, b.ctf)

    batches = list(iterate_batches(source, batch_size, indices)) if cache else None

    def each():
        return batches if cache else iterate_batches(source, batch_size, indices)

    lam_diag = prior_diagonal(lam, n, rdt)
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
        return out / n_img + lam_diag * z

    return NormalEquations(matvec, rhs, n_img)


def solve_cg(projector: Projector, source, lam: float | Prior = 0.0, tol: float = 1e-4, maxiter: int = 500,
             batch_size: int = 256, indices: Int[ArrayLike, " k"] | None = None, dtype=jnp.float32,
             x0: Complex[ArrayLike, "n n n"] | None = None, callback: Callable | None = None,
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


# --------------------------------------------------------------------------------------------------
# Exact diagonal of the minibatch Hessian (operators with a local stencil)
# --------------------------------------------------------------------------------------------------
def minibatch_diagonal(projector: Projector, batch: Batch, lam: float | Prior = 0.0,
                       filters: Complex[Array, "b n n"] | None = None, axis_name: str | None = None
                       ) -> Float[Array, "n n n"]:
    """The exact diagonal of the minibatch Hessian ``(1/|B|) sum_i w_i diag(S_i^H M S_i) + lambda`` (real
    ``(n, n, n)``), for a slice operator with a local stencil (nearest, trilinear without oversampling).

    One adjoint pass and no probe noise: the squared-weight backprojection of ``w_i mask_i M CTF_i^2``
    (:func:`jaxcryo.leastsq.batch_diagonal_sum` divided by the real images of the batch, plus ``lam``, a float
    or a :class:`~jaxcryo.leastsq.Prior`). ``M CTF^2`` is read as ``|filter|^2`` of the batch's
    :func:`jaxcryo.leastsq.batch_filters` (``filters`` if given: :func:`jaxcryo.solvers.make_step` passes the ones
    its objective uses, so a step evaluates the CTF once), equal to ``batch_diagonal_sum`` to rounding
    (``|exp(i phi)|^2 = 1``). ``axis_name``: ``batch`` is one device's shard of a data-parallel step
    (:mod:`jaxcryo.parallel`); the backprojection and the image count are ``psum``-reduced over that axis.
    """
    op = local_stencil_operator(projector.operator)  # NotImplementedError naming the operator
    n = projector.n
    rdt = jnp.real(batch.images_f).dtype
    f = batch_filters(batch, projector) if filters is None else filters
    w = jnp.real(f * jnp.conj(f)) * (batch.weights * batch.mask)[:, None, None]
    pts = slice_points(batch.rotations, n, rdt)
    (d,) = jax.linear_transpose(lambda v: op.squared_weight_slice(v, pts), jax.ShapeDtypeStruct((n,) * 3, rdt))(w)
    d, count = psum((d, jnp.sum(batch.mask)), axis_name)  # d: already reduced by the transpose (see psum)
    return d / jnp.maximum(count, 1.0) + prior_diagonal(lam, n, rdt)
