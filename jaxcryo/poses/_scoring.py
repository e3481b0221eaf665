"""Pose scoring on device: the log-likelihood of every image at every candidate rotation and shift.

For image ``i`` (centred Fourier transform ``y_i``, CTF ``C_i``, inverse noise variance ``w_i``), a candidate
rotation ``A_r`` and a candidate origin ``o_t`` (Å, RELION's ``rlnOriginX/YAngst``), the score is minus the
image's data term of :func:`jaxcryo.leastsq.loss`:

    ``L[i, r, t] = -(w_i / 2) sum_{k in K} | C_i(k) e^{+2 pi i k . o_t} P_r(k) - y_i(k) |^2``

with ``P_r(k) = V((kx, ky, 0) @ A_r)`` the central slice read by the projector's slice operator, the shift
phase of :meth:`jaxcryo.forward.Projector.filters` (the image is the projection shifted by ``-o_t``) and
``K`` the image pixels inside the projector's mask (``|k| <= mask_radius``) and ``|k| <= kmax`` (Fourier-voxel
units; ``kmax=None``: the mask alone). With the Gaussian noise model this is the log-likelihood up to a
constant, so a softmax over candidates is the pose posterior under a uniform prior. Expanded,

    ``L = -(w_i / 2) (N[i, r] + ||y_i||^2 - 2 X[i, r, t])``,
    ``N[i, r] = sum_k C_i^2 |P_r|^2``                               (a (B x K) @ (K x R) product),
    ``X[i, r, t] = Re sum_k P_r(k) C_i(k) e^{+2 pi i k . o_t} y_i(k)^*``  (one (R x 2K) @ (2K x B T) product
    of real matrices: real and imaginary parts side by side),

so a global search is two matrix products per chunk of rotations after slicing the map at the ``K`` pixels.
The batch's own ``rotations`` and ``shifts`` are not used; padding entries (``mask = 0``) score 0 for every
candidate. The products run at ``Precision.HIGHEST`` (no TF32/bf16 passes on GPUs: ``X`` and ``N`` nearly
cancel near the optimum). Float32 (complex64 map) by default; a complex128 map with ``jax_enable_x64``
gives float64 scores.

Accuracy: the expansion subtracts large terms. Score *differences* between candidates (all that an argmax
or a softmax sees) are not affected by ``||y||^2``; the absolute score carries an error of about
``eps * w ||y||^2`` (``eps`` the dtype's precision), measured 1e-6 relative in float32 on random data
(``tests/test_scoring.py``).

* :func:`score_poses`: candidate rotations ``(R, 3, 3)`` shared by the batch (global search) x shifts;
* :func:`score_local`: per-image candidate rotations ``(B, Q, 3, 3)`` (:func:`jaxcryo.rotations.local_grid`)
  x shifts;
* :func:`best_poses` (hard assignment) and :func:`soft_weights` (normalised top-K posterior weights), pure
  functions of the scores.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Complex, Float

from ..data._batch import Batch
from ..errors import InputError
from ..ndimage._fourier import freq_grid_2d, freq_indices
from ..forward._projection import Projector

_HI = jax.lax.Precision.HIGHEST


def score_pixels(projector: Projector, kmax: float | None = None) -> np.ndarray:
    """Flat indices (NumPy int, row-major ``[ky, kx]``, ascending) of the image pixels that are scored: inside
    the projector's mask and, unless ``kmax`` is ``None``, with ``|k| <= kmax`` (Fourier-voxel units). Their
    number is the ``K`` of the memory formulas (about ``pi kmax^2``)."""
    n = projector.n
    r = n / 2 if projector.mask_radius is None else projector.mask_radius  # as Projector.image_mask
    if kmax is not None:
        r = min(r, float(kmax))
    k = freq_indices(n)
    rr = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2).reshape(-1)
    return np.flatnonzero(rr <= r + 1e-6)


def _pixel_coords(projector: Projector, idx: np.ndarray, rdt):
    """``(K, 2)`` ``(kx, ky)`` of the pixels ``idx`` in voxel units and ``(K, 2)`` in 1/Å."""
    n = projector.n
    k = freq_indices(n)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    kvox = np.stack([kx.reshape(-1), ky.reshape(-1)], axis=-1)[idx]
    freqs = freq_grid_2d(n, projector.pixel_size, np.float64).reshape(-1, 2)[idx]  # as Projector.freqs
    return jnp.asarray(kvox, rdt), jnp.asarray(freqs, rdt)


class _ImageTerms(NamedTuple):
    xcat: jax.Array  # (B, T, 2K): [Re, -Im] of C_i e^{+2 pi i k.o_t} y_i^*, so that X = P_cat . xcat
    ctf2: jax.Array  # (B, K): C_i^2 (ones without CTF)
    yy: jax.Array  # (B,): ||y_i||^2 over the K pixels
    scale: jax.Array  # (B,): -w_i mask_i / 2


def _image_terms(batch: Batch, projector: Projector, idx: np.ndarray, shifts, rdt, shell_weights=None) -> _ImageTerms:
    """The rotation-independent factors of the scores (see the module docstring). ``shifts``: ``(B, T, 2)``;
    ``shell_weights``: ``(S,)`` a weight per Fourier shell multiplying each pixel's term (``None``: ones)."""
    b = batch.images_f.shape[0]
    cdt = jnp.complex128 if rdt == jnp.float64 else jnp.complex64
    y = batch.images_f.astype(cdt).reshape(b, -1)[:, idx]  # (B, K)
    _, freqs = _pixel_coords(projector, idx, rdt)
    ctf = projector.ctf(batch.ctf, rdt)
    ctf = jnp.ones(y.shape, rdt) if ctf is None else ctf.reshape(b, -1)[:, idx]
    ph = 2 * jnp.pi * jnp.einsum("btj,kj->btk", shifts.astype(rdt), freqs, precision=_HI)  # (B, T, K)
    ctf2 = ctf * ctf
    yy_k = jnp.real(y * jnp.conj(y))
    if shell_weights is not None:  # a whitened likelihood: each pixel's term weighted by its shell's weight
        wk = _pixel_weights(projector, idx, shell_weights, rdt)
        ctf, ctf2, yy_k = ctf * wk, ctf2 * wk, yy_k * wk
    x = jax.lax.complex(jnp.cos(ph), jnp.sin(ph)) * (ctf * jnp.conj(y))[:, None, :]
    xcat = jnp.concatenate([jnp.real(x), -jnp.imag(x)], axis=-1)
    yy = jnp.sum(yy_k, axis=-1)
    scale = -0.5 * batch.weights.astype(rdt) * batch.mask.astype(rdt)
    return _ImageTerms(xcat, ctf2, yy, scale)


def _pixel_weights(projector: Projector, idx: np.ndarray, shell_weights, rdt):
    """``(K,)`` the weight of each scored pixel's shell (``round(|k|)``, the last weight beyond the table)."""
    k = freq_indices(projector.n)
    r = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2).reshape(-1)[idx]  # as score_pixels
    shells = np.minimum(np.rint(r).astype(np.int64), np.shape(shell_weights)[0] - 1)
    return jnp.asarray(shell_weights).astype(rdt)[shells]


def _slices(projector: Projector, lifted, kvox, rotations):
    """``P`` at the scored pixels for rotations ``(..., 3, 3)`` -> ``(..., K)``, and ``[Re P, Im P]``,
    ``|P|^2``."""
    pts = jnp.einsum("ki,...ij->...kj", kvox, rotations[..., :2, :], precision=_HI)  # as slice_points
    p = projector.operator.slice_lifted(lifted, pts)
    pr, pi = jnp.real(p), jnp.imag(p)
    return jnp.concatenate([pr, pi], axis=-1), pr * pr + pi * pi


def _as_batch_shifts(shifts, b: int, rdt):
    return jnp.broadcast_to(shifts.astype(rdt), (b,) + shifts.shape[-2:]) if shifts.ndim == 2 else shifts.astype(rdt)


@partial(jax.jit, static_argnames=("projector", "kmax", "chunk_size"))
def _score_global(vol_f, batch, rotations, shifts, projector, kmax, chunk_size, shell_weights=None):
    rdt = jnp.real(vol_f).dtype
    b = batch.images_f.shape[0]
    idx = score_pixels(projector, kmax)
    kvox, _ = _pixel_coords(projector, idx, rdt)
    terms = _image_terms(batch, projector, idx, _as_batch_shifts(shifts, b, rdt), rdt, shell_weights)
    t = terms.xcat.shape[1]
    xmat = terms.xcat.reshape(b * t, -1).T  # (2K, B T)
    lifted = projector.operator.lift(vol_f)
    r = rotations.shape[0]
    c = min(chunk_size, r)
    n_chunks = -(-r // c)
    pad = n_chunks * c - r
    rots = jnp.concatenate([rotations.astype(rdt), jnp.broadcast_to(jnp.eye(3, dtype=rdt), (pad, 3, 3))])

    def chunk(rc):  # rc: (C, 3, 3) -> (C, B, T)
        pcat, p2 = _slices(projector, lifted, kvox, rc)
        cross = jnp.matmul(pcat, xmat, precision=_HI).reshape(c, b, t)
        norm = jnp.matmul(p2, terms.ctf2.T, precision=_HI)  # (C, B)
        return terms.scale[None, :, None] * (norm[:, :, None] + terms.yy[None, :, None] - 2 * cross)

    out = jax.lax.map(chunk, rots.reshape(n_chunks, c, 3, 3)).reshape(n_chunks * c, b, t)[:r]
    return jnp.transpose(out, (1, 0, 2))


@partial(jax.jit, static_argnames=("projector", "kmax", "chunk_size"))
def _score_local(vol_f, batch, rotations, shifts, projector, kmax, chunk_size, shell_weights=None):
    rdt = jnp.real(vol_f).dtype
    b, q = rotations.shape[:2]
    idx = score_pixels(projector, kmax)
    kvox, _ = _pixel_coords(projector, idx, rdt)
    terms = _image_terms(batch, projector, idx, _as_batch_shifts(shifts, b, rdt), rdt, shell_weights)
    lifted = projector.operator.lift(vol_f)
    c = min(chunk_size, q)
    n_chunks = -(-q // c)
    pad = n_chunks * c - q
    rots = jnp.concatenate([rotations.astype(rdt), jnp.broadcast_to(jnp.eye(3, dtype=rdt), (b, pad, 3, 3))], axis=1)
    rots = jnp.moveaxis(rots.reshape(b, n_chunks, c, 3, 3), 1, 0)  # (chunks, B, C, 3, 3)

    def chunk(rc):  # rc: (B, C, 3, 3) -> (B, C, T)
        pcat, p2 = _slices(projector, lifted, kvox, rc)
        cross = jnp.einsum("bcm,btm->bct", pcat, terms.xcat, precision=_HI)
        norm = jnp.einsum("bck,bk->bc", p2, terms.ctf2, precision=_HI)
        return terms.scale[:, None, None] * (norm[:, :, None] + terms.yy[:, None, None] - 2 * cross)

    out = jax.lax.map(chunk, rots)  # (chunks, B, C, T)
    return jnp.moveaxis(out, 0, 1).reshape(b, n_chunks * c, -1)[:, :q]


def _check_common(vol_f, batch: Batch, projector: Projector, shifts, kmax, chunk_size):
    n = projector.n
    if not jnp.iscomplexobj(vol_f):
        raise InputError("{param} must be a centred Fourier volume (complex; see "
                         "jaxcryo.forward.volume_to_fourier)", param="vol_f")
    if tuple(vol_f.shape) != (n, n, n):
        raise InputError(f"{{param}} has shape {tuple(vol_f.shape)}, expected ({n}, {n}, {n}) for the projector's "
                         f"box", param="vol_f")
    if batch.images_f.ndim != 3 or tuple(batch.images_f.shape[1:]) != (n, n):
        raise InputError(f"{{param}} images have shape {tuple(batch.images_f.shape)}, expected (B, {n}, {n})",
                         param="batch")
    b = batch.images_f.shape[0]
    shape = tuple(np.shape(shifts))
    if not (len(shape) == 2 and shape[1] == 2 and shape[0] >= 1) and not (len(shape) == 3 and shape[0] == b
                                                                           and shape[2] == 2 and shape[1] >= 1):
        raise InputError(f"{{param}} must have shape (T, 2) or (B, T, 2) with B = {b} images and T >= 1, "
                         f"got {shape}", param="shifts")
    if kmax is not None:
        try:
            kmax = float(kmax)
        except (TypeError, ValueError):
            raise InputError(f"{{param}} must be a number or None, got {kmax!r}", param="kmax") from None
        if not np.isfinite(kmax) or kmax <= 0:
            raise InputError(f"{{param}} must be a positive frequency (Fourier-voxel units), got {kmax!r}",
                             param="kmax")
        if score_pixels(projector, kmax).size == 0:
            raise InputError(f"{{param}} = {kmax} keeps no image pixel", param="kmax")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise InputError(f"{{param}} must be a positive integer, got {chunk_size!r}", param="chunk_size")
    return kmax, int(chunk_size)


def score_poses(vol_f: Complex[Array, "n n n"], batch: Batch, projector: Projector,
                rotations: Float[Array, "r 3 3"], shifts: Float[Array, "t 2"] | Float[Array, "b t 2"],
                kmax: float | None = None, chunk_size: int = 256,
                shell_weights: Float[ArrayLike, " s"] | None = None) -> Float[Array, "b r t"]:
    """Log-likelihood scores ``(B, R, T)`` of every image of ``batch`` at every candidate rotation (shared by
    the batch: a global search, e.g. :func:`jaxcryo.rotations.so3_grid`) and shift (module docstring).

    Args:
        vol_f: the current map, ``(n, n, n)`` centred Fourier volume (complex64; complex128 for float64).
        batch: images, CTF parameters, weights and mask (its rotations and shifts are ignored).
        projector: the forward model (box, pixel size, slice operator, mask); static.
        rotations: ``(R, 3, 3)`` RELION matrices.
        shifts: ``(T, 2)`` origins in Å shared by the batch (:func:`jaxcryo.rotations.shift_grid`), or
            ``(B, T, 2)`` per image (e.g. each image's current origin plus a grid).
        kmax: score only ``|k| <= kmax`` (Fourier-voxel units) inside the projector's mask; ``None``: the
            mask alone. Static (one compilation per value).
        chunk_size: rotations per chunk ``C`` (static); the last chunk is padded with the identity.
        shell_weights: ``(S,)`` a weight per Fourier shell (``round(|k|)``; the last one beyond ``S``)
            multiplying each pixel's term of the sum, e.g. the inverse of a per-shell noise power relative to
            the images' own (a whitened likelihood); ``None``: ones.

    Memory: jitted, static shapes, ``jax.lax.map`` over ``ceil(R / C)`` chunks. With ``K`` scored pixels
    (:func:`score_pixels`) and 4-byte reals, one chunk takes about ``4 C (a K + 2 B T)`` bytes: the slices
    at ``C x K`` pixels (``a`` = 6 for trilinear and nearest as XLA fuses them on CPU, measured with
    ``compile().memory_analysis()`` at box 64, ``kmax`` 16; the arrays the code names, unfused, would make it
    about 32) and the ``(C, B T)`` cross products and scores. Beside the chunks: ``8 K B T`` bytes for the
    shifted CTF-weighted images ``(2K, B T)``, ``4 B R T`` for the stacked scores before the transpose (and
    as many for the result), and the operator's lifted map (``8 (n+2)^3`` for trilinear). Double for float64.
    Box 64, ``kmax`` 16 (``K`` = 797), ``B T`` = 3,200, ``C`` = 256: about 11 MB per chunk.

    Speed (measured once, a shared 2-core CPU, box 64, ``kmax`` 16, trilinear, ``C`` = 256): 4,608 rotations
    (:func:`~jaxcryo.rotations.so3_grid` at 15 degrees) x 9 shifts x 32 images in 0.13 s after compilation, 1e7
    candidate-image pairs per second.

    Returns:
        ``(B, R, T)`` scores (minus the per-image data terms of :func:`jaxcryo.leastsq.loss` over the scored
        pixels); 0 for padding entries.
    """
    rot_shape = tuple(np.shape(rotations))
    if len(rot_shape) != 3 or rot_shape[1:] != (3, 3) or rot_shape[0] < 1:
        raise InputError(f"{{param}} must have shape (R, 3, 3) with R >= 1, got {rot_shape}", param="rotations")
    kmax, chunk_size = _check_common(vol_f, batch, projector, shifts, kmax, chunk_size)
    return _score_global(vol_f, batch, jnp.asarray(rotations), jnp.asarray(shifts), projector, kmax, chunk_size,
                         None if shell_weights is None else jnp.asarray(shell_weights))


def score_local(vol_f: Complex[Array, "n n n"], batch: Batch, projector: Projector,
                rotations: Float[Array, "b q 3 3"], shifts: Float[Array, "t 2"] | Float[Array, "b t 2"],
                kmax: float | None = None, chunk_size: int = 16,
                shell_weights: Float[ArrayLike, " s"] | None = None) -> Float[Array, "b q t"]:
    """Log-likelihood scores ``(B, Q, T)`` of each image at its own candidate rotations ``(B, Q, 3, 3)``
    (a local search: :func:`jaxcryo.rotations.local_grid` around the current poses) and the shifts (``(T, 2)``
    shared or ``(B, T, 2)`` per image). The same scores as :func:`score_poses` (module docstring), computed
    per image as batched products ``(Q x 2K) @ (2K x T)`` (``shell_weights`` as there).

    Memory: ``jax.lax.map`` over ``ceil(Q / C)`` chunks of ``C = chunk_size`` candidates per image (the last
    padded with the identity); one chunk takes about ``4 B C (a K + 2 T)`` bytes (``a`` = 6 as in
    :func:`score_poses`, measured), beside ``8 K B T`` bytes for the shifted images and ``8 B Q T`` for the
    scores. Box 64, ``kmax`` 16, ``B`` = 128, ``T`` = 25, ``C`` = 16: about 40 MB per chunk.
    """
    rot_shape = tuple(np.shape(rotations))
    b = batch.images_f.shape[0]
    if len(rot_shape) != 4 or rot_shape[0] != b or rot_shape[2:] != (3, 3) or rot_shape[1] < 1:
        raise InputError(f"{{param}} must have shape (B, Q, 3, 3) with B = {b} images and Q >= 1, got {rot_shape}",
                         param="rotations")
    kmax, chunk_size = _check_common(vol_f, batch, projector, shifts, kmax, chunk_size)
    return _score_local(vol_f, batch, jnp.asarray(rotations), jnp.asarray(shifts), projector, kmax, chunk_size,
                        None if shell_weights is None else jnp.asarray(shell_weights))


class BestPoses(NamedTuple):
    """The highest-scoring candidate of each image (:func:`best_poses`).

    Attributes:
        rotations: ``(B, 3, 3)``; shifts: ``(B, 2)`` Å; rotation_index, shift_index: ``(B,)`` indices into
        the candidates; score: ``(B,)`` the best score.
    """

    rotations: jax.Array
    shifts: jax.Array
    rotation_index: jax.Array
    shift_index: jax.Array
    score: jax.Array


def _check_scores(scores) -> tuple[int, int, int]:
    shape = tuple(np.shape(scores))
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"{{param}} must have shape (B, R, T) with every size >= 1, got {shape}", param="scores")
    return shape


def best_poses(scores: Float[Array, "b r t"], rotations: Float[Array, "r 3 3"] | Float[Array, "b r 3 3"],
               shifts: Float[Array, "t 2"] | Float[Array, "b t 2"]) -> BestPoses:
    """Hard assignment: each image's candidate of highest score (the first on ties; with
    :func:`jaxcryo.rotations.shift_grid` the smallest shift). ``rotations``/``shifts``: the candidates scored,
    shared (``(R, 3, 3)``, ``(T, 2)``) or per image (``(B, R, 3, 3)``, ``(B, T, 2)``). Pure, jittable."""
    b, r, t = _check_scores(scores)
    rotations, shifts = jnp.asarray(rotations), jnp.asarray(shifts)
    scores = jnp.asarray(scores)
    flat = jnp.argmax(scores.reshape(b, r * t), axis=1)
    ri, ti = flat // t, flat % t
    rows = jnp.arange(b)
    rot = rotations[ri] if rotations.ndim == 3 else rotations[rows, ri]
    sh = shifts[ti] if shifts.ndim == 2 else shifts[rows, ti]
    return BestPoses(rot, sh, ri, ti, scores[rows, ri, ti])


class PoseWeights(NamedTuple):
    """The ``top_k`` most likely candidates of each image and their posterior weights (:func:`soft_weights`).

    Attributes:
        weights: ``(B, top_k)`` non-negative, summing to 1 per image, in decreasing order.
        rotation_index, shift_index: ``(B, top_k)`` the candidates' indices.
    """

    weights: jax.Array
    rotation_index: jax.Array
    shift_index: jax.Array


def soft_weights(scores: Float[Array, "b r t"], top_k: int) -> PoseWeights:
    """Soft assignment: the ``top_k`` highest scores of each image (over all rotation-shift pairs) and their
    normalised posterior weights ``exp(L - max L) / sum exp(L - max L)`` (a softmax over those ``top_k``:
    the posterior under a uniform prior, truncated to its ``top_k`` largest terms and renormalised). The
    scores are log-likelihoods, so the weights are as sharp as the data: scale the scores to temper them.
    Pure, jittable (``top_k`` static)."""
    b, r, t = _check_scores(scores)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= r * t:
        raise InputError(f"{{param}} must be an integer in [1, {r * t}] (candidates per image), got {top_k!r}",
                         param="top_k")
    vals, flat = jax.lax.top_k(jnp.asarray(scores).reshape(b, r * t), int(top_k))
    return PoseWeights(jax.nn.softmax(vals, axis=-1), flat // t, flat % t)
