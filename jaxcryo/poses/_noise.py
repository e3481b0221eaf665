"""The noise model of pose scoring (issue 19 prototype): a per-shell noise spectrum estimated from the residuals
of the images at their assigned poses (RELION's ``sigma2_noise``), the whitening that turns the unit-variance
scores of :mod:`jaxcryo.poses._scoring` into log-likelihoods under that noise, and a Gaussian prior on the
particles' origins.

Whitening needs no change to the scoring: with ``s(k) = 1 / sigma(|k|)`` per shell, scoring the images
``s y`` against the map ``s V`` (a radial filter in 3D is the same radial filter on every central slice) gives
``-(1/2) sum_k |C P - y|^2 / sigma^2(|k|)``, the Gaussian log-likelihood with the estimated spectrum. Then a
log-prior on the origins, ``-|o|^2 / (2 sigma_o^2)``, can be added to the scores on the same scale.

* :func:`residual_shell_power`: per-shell sums of ``|C P - y|^2`` (and pixel counts) of a batch at its poses;
* :func:`noise_spectrum`: their mean over a set of particles: ``sigma^2`` per shell ``0..n//2``;
* :func:`shell_filter`: a per-shell table on a 2D or 3D centred grid;
* :func:`whiten_batch`: a :class:`~jaxcryo.data.Batch` with its images multiplied by a 2D filter;
* :func:`offset_log_prior`: the Gaussian log-prior of candidate origins.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ..data._batch import Batch, epoch_batches, load_batch, to_batch
from ..forward._projection import Projector
from ..ndimage._fourier import shell_index


def residual_shell_power(vol_f, batch: Batch, projector: Projector) -> tuple[jax.Array, jax.Array]:
    """``(sums, counts)``, each ``(n // 2 + 1,)``: the sum over the batch's real images (``mask``) of
    ``|C P - y|^2`` in each Fourier shell at the batch's own poses, and the number of pixels summed. Jittable
    (``projector`` static)."""
    n = projector.n
    pred = projector(vol_f, batch.rotations, batch.shifts, batch.ctf)
    r = pred - batch.images_f
    p = jnp.sum(jnp.real(r * jnp.conj(r)) * batch.mask[:, None, None], axis=0).reshape(-1)
    sh = jnp.asarray(shell_index(n, 2).reshape(-1))
    k = n // 2 + 1
    keep = sh < k
    sums = jnp.zeros(k, p.dtype).at[jnp.where(keep, sh, 0)].add(jnp.where(keep, p, 0.0))
    counts = jnp.zeros(k, p.dtype).at[jnp.where(keep, sh, 0)].add(jnp.where(keep, jnp.sum(batch.mask), 0.0))
    return sums, counts


def noise_spectrum(source, idx, vol_f, projector: Projector, batch_size: int = 200) -> np.ndarray:
    """The mean residual power ``sigma^2`` per Fourier shell ``0..n//2`` (float64) of particles ``idx`` of
    ``source`` (with poses) against ``vol_f``: the noise spectrum RELION estimates each iteration (it includes
    the model's misfit, which is what the scores should discount)."""
    f = jax.jit(residual_shell_power, static_argnums=2)
    total = np.zeros(projector.n // 2 + 1)
    count = np.zeros_like(total)
    idx = np.asarray(idx)
    for pos, mask in epoch_batches(np.arange(len(idx)), batch_size):
        s, c = f(vol_f, to_batch(load_batch(source, idx[pos], mask)), projector)
        total += np.asarray(s, np.float64)
        count += np.asarray(c, np.float64)
    sigma2 = total / np.maximum(count, 1.0)
    good = sigma2 > 0
    if not good.all():  # empty shells (none in a square box) take their neighbour's value
        sigma2[~good] = sigma2[good][np.searchsorted(np.flatnonzero(good), np.flatnonzero(~good)).clip(
            0, good.sum() - 1)] if good.any() else 1.0
    return sigma2


def shell_filter(table: Float[ArrayLike, "k"], n: int, d: int) -> np.ndarray:
    """``table[s]`` at every entry of a centred ``n^d`` grid in shell ``s`` (shells beyond the table take its
    last value), float32."""
    t = np.asarray(table, np.float64)
    s = np.minimum(shell_index(n, d), len(t) - 1)
    return t[s].astype(np.float32)


def whiten_batch(batch: Batch, filter_2d: Float[Array, "n n"]) -> Batch:
    """``batch`` with each image's Fourier transform multiplied by ``filter_2d``."""
    return batch._replace(images_f=batch.images_f * filter_2d.astype(batch.images_f.real.dtype))


def offset_log_prior(shifts: Float[Array, "... 2"], sigma: float) -> Float[Array, "..."]:
    """``-|o|^2 / (2 sigma^2)`` of origins ``shifts`` (same unit as ``sigma``)."""
    return -0.5 * jnp.sum(shifts * shifts, axis=-1) / (sigma * sigma)


def score_options(settings, source, idx, vol_f, projector: Projector, kmax: float,
                  has_poses: bool) -> tuple[np.ndarray | None, float | None, list[float] | None]:
    """The likelihood options of one half set's pose search from a refinement's ``settings``
    (:class:`~jaxcryo.poses.RefineSettings`): ``(shell_weights, offset_sigma, spectrum)`` for the
    :class:`~jaxcryo.poses.Scorer` (``None`` each when neither ``whiten`` nor ``offset_sigma_px`` is set).

    ``shell_weights``: ``1 / sigma^2`` per shell, the noise spectrum (:func:`noise_spectrum`) of the particles
    ``idx`` of ``source`` against their half map ``vol_f`` at their current poses (``has_poses``; else against
    a zero map: the images' own power); without ``whiten``, one variance, the spectrum's mean over the scored
    shells ``1..kmax`` (so that an offset prior is on the scale of log-likelihoods). ``offset_sigma``: Å.
    ``spectrum``: ``sigma^2`` for the history."""
    s = settings
    if not s.whiten and s.offset_sigma_px is None:
        return None, None, None
    sig2 = noise_spectrum(source, idx, vol_f if has_poses else jnp.zeros_like(vol_f), projector, s.batch_size)
    if not s.whiten:
        sig2 = np.full_like(sig2, np.mean(sig2[1:int(kmax) + 1]))
    sigma = None if s.offset_sigma_px is None else float(s.offset_sigma_px) * float(projector.pixel_size)
    return (1.0 / sig2).astype(np.float32), sigma, [float(x) for x in sig2]
