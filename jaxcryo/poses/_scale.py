"""Put a reference map on the particles' intensity scale before the first pose search (issue 19).

The pose scores of :mod:`jaxcryo.poses._scoring` are least-squares log-likelihoods,
``-(1/2) sum_k |C P_r - y|^2``: unlike a correlation they are not invariant to the reference's scale. A
reference ``a`` times too strong makes the norm term ``a^2 sum_k C^2 |P_r|^2`` dominate the cross term, so the
search prefers the rotations whose projections carry the *least* power, whatever the images show; a reference
from another program (another simulator's truth, an EMDB map, an ab initio map of other data) is on an
arbitrary scale. RELION's answer is a cross-correlation first iteration (``--firstiter_cc``) and per-group
scale corrections; here the reference is rescaled once, without poses:

    ``a^2 = sum_{s in S} (Y_s - sigma^2) / sum_{s in S} E_s``

with ``Y_s`` the images' mean Fourier power in shell ``s``, ``sigma^2`` the noise power (the images' mean power in
the outer shells, where the CTF-modulated signal is weakest), ``E_s`` the mean power of the CTF-modulated
projections of the reference at random rotations (the rotation average of a central slice is the spherical
average of the map), and ``S`` the shells ``1 .. k`` the reference defines (``k``: its resolution shell).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..data._batch import epoch_batches, load_batch, to_batch
from ..forward._projection import Projector
from ..rotations._rotations import random_rotations
from ._noise import residual_shell_power


def power_spectra(source, idx, vol_f, projector: Projector, seed: int = 0, batch_size: int = 200):
    """``(Y, E)`` per shell ``0..n//2``: the images' mean Fourier power, and the mean power of the
    CTF-modulated projections of ``vol_f`` at uniformly random rotations (with the images' CTFs)."""
    f = jax.jit(residual_shell_power, static_argnums=2)
    k = projector.n // 2 + 1
    y, e, c = np.zeros(k), np.zeros(k), np.zeros(k)
    idx = np.asarray(idx)
    key = jax.random.PRNGKey(seed)
    zero = jnp.zeros_like(vol_f)
    for j, (pos, mask) in enumerate(epoch_batches(np.arange(len(idx)), batch_size)):
        b = to_batch(load_batch(source, idx[pos], mask))
        rots = random_rotations(jax.random.fold_in(key, j), b.images_f.shape[0], dtype=jnp.float32)
        s_y, cnt = f(zero, b._replace(rotations=rots), projector)  # residual against 0: the images
        s_e, _ = f(vol_f, b._replace(rotations=rots, images_f=jnp.zeros_like(b.images_f)), projector)
        y, e, c = y + np.asarray(s_y), e + np.asarray(s_e), c + np.asarray(cnt)
    c = np.maximum(c, 1.0)
    return y / c, e / c


def reference_scale(source, vol_f, projector: Projector, resolution: float, n_images: int = 1000,
                    seed: int = 0) -> float:
    """The factor ``a`` (module docstring) that puts ``vol_f`` on the intensity scale of ``source``'s images,
    from at most ``n_images`` of them (seeded); ``resolution``: the reference's resolution in Å. Returns 1
    when the images show no signal above the noise in those shells."""
    n = projector.n
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(source.metadata), min(n_images, len(source.metadata)), replace=False))
    y, e = power_spectra(source, idx, vol_f, projector, seed)
    top = n // 2
    sigma2 = float(np.mean(y[int(0.8 * top):top + 1]))
    k = int(np.clip(np.floor(n * projector.pixel_size / resolution), 2, top))
    shells = np.arange(1, k + 1)
    signal, model = float(np.sum(y[shells] - sigma2)), float(np.sum(e[shells]))
    if not (signal > 0 and model > 0):
        return 1.0
    return float(np.sqrt(signal / model))
