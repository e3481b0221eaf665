"""Known-pose reconstruction of a particle set: half maps, gold-standard FSC, checkpoints, history.

``reconstruct(dataset, optimizer="psgd", ...)`` is what ``jaxcryo reconstruct`` runs and what the
notebooks call. Optimisers (``optimizer=``):

* ``"psgd"`` (default): SGD preconditioned by the Hutchinson estimate of the Hessian diagonal
  (:func:`jaxcryo.optim.preconditioned_sgd`; ``probes=K`` probes per step, ``probes=0`` uses the exact
  diagonal instead), step ``eta_k = eta_0 / (1 + epoch)`` with ``eta_0 = 1 / lambda_max(D^-1 H_B)``
  measured by power iteration on the first batch (``lr`` overrides ``eta_0``);
* ``"sgd"``: plain SGD with constant step ``1 / lambda_max(H_B)`` (``lr`` overrides);
* ``"adam"``: ``optax.adam`` (the ML default), step 0.02 x the RMS of the backprojection (``lr`` overrides);
* ``"cg"``: conjugate gradient on the normal equations, one data pass per iteration (``epochs`` = iterations);
* ``"backproject"``: one-pass Wiener-filter backprojection.

With ``halfmaps=True`` the particles are split into two random halves (or RELION's ``rlnRandomSubset``),
each reconstructed independently; the full map is their combination weighted by the Hessian diagonals
(``(D1 v1 + D2 v2) / (D1 + D2)``, the full-data least-squares solution for a diagonal Hessian).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .data_source import epoch_batches, iterate_batches, load_batch, to_batch
from .errors import DivergenceError, InputError
from .fit import FitState, fit, make_step
from .fourier import ball_mask, resample_real
from .loss import objective
from .optim import (exact_diagonal, harmonic_schedule, hutchinson_estimate, preconditioned_max_eigenvalue,
                    preconditioned_sgd, sgd)
from .projection import Projector, fourier_to_volume, volume_to_fourier
from .solvers import normal_equations, conjugate_gradient, wiener_backprojection

OPTIMIZERS = ("psgd", "sgd", "adam", "cg", "backproject")
DEFAULTS = dict(optimizer="psgd", epochs=10, batch_size=256, interp="nearest", probes=1, lam=1e-3, seed=0)


class CroppedSource:
    """A view of a particle source with the images Fourier-cropped to ``box`` (pixel size scaled)."""

    def __init__(self, source, box: int):
        md = source.metadata
        if box > md.box:
            raise InputError(f"--box {box} is larger than the images ({md.box} px)")
        self.source = source
        self.box = box
        self.metadata = dataclasses.replace(md, box=box, pixel_size=md.pixel_size * md.box / box)

    def __len__(self):
        return len(self.metadata)

    def images(self, idx):
        imgs = self.source.images(idx)
        return np.asarray(resample_real(jnp.asarray(imgs), self.box, 2), np.float32)


@dataclass
class ReconstructResult:
    """``volume``: the map (real space ``(n, n, n)``); ``half1``/``half2`` the half maps (or ``None``);
    ``history``: one dict per epoch; ``fsc_half``/``fsc_ref``: :class:`jaxcryo.metrics.FSCResult` or None."""

    volume: np.ndarray
    half1: np.ndarray | None
    half2: np.ndarray | None
    history: list
    fsc_half: Any
    fsc_ref: Any
    pixel_size: float
    config: dict = field(default_factory=dict)


def split_halves(md, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves: RELION's ``rlnRandomSubset`` (1/2) if present, else a seeded permutation."""
    sub = md.extra.get("random_subset") if md.extra else None
    if sub is not None and set(np.unique(sub)) <= {1, 2} and len(np.unique(sub)) == 2:
        sub = np.asarray(sub)
        return np.flatnonzero(sub == 1), np.flatnonzero(sub == 2)
    perm = np.random.default_rng([seed, 12345]).permutation(len(md))
    h = len(perm) // 2
    return np.sort(perm[:h]), np.sort(perm[h:])


def _atomic_pickle(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _host(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree)


class _Run:
    """One independent reconstruction (a half set, or all particles)."""

    def __init__(self, name, indices):
        self.name = name
        self.indices = indices
        self.state: FitState | None = None
        self.diag = None
        self.eta = None
        self.last_loss = None


def _hutchinson_full_estimate(source, indices, batch_size, projector, lam, seed, max_batches=16, probes=4):
    """Hutchinson estimate of the full-data diagonal from up to ``max_batches`` batches (``probes`` each),
    floored at half its shell mean as the optimiser does; used only to choose the initial step."""
    from .fourier import shell_index
    from .optim import shell_mean

    n = projector.n
    v0 = jnp.zeros((n,) * 3, jnp.complex64)
    est = jax.jit(lambda raw, key: hutchinson_estimate(objective(to_batch(raw), projector, lam), v0, key, probes))
    total, count = 0.0, 0
    for i, (idx, mask) in enumerate(epoch_batches(indices, batch_size)[:max_batches]):
        total = total + est(load_batch(source, idx, mask), jax.random.PRNGKey(seed + 100 + i))
        count += 1
    d = jnp.abs(total / count)
    return jnp.maximum(d, 0.5 * shell_mean(d, shell_index(n, 3)))


def _diag_for(projector, source, indices, batch_size, lam):
    if projector.method in ("nearest", "trilinear") and projector.oversample == 1:
        return exact_diagonal(projector, (to_batch(r) for r in iterate_batches(source, batch_size, indices)), lam)
    return None


def reconstruct(
    source,
    optimizer: str = "psgd",
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float | None = None,
    interp: str = DEFAULTS["interp"],
    probes: int = DEFAULTS["probes"],
    lam: float = DEFAULTS["lam"],
    box: int | None = None,
    halfmaps: bool = True,
    reference: np.ndarray | None = None,
    mask: bool = False,
    seed: int = DEFAULTS["seed"],
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    indices: np.ndarray | None = None,
    epoch_callback: Callable[[dict], None] | None = None,
    volume_callback: Callable[[Any], None] | None = None,
) -> ReconstructResult:
    """Reconstruct a map from a particle source with known poses.

    Args:
        source: :class:`jaxcryo.data.ParticleDataset` or :class:`jaxcryo.data_source.ArrayDataset`.
        optimizer: one of :data:`OPTIMIZERS` (see the module docstring).
        epochs: passes over the data (CG: iterations).
        batch_size: images per step (the last batch of an epoch is padded and masked).
        lr: step size (see the module docstring for the per-optimiser default).
        interp: slice operator ``nearest`` | ``trilinear`` | ``nufft``.
        probes: Hutchinson probes per step for ``psgd`` (0: exact diagonal).
        lam: Tikhonov weight of the objective.
        box: Fourier-crop the images to this box first.
        halfmaps: reconstruct two random halves independently and report the gold-standard FSC.
        reference: real-space reference map at the (cropped) box for FSC each epoch.
        mask: apply a soft spherical mask before the FSCs.
        checkpoint_path: file to checkpoint to at the end of every epoch (atomic); ``resume`` continues it.
        indices: the particles to use (default all).
        epoch_callback: called with each epoch's history record.
        volume_callback: called with the (combined) centred Fourier volume after each epoch.
    """
    from .metrics import fsc as fsc_fn
    from .metrics import soft_sphere_mask

    if optimizer not in OPTIMIZERS:
        raise InputError(f"--optimizer {optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    if epochs < 1:
        raise InputError(f"--epochs {epochs}: expected at least 1")
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: expected at least 1")
    md = source.metadata
    if md.rotations is None:
        raise InputError(f"{md.source or 'particles'}: no poses (rlnAngleRot/Tilt/Psi or alignments3D); "
                         "known-pose reconstruction needs them (or give --poses)")
    if box is not None and box != md.box:
        source = CroppedSource(source, box)
        md = source.metadata
    n = md.box
    px = float(md.pixel_size)
    if indices is None:
        indices = np.arange(len(md))
    if len(indices) == 0:
        raise InputError(f"{md.source or 'particles'}: the selection is empty")
    if halfmaps and len(indices) < 2:
        raise InputError(f"{md.source or 'particles'}: half maps need at least 2 particles")
    batch_size = int(min(batch_size, len(indices) if not halfmaps else max(1, len(indices) // 2)))
    projector = Projector(n=n, pixel_size=px, method=interp)
    ref_f = None
    if reference is not None:
        reference = np.asarray(reference, np.float32)
        if reference.shape != (n,) * 3:
            reference = np.asarray(resample_real(jnp.asarray(reference), n, 3), np.float32)
        ref_f = volume_to_fourier(jnp.asarray(reference))
    smask = soft_sphere_mask(n) if mask else None

    if halfmaps:
        h1, h2 = split_halves(md.subset(indices) if len(indices) != len(md) else md, seed)
        runs = [_Run("half1", np.asarray(indices)[h1]), _Run("half2", np.asarray(indices)[h2])]
    else:
        runs = [_Run("full", np.asarray(indices))]

    config = dict(optimizer=optimizer, epochs=epochs, batch_size=batch_size, lr=lr, interp=interp,
                  probes=probes, lam=lam, box=n, pixel_size=px, halfmaps=halfmaps, mask=mask, seed=seed,
                  n_particles=int(len(indices)))
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    history: list = []
    start_epoch = 0
    if resume:
        if ckpt is None or not ckpt.exists():
            raise InputError(f"{ckpt}: no checkpoint to resume from")
        with open(ckpt, "rb") as f:
            saved = pickle.load(f)
        if saved["config"] != config:
            diff = {k: (saved["config"].get(k), v) for k, v in config.items() if saved["config"].get(k) != v}
            raise InputError(f"{ckpt}: checkpoint was made with different settings {diff}")
        history = saved["history"]
        start_epoch = saved["epoch"]
        for r, s in zip(runs, saved["runs"]):
            r.eta, r.diag = s["eta"], (None if s["diag"] is None else jnp.asarray(s["diag"]))
            r.state = FitState(jnp.asarray(s["volume_f"]), jax.tree_util.tree_map(jnp.asarray, s["opt_state"]),
                               s["epoch"], s["rng_state"], s["history"])

    t_start = time.perf_counter()
    seconds0 = history[-1]["seconds"] if history else 0.0

    # -- one-pass solvers -------------------------------------------------------------------------
    if optimizer in ("backproject", "cg"):
        vols, diags = [], []
        for r in runs:
            if optimizer == "backproject":
                v, den = wiener_backprojection(projector, source, lam=lam, batch_size=batch_size, indices=r.indices)
                vols.append(v)
                diags.append(den + lam)
                continue
            ne = normal_equations(projector, source, batch_size, lam, r.indices)
            it_hist = []

            def cb(it, x, res, _h=it_hist):
                _h.append((it, time.perf_counter(), res))

            res = conjugate_gradient(ne.matvec, ne.rhs, None, tol=1e-6, maxiter=epochs, callback=cb)
            r.last_loss = res.residuals[-1]
            vols.append(res.x)
            diags.append(_diag_for(projector, source, r.indices, batch_size, lam))
        vol_f = _combine(vols, diags)
        dt = time.perf_counter() - t_start
        rec = {"epoch": 1 if optimizer == "backproject" else epochs, "loss": None, "seconds": dt,
               "images_per_s": len(indices) * (1 if optimizer == "backproject" else epochs) / dt,
               "resolution_05_ref": None, "fsc_ref": None}
        if optimizer == "cg":
            rec["loss"] = None
            rec["relative_residual"] = float(max(r.last_loss for r in runs))
        _ref_record(rec, vol_f, ref_f, px, smask, fsc_fn)
        history.append(rec)
        return _finish(vols, vol_f, runs, history, ref_f, px, smask, config, fsc_fn)

    # -- minibatch optimisers ---------------------------------------------------------------------
    spe = int(np.ceil(len(runs[0].indices) / batch_size))
    step_cache: dict = {}

    # lambda_max of the (preconditioned) first-batch Hessian, jitted: run eagerly, the Hutchinson probes and
    # the power iteration compile op by op (~180 small XLA compilations, a minute on a loaded CPU).
    @jax.jit
    def _lam_max(raw0, diag):
        fn0 = objective(to_batch(raw0), projector, lam)
        v0 = jnp.zeros((n,) * 3, jnp.complex64)
        return preconditioned_max_eigenvalue(fn0, v0, diag if optimizer == "psgd" else None)

    def opt_for(r: _Run):
        if optimizer == "psgd":
            if probes == 0 and r.diag is None:
                r.diag = _diag_for(projector, source, r.indices, batch_size, lam)
                if r.diag is None:
                    raise InputError(f"--probes 0 (exact diagonal) is not available for --interp {interp}")
            if r.eta is None:
                # The step is 1/lambda_max(D^-1 H_B) for a D close to the *full-data* diagonal the optimiser
                # converges to; the first batch's own diagonal would give eta ~ 1, far too large for small
                # batches (a voxel hit by one image of a batch has H_B,jj >> H_jj): measured divergence at
                # box 32, batch 20.
                d0 = r.diag if probes == 0 else _hutchinson_full_estimate(
                    source, r.indices, batch_size, projector, lam, seed)
                r.eta = float(lr) if lr is not None else 1.0 / float(
                    _lam_max(load_batch(source, r.indices[:batch_size]), d0))
            return preconditioned_sgd(harmonic_schedule(r.eta, spe), diagonal=r.diag if probes == 0 else None,
                                      n_probes=max(probes, 1), seed=seed)
        if optimizer == "sgd":
            if r.eta is None:
                r.eta = float(lr) if lr is not None else 1.0 / float(
                    _lam_max(load_batch(source, r.indices[:batch_size]), None))
            return sgd(r.eta)
        # adam
        if r.eta is None:
            if lr is not None:
                r.eta = float(lr)
            else:
                v, _ = wiener_backprojection(projector, source, lam=lam, batch_size=batch_size,
                                             indices=r.indices[:batch_size])
                m = jnp.asarray(ball_mask(n))
                r.eta = 0.02 * float(jnp.sqrt(jnp.mean(jnp.abs(jnp.where(m, v, 0)) ** 2)))
        return optax.with_extra_args_support(optax.adam(r.eta))

    opts = [opt_for(r) for r in runs]
    for r, opt in zip(runs, opts):
        if r.state is None:
            v0 = jnp.zeros((n,) * 3, jnp.complex64)
            rng = np.random.default_rng([seed, 1 + runs.index(r)])
            r.state = FitState(v0, opt.init(v0), 0, rng.bit_generator.state, [])
        key = id(opt)
        step_cache[key] = make_step(opt, projector, lam)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=start_epoch, desc=f"reconstruct ({optimizer})", unit="epoch")
    try:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            losses = []
            for r, opt in zip(runs, opts):
                res = fit(source, opt, projector, epochs=epoch + 1, batch_size=batch_size, lam=lam,
                          indices=r.indices, state=r.state, step_fn=step_cache[id(opt)])
                r.state = res.state
                losses.append(res.history[-1]["loss"])
            dt = time.perf_counter() - t0
            vol_f = _combine([r.state.volume_f for r in runs], [r.diag for r in runs])
            rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": seconds0 + time.perf_counter() - t_start,
                   "images_per_s": len(indices) / dt, "resolution_05_ref": None, "fsc_ref": None}
            _ref_record(rec, vol_f, ref_f, px, smask, fsc_fn)
            history.append(rec)
            if ckpt is not None:
                _atomic_pickle({
                    "config": config, "epoch": epoch + 1, "history": history,
                    "runs": [{"eta": r.eta, "diag": None if r.diag is None else np.asarray(r.diag),
                              "volume_f": np.asarray(r.state.volume_f), "opt_state": _host(r.state.opt_state),
                              "epoch": r.state.epoch, "rng_state": r.state.rng_state, "history": r.state.history}
                             for r in runs],
                }, ckpt)
            if bar is not None:
                post = {"loss": f"{rec['loss']:.4g}", "img/s": f"{rec['images_per_s']:.0f}"}
                if rec["resolution_05_ref"] is not None:
                    post["res_ref"] = f"{rec['resolution_05_ref']:.2f}A"
                bar.set_postfix(post)
                bar.update(1)
            if epoch_callback is not None:
                epoch_callback(rec)
            if volume_callback is not None:
                volume_callback(vol_f)
    finally:
        if bar is not None:
            bar.close()
    vols = [r.state.volume_f for r in runs]
    return _finish(vols, _combine(vols, [r.diag for r in runs]), runs, history, ref_f, px, smask, config, fsc_fn)


def _combine(vols, diags):
    if len(vols) == 1:
        return vols[0]
    if any(d is None for d in diags):
        return 0.5 * (vols[0] + vols[1])
    d1, d2 = diags
    return (d1 * vols[0] + d2 * vols[1]) / jnp.maximum(d1 + d2, 1e-30)


def _ref_record(rec, vol_f, ref_f, px, smask, fsc_fn):
    if ref_f is None:
        return
    a = np.asarray(fourier_to_volume(vol_f))
    b = np.asarray(fourier_to_volume(ref_f))
    r = fsc_fn(a, b, pixel_size=px, mask=smask)
    rec["resolution_05_ref"] = float(r.resolution_05)
    rec["fsc_ref"] = [float(x) for x in r.fsc]


def _finish(vols, vol_f, runs, history, ref_f, px, smask, config, fsc_fn):
    vol = np.asarray(fourier_to_volume(vol_f), np.float32)
    if not np.all(np.isfinite(vol)):
        raise DivergenceError("the reconstruction contains NaN/inf; lower the learning rate (--lr)")
    half1 = half2 = fsc_half = fsc_ref = None
    if len(vols) == 2:
        half1, half2 = (np.asarray(fourier_to_volume(v), np.float32) for v in vols)
        fsc_half = fsc_fn(half1, half2, pixel_size=px, mask=smask)
    if ref_f is not None:
        fsc_ref = fsc_fn(vol, np.asarray(fourier_to_volume(ref_f), np.float32), pixel_size=px, mask=smask)
    return ReconstructResult(vol, half1, half2, history, fsc_half, fsc_ref, px, config)
