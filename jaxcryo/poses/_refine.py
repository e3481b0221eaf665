"""Gold-standard refinement with unknown (or approximate) poses: pose search by device-side scoring, volume
updates by (preconditioned) SGD, the half-map FSC steering the frequency limit and the angular sampling.

One iteration (:func:`refine_iteration`), for each half set independently (RELION's auto-refine scheme):

1. **poses** at the frequency limit ``kmax`` (the current resolution plus a margin): a global search over
   :func:`jaxcryo.rotations.so3_grid` x :func:`jaxcryo.rotations.shift_grid` (when the particles have no poses yet),
   followed by local searches around the current poses (:func:`jaxcryo.rotations.local_grid` at the current
   angular step, a shift grid around each image's origin), scored by :mod:`jaxcryo.poses` (the
   log-likelihood of the reconstruction objective); hard assignment to the best candidate (or top-K soft
   assignment, ``top_k``). The search is a method (:func:`search_method`: a :class:`~jaxcryo.poses.Cascade`
   of :class:`~jaxcryo.poses.GlobalSearch` and :class:`~jaxcryo.poses.LocalSearch`) run by the pose-search
   engine (:class:`~jaxcryo.poses.PoseSearch`: chunks under ``score_memory``, split over ``devices``);
2. **volume** (:func:`jaxcryo.poses._volume.update_half_maps`): each half map estimated anew from the particles
   at their new poses, regularised by the spectral prior of its one-pass half-map FSC (RELION's ``tau^2``):
   the one-pass Wiener filter by default (``optimizer="backproject"``), or epochs of a minibatch strategy
   from zero on that objective (``"psgd"``: :class:`jaxcryo.solvers.PSGD`; ``"sgd"``); ``reestimate=False``
   keeps the earlier scheme (epochs warm-started from the last half maps, Tikhonov prior), which stalled on
   independent data (issue 19). The strategy is resolved once from the registry (:func:`update_strategy`)
   and a minibatch step size measured once per run;
3. **FSC** of the two half maps (:func:`jaxcryo.ndimage.fsc`): the resolution at 0.143 sets the next ``kmax``; when it improves by less than
   one shell the angular step is halved (down to ``min_step``); after ``patience`` such iterations at the
   finest step the refinement stops.

:func:`refine` runs the loop from a reference map low-pass filtered to ``init_resolution`` (checkpointing
after each iteration with ``checkpoint``; ``resume`` continues from it) and finishes with a known-pose reconstruction (:func:`jaxcryo.reconstruct`, the
default one-pass estimate with the half-map spectral prior) from the refined poses, whose half maps are
postprocessed (:func:`finish_refinement`, :func:`jaxcryo.post.postprocess`): the final resolution is the masked FSC
corrected by phase randomisation (Chen et al. 2013), with a soft spherical mask unless one is given.

Issue 19 (:class:`RefineSettings`): the reference is rescaled to the particles' intensity before the first
search (:func:`scale_reference`, ``scale_reference``, on by default: the least-squares scores are not scale
invariant); prototypes, off by default: a solvent mask on the scored references (``solvent_mask``, the one
``particle_diameter``), a whitened likelihood and an offset prior (``whiten``, ``offset_sigma_px``: the
:class:`~jaxcryo.poses.Scorer`'s ``shell_weights``/``offset_sigma``, :func:`jaxcryo.poses._noise.score_options`)
and recentring (``recentre``). A finished run's drift, collapse or stall warnings
(:func:`jaxcryo.poses._diagnostics.run_warnings`) are :attr:`RefineResult.warnings`.

Handedness: a refinement from a reference keeps the reference's hand. Metrics against a ground truth (for
simulated data) align poses with :func:`jaxcryo.rotations.align_rotations`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Complex, Float
from tqdm.auto import tqdm

from .. import parallel
from ..data._sources import split_halves
from ..errors import InputError
from ..forward._operators import make_operator
from ..forward._particles import ParticleMetadata
from ..io._validate import MASK, check_values
from ..forward._projection import Projector, fourier_to_volume, volume_to_fourier
from ..ndimage._fourier import radius_grid, resample_real, shell_index
from ..ndimage._masks import frequency_edge, spherical_mask
from ..ndimage._metrics import first_shell_below, fsc as fsc_fn
from ..rotations._grids import geodesic_distance_deg, shift_grid, so3_grid
from ..post._postprocess import FIT_FROM, postprocess
from ..solvers._strategies import strategy_name
from ._assign import SoftPoses, with_poses
from ._centring import masked_fourier, recentre, solvent_mask
from ._diagnostics import run_warnings
from ._noise import score_options
from ._scale import reference_scale
from ._checkpoints import checkpoint_stem
from ._search import AbstractSearchMethod, Cascade, GlobalSearch, LocalSearch, PoseSearch
from ._volume import update_half_maps, update_strategy
from ._state import RefineResult, RefineSettings, RefineState, load_state, save_state

def lowpass(vol_f: Complex[Array, "n n n"], resolution: float, pixel_size: float,
            width: float = 2.0) -> Complex[Array, "n n n"]:
    """A centred Fourier volume low-pass filtered at ``resolution`` Å with a raised-cosine edge of ``width``
    shells."""
    n = vol_f.shape[-1]
    k0 = n * pixel_size / resolution
    return vol_f * jnp.asarray(frequency_edge(radius_grid(n, 3), k0, width), jnp.real(vol_f).dtype)


def prepare_reference(reference: Float[np.ndarray, "m m m"], ref_pixel_size: float | None, box: int,
                      pixel_size: float, warn: Callable[[str], None] | None = None) -> Float[np.ndarray, "n n n"]:
    """The reference map resampled to the particles' box and pixel size (Fourier crop / pad with the same
    physical extent when the pixel sizes agree in extent); refuses a map whose extent differs by > 2%."""
    ref = np.asarray(reference, np.float32)
    if ref.ndim != 3 or len(set(ref.shape)) != 1:
        raise InputError(f"reference: expected a cubic 3D map, got shape {ref.shape}", param="reference")
    n0 = ref.shape[0]
    px0 = pixel_size * box / n0 if ref_pixel_size is None else float(ref_pixel_size)
    if abs(n0 * px0 - box * pixel_size) > 0.02 * box * pixel_size:
        raise InputError(f"reference: {n0} px at {px0:g} A ({n0 * px0:.1f} A across) does not match the "
                         f"particles' {box} px at {pixel_size:g} A ({box * pixel_size:.1f} A); resample it first",
                         param="reference")
    if n0 != box:
        if warn is not None:
            warn(f"reference: {n0} px at {px0:g} A resampled to the particles' {box} px at {pixel_size:g} A")
        ref = np.asarray(resample_real(jnp.asarray(ref), box, 3), np.float32)
    return ref


def _check_poses(md: ParticleMetadata) -> None:
    if md.rotations is not None and not np.all(np.isfinite(md.rotations)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(np.asarray(md.rotations).reshape(len(md), -1)), axis=1))[0])
        raise InputError(f"{md.source or 'particles'}: the pose of particle {bad + 1} is not finite (NaN angles)")
    if not np.all(np.isfinite(md.shifts)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(md.shifts), axis=1))[0])
        raise InputError(f"{md.source or 'particles'}: the origin of particle {bad + 1} is not finite")


def _check_images(source) -> None:
    """Refuse, before any work, a set with a non-finite image: a one-pass half-map update would turn it into
    a NaN map silently (the minibatch steps would catch it only at their first step). Names the stack, the
    particle and its image number."""
    from ..data._checks import find_bad_images

    bad = find_bad_images(source)
    if not bad.any():
        return
    md = source.metadata
    p = int(np.flatnonzero(bad)[0])
    where = md.image_files[p] if md.image_files is not None else (md.source or "particles")
    raise InputError(f"{where}: {int(bad.sum())} image(s) contain NaN/inf (first: particle {p + 1}, image "
                     f"{int(md.image_indices[p]) + 1} of the stack; particles from {md.source or 'particles'}); "
                     "remove them (jaxcryo reconstruct --skip-bad and abinitio --skip-bad leave them out)")


def fsc_weighted(vol_f: Complex[Array, "n n n"], fsc: Float[np.ndarray, " s"]) -> Complex[Array, "n n n"]:
    """``vol_f`` (centred Fourier volume) multiplied in each shell ``s`` by ``sqrt(2 F_s / (1 + F_s))``, the
    half-map FSC ``F`` turned into the full map's correlation with the truth (``F`` clipped to [0, 1]; shells
    beyond ``F``'s length get 0)."""
    n = vol_f.shape[-1]
    f = np.clip(np.asarray(fsc, np.float64), 0.0, 1.0)
    w = np.sqrt(2 * f / (1 + f))
    shells = shell_index(n, 3)
    table = np.zeros(shells.max() + 1)
    table[: min(len(w), len(table))] = w[: len(table)]
    return vol_f * jnp.asarray(table[shells], jnp.real(vol_f).dtype)


def search_method(settings: RefineSettings, pixel_size: float, step: float, shift_step_px: float,
                  global_search: bool) -> AbstractSearchMethod:
    """An iteration's pose search: local (:class:`LocalSearch`, ``+- local_radius_steps`` steps of ``step``
    and ``+- local_shift_steps`` shift steps), after a global one (:class:`GlobalSearch` at ``global_step``,
    then the local search at half its steps) when the particles have no poses yet."""
    s, px = settings, pixel_size

    def local(step_: float, shift_: float) -> LocalSearch:
        grid = shift_grid(s.local_shift_steps * shift_ * px, shift_ * px)
        return LocalSearch(step_, s.local_radius_steps * step_, jnp.asarray(grid, jnp.float32), int(s.top_k))

    if not global_search:
        return local(step, shift_step_px)
    glob = GlobalSearch(jnp.asarray(so3_grid(s.global_step), jnp.float32),
                        jnp.asarray(shift_grid(s.max_shift_px * px, s.global_shift_step_px * px), jnp.float32))
    return Cascade((glob, local(s.global_step / 2, s.global_shift_step_px / 2)))


def refine_iteration(state: RefineState, source, halves, projector: Projector, settings: RefineSettings,
                     plans: dict | None = None, progress: bool = False, devices=None,
                     engine: PoseSearch | None = None) -> RefineState:
    """One gold-standard iteration (module docstring): poses per half at the current ``kmax``, volume updates,
    half-map FSC, next angular step. Returns the new state (the input is not modified).

    ``devices``: a device count or a :class:`jax.sharding.Mesh` (``None``: all local devices): the pose
    scoring and the volume updates are split over a 1-D mesh of that many devices (:mod:`jaxcryo.parallel`;
    the batch is the global batch, so the result does not depend on the count beyond rounding).
    ``plans``: the measured step sizes (default: the state's). ``engine``: the :class:`PoseSearch` to use."""
    s = settings
    mesh = parallel.resolve_mesh(devices)
    plans = state.plans if plans is None else plans
    strategy = update_strategy(s, projector)
    t0 = time.perf_counter()
    n, px = projector.n, projector.pixel_size
    kmax = float(min(n // 2 - 1, np.ceil(n * px / state.resolution) + s.kmax_margin))
    if engine is None:
        op = make_operator(s.interp, oversample=s.score_oversample) if s.score_oversample > 1 else projector.operator
        engine = PoseSearch(Projector(n=n, pixel_size=px, operator=op), s.batch_size, s.score_memory, mesh)
    rots = state.rotations
    # without starting poses (local_only=False): the first global_iterations search globally
    global_search = rots is None or (state.iteration < s.global_iterations and bool(state.history)
                                     and bool(state.history[0].get("global_search")))
    shifts = state.shifts.copy()
    method = search_method(s, px, state.step, state.shift_step_px, global_search)
    k = int(s.top_k)
    new_r, new_s = np.zeros((len(shifts), 3, 3)), shifts.copy()
    soft_r, soft_s, soft_w = np.zeros((len(shifts), k, 3, 3)), np.zeros((len(shifts), k, 2)), np.zeros((len(shifts), k))
    prev_fsc = state.history[-1].get("half_map_fsc") if state.history else None
    src = source if global_search or rots is None else with_poses(source, rots, shifts)
    noise_log: list = []
    solvent = solvent_mask(n, px, s.mask_diameter(n, px)) if s.solvent_mask else None  # once, for both halves
    for h, idx in enumerate(halves):
        v = state.half_maps[h]
        if s.fsc_weighting and prev_fsc is not None:  # the first iteration scores against the low-passed reference
            v = fsc_weighted(v, prev_fsc)
        if solvent is not None:  # issue 19 prototype: solvent-flattened references
            v = masked_fourier(v, solvent)
        weights, sigma, spectrum = score_options(s, src, idx, state.half_maps[h], projector, kmax, not global_search)
        if spectrum is not None:
            noise_log.append(spectrum)
        found = engine(method, v, kmax, src, idx, rotations=None if global_search or rots is None else rots[idx],
                       shifts=None if global_search or rots is None else shifts[idx], progress=progress,
                       desc=f"{'global' if global_search else 'local'} search, half {h + 1}",
                       shell_weights=weights, offset_sigma=sigma)
        new_r[idx], new_s[idx] = found.rotations[:, 0], found.shifts[:, 0]  # the best candidate (soft: first of top K)
        soft_r[idx], soft_s[idx], soft_w[idx] = found.rotations, found.shifts, found.weights
    change = None if rots is None else float(np.mean(geodesic_distance_deg(rots, new_r)))
    shift_change = float(np.mean(np.linalg.norm(new_s - shifts, axis=1))) / px
    t_pose = time.perf_counter() - t0
    if k == 1:
        posed, rows = with_poses(source, new_r, new_s), list(halves)
    else:  # soft assignment: every particle at its top K candidates, weighted
        posed = SoftPoses(source, soft_r, soft_s, soft_w)
        rows = [posed.row_indices(idx) for idx in halves]
    name = s.optimizer if isinstance(s.optimizer, str) else strategy_name(s.optimizer)
    maps, update_rec = update_half_maps(posed, rows, projector, state.half_maps, s, strategy, plans, progress,
                                        name, mesh)
    centre_offset = None
    if s.recentre:  # issue 19 prototype: keep the density centred, the origins moved to match (a drift only)
        maps, new_s, c = recentre(maps, new_r, new_s, px, min_offset_px=0.05 * n)
        centre_offset = [float(x) for x in c]
    f = fsc_fn(np.asarray(maps[0]), np.asarray(maps[1]), pixel_size=px, fourier=True)
    k143, res = first_shell_below(f.fsc, 0.143), float(f.resolution_0143)
    improved = n * px / res - n * px / state.resolution >= 1.0 - 1e-9
    step, shift_step, stalls = state.step, state.shift_step_px, state.stalls
    if not improved and not global_search:
        if step / 2 >= s.min_step:
            step, shift_step = step / 2, max(0.25, shift_step / 2)
        else:
            stalls += 1
    rec = {"iteration": state.iteration + 1, "resolution": res, "fsc_0143_shell": k143,
           "angular_step": state.step, "next_angular_step": step, "shift_step_px": state.shift_step_px,
           "frequency_limit_shell": kmax, "global_search": global_search,
           "mean_pose_change_deg": change, "mean_shift_change_px": shift_change,
           "seconds": time.perf_counter() - t0, "pose_seconds": t_pose, "optimizer": name,
           "devices": parallel.mesh_size(mesh), "top_k": k,
           "mean_best_weight": float(np.mean(soft_w[:, 0])), "centre_offset_px": centre_offset,
           "noise_spectrum": noise_log or None, **update_rec,
           "half_map_fsc": [float(x) for x in f.fsc]}
    hist = list(state.history) + [rec]
    return RefineState(list(maps), new_r, new_s, res, step, shift_step, state.iteration + 1, stalls, hist, plans)


def done(state: RefineState, settings: RefineSettings) -> bool:
    """Stop at ``iterations``, or after ``patience`` iterations at the finest step without improvement."""
    return state.iteration >= settings.iterations or (state.step / 2 < settings.min_step
                                                        and state.stalls >= settings.patience)


def initial_state(source, reference_f: Complex[Array, "n n n"], projector: Projector, settings: RefineSettings,
                  local_only: bool) -> RefineState:
    """The state before the first iteration: both half maps the low-passed reference; the particles' poses
    (``local_only``) or none (a global search first)."""
    md = source.metadata
    ref = lowpass(reference_f, settings.init_resolution, projector.pixel_size)
    if local_only:
        if md.rotations is None:
            raise InputError(f"{md.source or 'particles'}: --local-only needs poses to start from", param="local_only")
        rots, shifts, step = np.asarray(md.rotations, np.float64), np.asarray(md.shifts, np.float64), settings.local_step
    else:
        rots, shifts, step = None, np.zeros((len(md), 2)), settings.global_step / 2
    return RefineState([ref, ref], rots, shifts, float(settings.init_resolution), float(step),
                       float(settings.local_shift_step_px), 0, 0, [])


def refine(source, reference: Float[np.ndarray, "m m m"], settings: RefineSettings = RefineSettings(),
           local_only: bool = False, reference_pixel_size: float | None = None, progress: bool = True,
           state: RefineState | None = None, on_iteration: Callable[[RefineState], None] | None = None,
           warn: Callable[[str], None] | None = None, truth: Float[np.ndarray, "n n n"] | None = None, devices=None,
           checkpoint: "str | Path | None" = None, resume: bool = False,
           mask: Float[np.ndarray, "n n n"] | None = None) -> RefineResult:
    """Refine poses and maps of ``source`` from ``reference`` (module docstring).

    Args:
        source: particles (poses used only with ``local_only``).
        reference: real-space map (resampled to the particles' box if its extent matches).
        settings: :class:`RefineSettings`.
        local_only: start from the particles' own poses (local searches only).
        state: a :class:`RefineState` to resume from.
        on_iteration: called with the state after each iteration (after its checkpoint).
        truth: optional ground-truth map (simulations): each history record gains its FSC-0.5 shell.
        devices: local devices to split the pose scoring and the volume updates over (a count or a mesh;
            default all JAX sees; see :func:`refine_iteration`); the closing known-pose reconstruction gets the
            same (:func:`jaxcryo.reconstruct`).
        checkpoint: checkpoint stem (``DIR/checkpoint``: ``checkpoint.npz`` + ``checkpoint.json``), written
            atomically after every iteration; ``resume`` continues from it (its ``local_only`` wins) to the
            same maps and poses as a run without interruption.
        mask: solvent mask in [0, 1] on the particles' grid for the closing postprocess (:func:`finish_refinement`);
            ``None``: the soft spherical mask of ``settings.mask_diameter``.
    """
    from ..solvers._reconstruct import reconstruct

    md = source.metadata
    if len(md) < 2:
        raise InputError(f"{md.source or 'particles'}: {len(md)} particle(s); refinement needs at least 2")
    _check_poses(md)
    _check_images(source)
    n, px = md.box, float(md.pixel_size)
    if mask is not None:  # checked before the work: in [0, 1], not empty, the particles' box
        mask = np.asarray(mask, np.float32)
        if mask.shape != (n, n, n):
            raise InputError(f"{{param}}: shape {mask.shape}, expected the particles' box ({n}, {n}, {n})",
                             param="mask")
        check_values(mask, "mask", MASK)
    projector = Projector(n=n, pixel_size=px, operator=make_operator(settings.interp))
    ref = prepare_reference(reference, reference_pixel_size, n, px, warn)
    halves = split_halves(md, settings.seed)
    mesh = parallel.resolve_mesh(devices)  # validates the count before any work
    stem = checkpoint_stem(checkpoint)
    if resume and stem is None:
        raise InputError("{param} needs a checkpoint path", param="resume")
    ref_scale = None  # issue 19: the reference on the particles' scale before the first search
    if state is None:
        ref_f = volume_to_fourier(jnp.asarray(ref))
        if resume:
            assert stem is not None
            template = initial_state(source, ref_f, projector, settings, local_only and md.rotations is not None)
            state, local_only = load_state(stem, template, settings)
        else:
            ref_scale = scale_reference(source, ref_f, projector, settings, warn)
            state = initial_state(source, ref_f if ref_scale is None else ref_f * ref_scale, projector, settings,
                                  local_only)
    truth_f = None if truth is None else volume_to_fourier(jnp.asarray(np.asarray(truth, np.float32)))
    bar = tqdm(total=settings.iterations, initial=state.iteration, desc="refine", unit="it", disable=not progress)
    while not done(state, settings):
        state = refine_iteration(state, source, halves, projector, settings, state.plans, progress, mesh or 1)
        if ref_scale is not None and state.iteration == 1:
            state.history[-1]["reference_scale"] = ref_scale
        if truth_f is not None:
            avg = 0.5 * (state.half_maps[0] + state.half_maps[1])
            f = fsc_fn(np.asarray(avg), np.asarray(truth_f), pixel_size=px, fourier=True)
            state.history[-1]["fsc05_truth_shell"] = first_shell_below(f.fsc, 0.5)
        if stem is not None:
            save_state(stem, state, settings, local_only)
        bar.update(1)
        bar.set_postfix(res=f"{state.resolution:.1f}A", step=f"{state.step:g}")
        if on_iteration is not None:
            on_iteration(state)
    bar.close()
    sub = np.zeros(len(md), np.int64)
    sub[halves[0]], sub[halves[1]] = 1, 2
    out_md = dataclasses.replace(md, rotations=state.rotations, shifts=state.shifts, random_subset=sub,
                                 missing_poses=None)
    assert state.rotations is not None  # after an iteration
    posed = with_poses(source, state.rotations, state.shifts)
    posed.metadata = out_md
    final = reconstruct(posed, seed=settings.seed, progress=progress, reference=truth,  # the known-pose default
                        devices=parallel.mesh_size(mesh))
    result = finish_refinement(RefineResult(out_md, state, state.history, final), settings, mask, warn)
    # issue 19: say when it failed (a drifted map, a collapse against the reference, a stall at a poor resolution)
    return result._replace(warnings=tuple(run_warnings(np.asarray(final.volume), ref, state.history, px,
                                                       settings.init_resolution)))


def scale_reference(source, reference_f: Complex[Array, "n n n"], projector: Projector, settings: RefineSettings,
                    warn: Callable[[str], None] | None = None) -> float | None:
    """The factor that puts the reference (centred Fourier volume, before its low-pass) on the particles'
    intensity scale (:func:`jaxcryo.poses._scale.reference_scale` of the low-passed reference, seeded by
    ``settings.seed``), or ``None`` without ``settings.scale_reference``; a factor outside [0.5, 2] is told
    to ``warn``."""
    if not settings.scale_reference:
        return None
    lp = lowpass(reference_f, settings.init_resolution, projector.pixel_size)
    a = reference_scale(source, lp, projector, settings.init_resolution, seed=settings.seed)
    if warn is not None and not 0.5 < a < 2.0:
        warn(f"reference: scaled by {a:.3g} to the particles' intensity (its projections' power against the "
             f"images')")
    return a


def finish_refinement(result: RefineResult, settings: RefineSettings, mask: Float[np.ndarray, "n n n"] | None = None,
           warn: Callable[[str], None] | None = None) -> RefineResult:
    """``result`` with the postprocess of its final half maps (:func:`jaxcryo.post.postprocess`: masked FSC
    corrected by phase randomisation, Guinier B-factor from :data:`jaxcryo.post.FIT_FROM` Å, seeded by
    ``settings.seed``) with ``mask``, or the soft spherical mask of ``settings.mask_diameter`` Å
    (:func:`jaxcryo.ndimage.spherical_mask`). Its warnings go to ``warn`` and ``postprocess_warnings``; when it
    cannot run (e.g. the unmasked FSC never falls below 0.8) ``postprocess`` is None and ``postprocess_error``
    says why: the resolution stays the unmasked half-map FSC's."""
    final = result.final
    px = float(result.metadata.pixel_size)
    if final.half1 is not None and final.half2 is not None:
        h1, h2 = final.half1, final.half2
    else:
        h1, h2 = half_map_volumes(result.state)
    n = int(np.asarray(h1).shape[-1])
    diameter = None
    if mask is None:
        diameter = settings.mask_diameter(n, px)
        mask = spherical_mask(n, diameter, px)
    post, error = None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            post = postprocess(h1, h2, pixel_size=px, mask=mask, fit_from=FIT_FROM, seed=settings.seed)
        except InputError as e:
            error = f"postprocess: {e}; the resolution is the unmasked half-map FSC's"
    told = tuple(f"postprocess: {w.message}" for w in caught if issubclass(w.category, UserWarning))
    for msg in told + ((error,) if error else ()):
        if warn is not None:
            warn(msg)
    return result._replace(postprocess=post, postprocess_error=error, postprocess_warnings=told,
                           mask=np.asarray(mask, np.float32), mask_diameter=diameter)


def half_map_volumes(state: RefineState) -> list[Float[np.ndarray, "n n n"]]:
    """The two half maps in real space (float32)."""
    return [np.asarray(fourier_to_volume(v), np.float32) for v in state.half_maps]
