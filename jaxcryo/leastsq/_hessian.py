"""The Hessian of the known-pose objective and its exact pieces: diagonal, stencil, operator, normal equations.

For the loss of :mod:`jaxcryo.loss` the Hessian is constant,

    ``H = (1/n) sum_i w_i S_i^H M S_i + lam I``,

and does not depend on the in-plane shifts (``|exp(2 pi i k.o)| = 1``). With the CTF and the image mask
folded into per-pixel weights ``W_i = M CTF_i^2 w_i`` (:func:`weight_image`, the one place they are formed):

* **diagonal**: ``diag H = (1/n) sum_i P_i^T W_i + lam`` with ``P_i`` the slice with squared interpolation
  weights, exact for operators with a local stencil (:func:`batch_diagonal_sum`, :func:`exact_diagonal`);
* **stencil**: for those operators ``H`` itself is a 27-point stencil (:func:`hessian_stencil`,
  :mod:`jaxcryo.leastsq`); :func:`hessian_operator` wraps it, or Hessian-vector products for the others;
* **normal equations** ``H v = b``, ``b = (1/n) sum_i w_i S_i^H M y_i`` (:func:`normal_equations`), solved by
  CG (:func:`solve_cg`) or approximated in one pass by the Wiener filter (:func:`wiener_backprojection`,
  whose ``CTF^2`` weights are the same backprojection of ``W_i``, :func:`weight_backprojection`).

Which of these apply is read from the slice operator's properties (``has_local_stencil``,
``has_diagonal_hessian``, ``weight_kernel()``), never from its name.
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec as P

from .. import parallel
from ..jax_util import primal_like
from . import _stencil as stencil
from ..data._batch import Batch, complex_dtype, epoch_batches, iterate_batches, make_batch, to_batch
from ..forward._ctf import CTFParams
from ._linalg import CGResult, conjugate_gradient
from ._loss import hvp, loss
from ..forward._operators import describe
from ._priors import prior_diagonal
from ..forward._projection import Projector, hermitian_mirror, slice_points


# --------------------------------------------------------------------------------------------------
# Pixel weights and their backprojection
# --------------------------------------------------------------------------------------------------
def weight_image(projector: Projector, n_images: int, ctf: CTFParams | None = None, scale=None,
                 dtype=jnp.float32, host: bool = False):
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


def weight_backprojection(projector: Projector, batch: Batch, squared: bool = True, pixels=None):
    """``sum_i P_i^T (M CTF_i^2 w_i mask_i)`` over one batch, real ``(n, n, n)`` in the batch's precision.

    ``squared=True``: ``P_i`` is the projector operator's slice with squared interpolation weights, so this is
    ``sum_i w_i mask_i diag(S_i^H M S_i)`` exactly (operators with a local stencil; others raise
    ``NotImplementedError``). ``squared=False``: ``P_i`` is the plain slice of ``operator.weight_kernel()``,
    the ``CTF^2`` weights of a one-pass Wiener estimate (as RELION and cryoDRGN).
    """
    n = projector.n
    rdt = jnp.real(batch.images_f).dtype
    op = projector.operator
    fwd = op.squared_weight_slice if squared else op.weight_kernel().slice
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
def batch_diagonal_sum(projector: Projector, batch: Batch):
    """``sum_i w_i mask_i diag(S_i^H M S_i)`` over one batch (real ``(n, n, n)``), exact for operators with a
    local stencil: the backprojection of ``w CTF^2 M`` through the hit counts / squared interpolation weights."""
    return weight_backprojection(projector, batch, squared=True)


def exact_diagonal(projector: Projector, batches, lam: float = 0.0, n_images: int | None = None):
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
    n = count if n_images is None else n_images
    return total / n + prior_diagonal(lam, total.shape[-1], total.dtype)


# --------------------------------------------------------------------------------------------------
# The Hessian as an operator
# --------------------------------------------------------------------------------------------------
def hessian_stencil(projector: Projector, rotations, ctf: CTFParams | None = None, lam: float = 0.0,
                    chunk: int | None = None) -> np.ndarray:
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


def hessian_operator(projector: Projector, rotations, shifts=None, ctf: CTFParams | None = None,
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
        mv = stencil.matvec(s)
        return HessianOperator(n, lambda z: mv(np.asarray(z, np.complex128)), True, s)
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


def normal_equations(projector: Projector, source, batch_size: int = 256, lam: float = 0.0, indices=None,
                     dtype=jnp.float32, cache: bool = True) -> NormalEquations:
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


@lru_cache(maxsize=16)
def _wiener_steps(projector: Projector, rdt, hermitian: bool, mesh=None):
    """The jitted per-batch accumulation of :func:`wiener_backprojection` and the final transpose of the
    operator's lift, built once per (projector, precision, hermitian, mesh) so repeated calls (two half sets)
    trace once.

    On a ``mesh`` of ``D`` devices (:mod:`jaxcryo.parallel`): each device accumulates its shard of every batch
    into its own sums (arrays with a leading device axis, split over the mesh), and ``finish`` reduces them
    with one ``psum`` before the lift's transpose; its outputs are replicated."""
    cdt = complex_dtype(rdt)
    pixels = projector.hermitian_pixels() if hermitian else None

    def add_batch(num, den, raw):  # the sums stay on the device, updated in place: one call per batch
        b = to_batch(raw, rdt)
        y = b.images_f * (b.weights * b.mask)[:, None, None]
        filt = projector.filters(b.shifts, b.ctf, dtype=cdt)
        # the numerator is accumulated on the operator's lifted (e.g. oversampled) grid; the transpose of
        # the lift is applied once, at the end
        return (num + projector.backproject_lifted(y, b.rotations, filt, pixels),
                den + weight_backprojection(projector, b, squared=False, pixels=pixels))

    def unlift(num, den):  # the lift's transpose and the Friedel mirror, once
        num = projector.unlift_adjoint(num)
        if hermitian:
            num, den = num + hermitian_mirror(num), den + hermitian_mirror(den)
        return num, den

    if parallel.mesh_size(mesh) <= 1:
        return partial(jax.jit, donate_argnums=(0, 1))(add_batch), jax.jit(unlift)
    spec, rep = P(parallel.AXIS), P()

    def add_local(num, den, raw):  # this device's sums (leading axis of length 1) and its shard of the batch
        num, den = add_batch(num[0], den[0], raw)
        return num[None], den[None]

    def unlift_local(num, den):
        return unlift(*jax.lax.psum((num[0], den[0]), parallel.AXIS))

    accumulate = jax.jit(jax.shard_map(add_local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec)),
                         donate_argnums=(0, 1))
    finish = jax.jit(jax.shard_map(unlift_local, mesh=mesh, in_specs=(spec, spec), out_specs=(rep, rep)))
    return accumulate, finish


def wiener_backprojection(projector: Projector, source, lam: float = 0.0, batch_size: int = 256,
                          indices=None, dtype=jnp.float32, hermitian: bool = True, mesh=None):
    """Direct Wiener-filter reconstruction ``(sum_i S_i^H w_i y_i) / (sum_i P_i^T (w_i CTF_i^2) + lam)``.

    ``S_i^H`` is the adjoint of the forward model (CTF, shift phase, slice) and ``P_i^T`` backprojects the
    real weight image through the operator's weight kernel without phases (:func:`weight_backprojection`
    with ``squared=False``), as RELION and cryoDRGN do (the CTF^2 "weights" volume). Both sums are divided by
    the number of images so ``lam`` is on the scale of the loss. Exact for noise-free data of an operator
    with a diagonal Hessian (nearest) in every voxel some slice hits (with ``lam -> 0``).

    ``hermitian`` (default): the images are real, so their transforms are Hermitian: backproject one of each
    Friedel pair (:meth:`~jaxcryo.forward.Projector.hermitian_pixels`, about 40% of the pixels) and add
    the mirror of both sums once (:func:`~jaxcryo.forward.hermitian_mirror`). This gives the Hermitian
    parts of the all-pixel sums (the transforms of their real parts in real space, all a real map keeps;
    ``tests/test_wiener_fast.py``), at about half the cost; they differ from the all-pixel sums only by
    the anti-Hermitian part that the unpaired ``-n/2`` pixels of even boxes leave there. The numerator is
    accumulated on the operator's lifted grid, whose transpose is applied once at the end
    (:meth:`~jaxcryo.forward.Projector.backproject_lifted`).

    ``mesh``: a 1-D device mesh (:func:`jaxcryo.parallel.make_mesh`): each batch (padded to a multiple of
    the device count) is split over its devices, each device backprojects its images into its own sums, and
    one all-reduce adds them at the end (the result equals the single-device one up to rounding).

    Returns ``(vol_f, weights)``: the centred Fourier volume and the weight volume.
    """
    n = projector.n
    rdt, cdt = jnp.dtype(dtype), jnp.dtype(complex_dtype(dtype))
    if parallel.mesh_size(mesh) <= 1:
        mesh = None
    accumulate, finish = _wiener_steps(projector, rdt, hermitian, mesh)
    if mesh is None:
        num, den = jnp.zeros(projector.lifted_shape(), cdt), jnp.zeros((n,) * 3, rdt)
    else:  # one partial sum per device, created in place
        d, split = mesh.size, parallel.batch_sharding(mesh)
        num, den = jax.jit(lambda: (jnp.zeros((d, *projector.lifted_shape()), cdt), jnp.zeros((d,) + (n,) * 3, rdt)),
                           out_shardings=(split, split))()
    if indices is None:
        indices = np.arange(len(source.metadata))
    count = 0
    for idx, mask in epoch_batches(np.asarray(indices), batch_size, multiple=parallel.mesh_size(mesh)):
        raw = parallel.load_sharded(source, idx, mask, mesh)  # multi-process: each reads its own block
        num, den = accumulate(num, den, raw)
        count += int(mask.sum())
    num, den = finish(num, den)
    num, den = num / count, den / count
    safe = den + prior_diagonal(lam, n, rdt)
    vol = jnp.where(safe > 0, num / jnp.where(safe > 0, safe, 1), 0)
    return vol, den
