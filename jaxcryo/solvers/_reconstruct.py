"""Known-pose reconstruction of a particle set: half maps, gold-standard FSC, checkpoints, history.

``reconstruct(source, optimizer="psgd", ...)`` is what ``jaxcryo reconstruct`` runs and what the notebooks
call. It composes, around :func:`jaxcryo.solvers.fit` (the epoch loop) and the strategies of
:mod:`jaxcryo.solvers` (``psgd``, ``sgd``, ``adam``, ``cg``, ``backproject``: each owns its optimiser and
step-size policy):

* the particle selection, optional Fourier cropping and the half-set split (RELION's ``rlnRandomSubset``
  when present);
* one independent run per half (or one for all particles), prepared once (:class:`~jaxcryo.solvers.Plan`);
* checkpoints as data after every epoch (``<stem>.npz`` + ``<stem>.json``, :mod:`jaxcryo.io.checkpoint`),
  and resume from them bit for bit;
* the combined map ``(D1 v1 + D2 v2) / (D1 + D2)`` (the full-data least-squares solution for a diagonal
  Hessian; the plain mean when no diagonal is known), the half-map FSC and the FSC to a reference;
* data parallelism (``devices``): the minibatch strategies' epoch steps, the one-pass ``backproject`` and
  the spectral prior's estimate split each batch over a 1-D mesh of the local devices
  (:mod:`jaxcryo.parallel`); ``cg`` and each minibatch run's preparation still run on one device.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .. import parallel
from ..errors import DivergenceError, InputError
from ._fit import FitState, fit, make_step
from ..ndimage._fourier import resample_real
from ..io.checkpoint import load_checkpoint, save_checkpoint
from ..io._validate import REFERENCE, read_volume, require_extent
from ..ndimage._metrics import fsc as fsc_fn
from ..ndimage._metrics import fsc_record, soft_sphere_mask
from ..forward._operators import describe, make_operator
from ..forward._projection import Projector, fourier_to_volume, volume_to_fourier
from ..leastsq._priors import Prior, Tikhonov, as_prior, prior_diagonal
from ..data._checks import usable_particles
from ..data._sources import CroppedSource, split_halves
from ._spectral import HalfMapFSC, estimate_spectral_prior, resolve_prior
from ._reconstruct_settings import ReconstructSettings, settings_from
from ._strategies import STRATEGY_NAMES, MinibatchStrategy, OnePassStrategy, Plan, Problem, Strategy

#: Default settings of :func:`reconstruct` (and ``jaxcryo reconstruct``).
#: Chosen by measurement (issue 9, ``benchmarks/peers.py``): on ASPIRE-simulated sets the one-pass Wiener
#: filter with trilinear slices and the spectral prior reaches RELION's FSC shell in seconds, while the
#: trilinear least-squares optimum fits noise the interpolation cannot represent (see the README).
DEFAULTS = {k: getattr(ReconstructSettings(), k) for k in ("optimizer", "epochs", "batch_size", "interp", "probes",
                                                            "lam", "prior", "seed")}
#: The ``optimizer`` names (the strategy registry's).
OPTIMIZERS = STRATEGY_NAMES


@dataclass
class ReconstructResult:
    """``volume``: the map (real space ``(n, n, n)``); ``half1``/``half2`` the half maps (or ``None``);
    ``history``: one dict per epoch; ``fsc_half``/``fsc_ref``: :class:`jaxcryo.ndimage.FSCResult` or None;
    ``devices``: the number of devices the data passes were split over (1 for ``cg``); ``skipped``: images left
    out as non-finite (``skip_bad``)."""

    volume: np.ndarray
    half1: np.ndarray | None
    half2: np.ndarray | None
    history: list
    fsc_half: Any
    fsc_ref: Any
    pixel_size: float
    config: dict = field(default_factory=dict)
    prior: dict = field(default_factory=dict)
    devices: int = 1
    skipped: int = 0


@dataclass
class _Run:
    """One independent reconstruction (a half set, or all particles)."""

    name: str
    problem: Problem
    plan: Plan | None = None
    state: FitState | None = None

    def started(self) -> tuple[Plan, FitState]:
        """The plan and the state (set by the preparation or read from a checkpoint)."""
        if self.plan is None or self.state is None:
            raise RuntimeError(f"run {self.name}: not started")
        return self.plan, self.state


def _checkpoint_stem(path) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".npz", ".json", ".pkl") else p


def _save(stem: Path, config: dict, epoch: int, history: list, runs: list[_Run]) -> None:
    trees, meta_runs = {}, []
    for r in runs:
        plan, state = r.started()
        trees[f"{r.name}/volume_f"] = state.volume_f
        trees[f"{r.name}/opt_state"] = state.opt_state
        if plan.diag is not None:
            trees[f"{r.name}/diag"] = plan.diag
        meta_runs.append({"name": r.name, "eta": plan.eta, "has_diag": plan.diag is not None,
                          "epoch": state.epoch, "rng_state": state.rng_state, "history": state.history})
    save_checkpoint(stem, trees, {"config": config, "epoch": epoch, "history": history, "runs": meta_runs})


def _load(stem: Path, config: dict, runs: list[_Run], strategy: MinibatchStrategy) -> tuple[int, list]:
    """Restore ``runs`` from the checkpoint at ``stem``; returns ``(epoch, history)``."""
    _, meta = load_checkpoint(stem)
    saved = meta.get("config")
    if saved != config:
        diff = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v} if isinstance(saved, dict) \
            else config
        raise InputError(f"{stem}.npz: checkpoint was made with different settings {diff}; cannot {{param}}", param="resume")
    by_name = {m["name"]: m for m in meta["runs"]}
    # The optimiser state's structure depends on the plan (a fixed diagonal lives in it): read the plans
    # first, then the states into templates built from them (shapes and dtypes checked).
    raw, _ = load_checkpoint(stem)
    templates = {}
    for r in runs:
        m = by_name[r.name]
        diag = jnp.asarray(raw[f"{r.name}/diag"][0]) if m["has_diag"] else None
        r.plan = Plan(float(m["eta"]), diag)
        v0 = r.problem.zeros()
        templates[f"{r.name}/volume_f"] = v0
        templates[f"{r.name}/opt_state"] = strategy.transformation(r.problem, r.plan).init(v0)
    trees, _ = load_checkpoint(stem, templates)
    for r in runs:
        m = by_name[r.name]
        r.state = FitState(trees[f"{r.name}/volume_f"], trees[f"{r.name}/opt_state"], int(m["epoch"]),
                           m["rng_state"], m["history"])
    return int(meta["epoch"]), list(meta["history"])


def reconstruct(
    source,
    settings: ReconstructSettings | str | Strategy | None = None,
    *,
    reference: np.ndarray | str | Path | None = None,
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    indices: np.ndarray | None = None,
    epoch_callback: Callable[[dict], None] | None = None,
    volume_callback: Callable[[Any], None] | None = None,
    warn: Callable[[str], None] | None = None,
    **options: Any,
) -> ReconstructResult:
    """Reconstruct a map from a particle source with known poses.

    ``reconstruct(ds, optimizer="psgd", epochs=5)`` and ``reconstruct(ds, ReconstructSettings(...))`` are
    the same: the keywords ``options`` are the fields of :class:`ReconstructSettings` (``optimizer``,
    ``epochs``, ``batch_size``, ``lr``, ``interp``, ``probes``, ``lam``, ``prior``, ``box``, ``halfmaps``,
    ``mask``, ``seed``, ``devices``, ``prefetch``, ``skip_bad``; see there), applied over ``settings``.
    An invalid value raises :class:`InputError` naming the parameter.

    The particle set is checked first (:func:`jaxcryo.data.usable_particles`: poses, one box and pixel size,
    readable stacks, finite images, ``box`` not larger than the images).

    Args:
        source: a particle source (:class:`jaxcryo.ParticleDataset`, :class:`jaxcryo.ArrayDataset`, ...).
        settings: a :class:`ReconstructSettings` (default: the defaults; a strategy name or value here is
            the ``optimizer``).
        reference: real-space reference map (an array or an MRC file; resampled to the box) for the FSC
            each epoch.
        checkpoint_path: checkpoint stem (``DIR/checkpoint`` writes ``checkpoint.npz`` + ``checkpoint.json``)
            written atomically after every epoch; ``resume`` continues from it.
        indices: the particles to use (default all).
        epoch_callback: called with each epoch's history record.
        volume_callback: called with the (combined) centred Fourier volume after each epoch.
        warn: called with a one-line message for images left out (``skip_bad``); default: a warning.

    Data parallelism (``devices``): the minibatch strategies' epoch steps, the one-pass ``backproject`` and
    the spectral prior's half-map estimate split each batch over the devices; ``batch_size`` is the global
    batch; the result does not depend on the count beyond floating-point reduction order, and a checkpoint
    resumes on any count. ``cg`` and the preparation of a minibatch run (step size, exact diagonal) run on
    one device (:attr:`ReconstructResult.devices` is 1 for ``cg``), and ``cg`` refuses several processes.
    """
    st = settings_from(settings, options)
    strategy = st.strategy()
    epochs, batch_size, lr, interp, probes, lam, prior, box, halfmaps, mask, seed = (
        st.epochs, st.batch_size, st.lr, st.interp, st.probes, st.lam, st.prior, st.box, st.halfmaps,
        st.mask, st.seed)
    processes = parallel.process_count()
    if processes > 1 and isinstance(strategy, OnePassStrategy) and not strategy.sharded:
        raise InputError(f"{{param}} {strategy.name} with {processes} processes: CG is not split across devices "
                         "or processes; use backproject, psgd, sgd or adam, or run it in one process",
                         param="optimizer")
    stem = _checkpoint_stem(checkpoint_path)
    if resume and (stem is None or not Path(f"{stem}.npz").exists()):
        raise InputError(f"{stem}.npz: no checkpoint to {{param}} from", param="resume")
    if isinstance(reference, (str, Path)):  # the one map check: finite, cubic 3D, the particles' extent
        checked = read_volume(reference, REFERENCE)
        require_extent(checked, source.metadata.box, source.metadata.pixel_size,
                       f"the particles in {source.metadata.source or 'the set'}")
        reference = checked.data
    selection = usable_particles(source, box=box, skip_bad=st.skip_bad, indices=indices,
                                 warn=warn if warn is not None else (lambda m: warnings.warn(m, stacklevel=3)))
    indices = selection.indices
    if box is not None and box != source.metadata.box:
        source = CroppedSource(source, box)
    if halfmaps and len(indices) < 2:
        raise InputError(f"{source.metadata.source or 'particles'}: half maps need at least 2 particles")
    mesh = parallel.resolve_mesh(st.devices)  # validates the count for every strategy
    md = source.metadata
    n, px = md.box, float(md.pixel_size)
    batch_size = int(min(batch_size, len(indices) if not halfmaps else max(1, len(indices) // 2)))
    projector = Projector(n=n, pixel_size=px, operator=make_operator(interp))
    ref_f = None
    if reference is not None:
        reference = np.asarray(reference, np.float32)
        if reference.shape != (n,) * 3:
            reference = np.asarray(resample_real(jnp.asarray(reference), n, 3), np.float32)
        ref_f = volume_to_fourier(jnp.asarray(reference))
    smask = soft_sphere_mask(n) if mask else None

    if halfmaps:
        h1, h2 = split_halves(md.subset(indices) if len(indices) != len(md) else md, seed)
        parts = [("half1", indices[h1]), ("half2", indices[h2])]
    else:
        parts = [("full", indices)]
    est_halves = [idx for _, idx in parts] if halfmaps else list(split_halves(md.subset(indices), seed))
    estimates = []

    def estimate(fudge):
        halves = est_halves if halfmaps else [indices[h] for h in est_halves]
        estimates.append(estimate_spectral_prior(projector, source, halves, lam, batch_size, fudge, mesh))
        return estimates[-1]

    t_prior = time.perf_counter()
    objective_prior = resolve_prior(prior, lam, estimate)
    t_prior = time.perf_counter() - t_prior
    one_pass_mesh = mesh if isinstance(strategy, OnePassStrategy) and strategy.sharded else None
    runs = [_Run(name, Problem(source, projector, idx, objective_prior, batch_size, seed, one_pass_mesh))
            for name, idx in parts]
    config = dict(optimizer=strategy.name, epochs=epochs, batch_size=batch_size, lr=lr, interp=describe(projector.operator),
                  probes=probes, lam=lam, prior=_prior_name(prior), box=n, pixel_size=px, halfmaps=halfmaps,
                  mask=mask, seed=seed, n_particles=int(len(indices)))
    prior_record = as_prior(objective_prior).describe()
    spectral = None if not isinstance(objective_prior, Prior) or isinstance(objective_prior, Tikhonov) \
        else prior_diagonal(objective_prior, n)
    if estimates:
        prior_record.update(fsc_half_one_pass=[float(x) for x in estimates[-1].fsc],
                            snr=[float(x) for x in estimates[-1].snr], seconds=t_prior)
    fin = _Finisher(ref_f, px, smask, selection.skipped)

    if isinstance(strategy, OnePassStrategy):
        t0 = time.perf_counter()
        reuse = estimates[-1].wiener if estimates and halfmaps else [None] * len(runs)
        sols = [strategy.solve(r.problem, epochs, None if w is None else (*w, lam)) for r, w in zip(runs, reuse)]
        vol_f = _combine([s.volume_f for s in sols], [s.diag for s in sols], spectral)
        dt = time.perf_counter() - t0
        passes = strategy.data_passes(epochs)
        rec = {"epoch": passes, "loss": None, "seconds": dt, "images_per_s": len(indices) * passes / dt,
               "resolution_05_ref": None, "fsc_ref": None}
        for s in sols:
            for k, v in s.info.items():
                rec[k] = max(rec.get(k, v), v)
        fin.record(rec, vol_f)
        return fin.result([s.volume_f for s in sols], vol_f, [rec], config, prior_record,
                          devices=parallel.mesh_size(mesh) if strategy.sharded else 1)

    if not isinstance(strategy, MinibatchStrategy):
        raise TypeError(f"optimizer: {type(strategy).__name__} is neither a minibatch nor a one-pass strategy")
    history: list = []
    start_epoch = 0
    if resume and stem is not None:
        start_epoch, history = _load(stem, config, runs, strategy)
    for i, r in enumerate(runs):
        if r.state is None:
            r.plan = strategy.prepare(r.problem)
            v0 = r.problem.zeros()
            rng = np.random.default_rng([seed, 1 + i])
            r.state = FitState(v0, strategy.transformation(r.problem, r.plan).init(v0), 0,
                               dict(rng.bit_generator.state), [])
    opts = [strategy.transformation(r.problem, r.started()[0]) for r in runs]
    steps = [make_step(opt, projector, lam, mesh=mesh) for opt in opts]

    t_start = time.perf_counter()
    seconds0 = history[-1]["seconds"] if history else 0.0
    bar = tqdm(total=epochs, initial=start_epoch, desc=f"reconstruct ({strategy.name})", unit="epoch",
               disable=not progress)
    try:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            losses = []
            for r, opt, step in zip(runs, opts, steps):
                res = fit(source, opt, projector, epochs=epoch + 1, batch_size=batch_size, lam=lam,
                          indices=r.problem.indices, state=r.state, step_fn=step, mesh=mesh, prefetch=st.prefetch)
                r.state = res.state
                losses.append(res.history[-1]["loss"])
            dt = time.perf_counter() - t0
            vol_f = _combine([r.started()[1].volume_f for r in runs], [r.started()[0].diag for r in runs], spectral)
            rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)),
                   "seconds": seconds0 + time.perf_counter() - t_start, "images_per_s": len(indices) / dt,
                   "resolution_05_ref": None, "fsc_ref": None}
            fin.record(rec, vol_f)
            history.append(rec)
            if stem is not None:
                _save(stem, config, epoch + 1, history, runs)
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
        bar.close()
    vols = [r.started()[1].volume_f for r in runs]
    return fin.result(vols, _combine(vols, [r.started()[0].diag for r in runs], spectral), history, config, prior_record,
                      devices=parallel.mesh_size(mesh))


def _combine(vols, diags, spectral=None):
    """The full map from two half maps. ``diags``: each half's Hessian diagonal (data + prior), or None.

    Tikhonov: ``(d1 v1 + d2 v2) / (d1 + d2)``. With a spectral prior ``Lambda`` (``spectral``, its diagonal)
    the full-data optimum of a diagonal problem is ``(d1 v1 + d2 v2) / (d1 + d2 - Lambda)``: the whole set
    has twice the half sets' SNR, so it needs half their prior weight (RELION's whole-map FSC correction).
    """
    if len(vols) == 1:
        return vols[0]
    if any(d is None for d in diags):
        return 0.5 * (vols[0] + vols[1])
    d1, d2 = diags
    den = d1 + d2 if spectral is None else d1 + d2 - spectral
    return (d1 * vols[0] + d2 * vols[1]) / jnp.maximum(den, 1e-30)


def _prior_name(prior) -> str:
    if prior is None or isinstance(prior, str):
        return prior or "tikhonov"
    if isinstance(prior, HalfMapFSC):
        return f"fsc (fudge {prior.fudge:g})"
    return type(prior).__name__


@dataclass
class _Finisher:
    """FSCs against the reference per epoch and the final :class:`ReconstructResult`."""

    ref_f: Any
    pixel_size: float
    smask: Any
    skipped: int = 0

    def record(self, rec: dict, vol_f) -> None:
        if self.ref_f is not None:
            rec.update(fsc_record(np.asarray(fourier_to_volume(vol_f)), np.asarray(fourier_to_volume(self.ref_f)),
                                  pixel_size=self.pixel_size, mask=self.smask))

    def result(self, vols, vol_f, history, config, prior=None, devices: int = 1) -> ReconstructResult:
        px, smask = self.pixel_size, self.smask
        vol = np.asarray(fourier_to_volume(vol_f), np.float32)
        if not np.all(np.isfinite(vol)):
            raise DivergenceError("the reconstruction contains NaN/inf; lower the learning rate ({param})", param="lr")
        half1 = half2 = fsc_half = fsc_ref = None
        if len(vols) == 2:
            half1, half2 = (np.asarray(fourier_to_volume(v), np.float32) for v in vols)
            fsc_half = fsc_fn(half1, half2, pixel_size=px, mask=smask)
        if self.ref_f is not None:
            fsc_ref = fsc_fn(vol, np.asarray(fourier_to_volume(self.ref_f), np.float32), pixel_size=px, mask=smask)
        return ReconstructResult(vol, half1, half2, history, fsc_half, fsc_ref, px, config, prior or {}, devices,
                                 self.skipped)
