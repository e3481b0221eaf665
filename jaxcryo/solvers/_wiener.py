"""The default known-pose reconstruction: the one-pass Wiener filter (:func:`wiener_backprojection`), with its
sharded accumulation over a device mesh (:mod:`jaxcryo.parallel`).

``(sum_i S_i^H w_i y_i) / (sum_i P_i^T (w_i CTF_i^2) + lam)``: the normal equations of
:mod:`jaxcryo.leastsq` with the Hessian replaced by its weight backprojection
(:func:`jaxcryo.leastsq.weight_backprojection`), as RELION and cryoDRGN reconstruct.
"""

from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from .. import parallel
from ..data._batch import complex_dtype, epoch_batches, to_batch
from ..forward._ctf import evaluate_ctf
from ..forward._projection import Projector, hermitian_mirror, shift_phase_at, slice_points_at
from ..ndimage._fourier import freq_grid_2d
from ..jax_util import primal_like
from ..leastsq._priors import Prior, prior_diagonal


@lru_cache(maxsize=16)
def _wiener_steps(projector: Projector, rdt, hermitian: bool, mesh=None):
    """The jitted per-batch accumulation of :func:`wiener_backprojection` and the final transpose of the
    operator's lift, built once per (projector, precision, hermitian, mesh) so repeated calls (two half sets)
    trace once.

    On a ``mesh`` of ``D`` devices (:mod:`jaxcryo.parallel`): each device accumulates its shard of every batch
    into its own sums (arrays with a leading device axis, split over the mesh), and ``finish`` reduces them
    with one ``psum`` before the lift's transpose; its outputs are replicated."""
    cdt = complex_dtype(rdt)
    pixels = projector.hermitian_pixels() if hermitian else projector.mask_pixels()

    def add_batch(num, den, raw):  # the sums stay on the device, updated in place: one call per batch
        gnum, gden = batch_sums(projector, to_batch(raw, rdt), pixels)
        return num + gnum, den + gden

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


def batch_sums(projector: Projector, batch, pixels: tuple[np.ndarray, np.ndarray]):
    """One batch's terms of the Wiener sums, computed on a subset of the image pixels only:
    ``(sum_i S_i^H (w_i y_i), sum_i P_i^T (w_i CTF_i^2))`` with each pixel scaled by its weight, the numerator
    on the operator's lifted grid (:meth:`~jaxcryo.forward.Projector.backproject_lifted`), the weights on the
    ``(n, n, n)`` grid (:func:`~jaxcryo.leastsq.weight_backprojection` with ``squared=False``).

    ``pixels``: ``(flat_indices, weights)`` (NumPy, static), :meth:`~jaxcryo.forward.Projector.hermitian_pixels`
    or :meth:`~jaxcryo.forward.Projector.mask_pixels`. Everything per pixel is evaluated at those pixels only,
    in image-major order: the CTF (once, for both sums), the shift phase (the product of the two 1-D ramps'
    values at each pixel's row and column) and the slice points (from the pixels' coordinates, no gather); both
    backprojections are one ``jax.linear_transpose`` (with a local-stencil operator, whose weight kernel is the
    operator itself, XLA computes the interpolation indices once for the two scatters).
    ``tests/test_wiener_fast.py`` checks the sums against the library backprojections.
    """
    idx, pw = pixels
    rdt = jnp.real(batch.images_f).dtype
    cdt = batch.images_f.dtype
    b, n = batch.images_f.shape[0], projector.n
    k = projector.pixel_frequencies(idx)  # (p, 2) voxel units, static
    iy, ix = np.divmod(np.asarray(idx), n)
    axis = freq_grid_2d(n, projector.pixel_size)[0, :, 0]  # the grid's 1/Å values of a centred axis (float32)
    scale = (batch.weights * batch.mask)[:, None] * jnp.asarray(pw, rdt)  # (b, p)
    y = batch.images_f.reshape(b, -1)[:, idx]
    phase = shift_phase_at(batch.shifts.astype(rdt), axis, iy, ix)  # (b, p)
    if batch.ctf is None:
        ctf = jnp.ones((b, idx.size), rdt)
    else:  # at the pixels' frequencies (host constants, the values of Projector.freqs)
        f = np.stack([axis[ix], axis[iy]], axis=-1)[None]
        ctf = evaluate_ctf(batch.ctf, jnp.asarray(f, rdt)).reshape(b, -1)
    num_vals = jnp.conj(y) * phase.astype(cdt) * (ctf * scale)  # conj(w y) * filter: see the transpose below
    den_vals = ctf * ctf * scale
    pts = slice_points_at(batch.rotations, k, rdt)  # (b, p, 3)
    op = projector.operator
    spec_num = primal_like(projector.lifted_shape(), cdt, num_vals, pts)
    spec_den = primal_like((projector.n,) * 3, rdt, den_vals, pts)
    fwd = lambda g, d: (op.slice_lifted(g, pts), op.weight_kernel().slice(d, pts))  # noqa: E731
    gnum, gden = jax.linear_transpose(fwd, spec_num, spec_den)((num_vals, den_vals))
    # the Hermitian adjoint of a complex-linear slice is conj o transpose o conj (as backproject_lifted)
    return jnp.conj(gnum), gden


def wiener_backprojection(projector: Projector, source, lam: float | Prior = 0.0, batch_size: int = 256,
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
