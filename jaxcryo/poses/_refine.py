"""Gold-standard refinement with unknown (or approximate) poses: pose search by device-side scoring, volume
updates by (preconditioned) SGD, the half-map FSC steering the frequency limit and the angular sampling.

One iteration (:func:`refine_iteration`), for each half set independently (RELION's auto-refine scheme):

1. **poses** at the frequency limit ``kmax`` (the current resolution plus a margin): a global search over
   :func:`jaxcryo.rotations.so3_grid` x :func:`jaxcryo.rotations.shift_grid` (when the particles have no poses yet),
   followed by local searches around the current poses (:func:`jaxcryo.rotations.local_grid` at the current
   angular step, a shift grid around each image's origin), scored by :mod:`jaxcryo.poses` (the
   log-likelihood of the reconstruction objective); hard assignment to the best candidate;
2. **volume**: a few epochs of minibatch optimisation of the known-pose objective with those poses, warm
   started from the half map: preconditioned SGD (:class:`jaxcryo.solvers.PSGD`, the exact batch
   diagonal for operators with a local stencil, else Hutchinson) or plain SGD (``optimizer="sgd"``), so
   that a run shows what the preconditioner buys inside the refinement;
3. **FSC** of the two half maps: the resolution at 0.143 sets the next ``kmax``; when it improves by less than
   one shell the angular step is halved (down to ``min_step``); after ``patience`` such iterations at the
   finest step the refinement stops.

:func:`refine` runs the loop from a reference map low-pass filtered to ``init_resolution`` (checkpointing
after each iteration) and finishes with a known-pose reconstruction (:func:`jaxcryo.reconstruct`, the
default one-pass estimate with the half-map spectral prior) from the refined poses.

Handedness: a refinement from a reference keeps the reference's hand. Metrics against a ground truth (for
simulated data) align poses with :func:`jaxcryo.rotations.align_rotations`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .. import parallel
from ..data._batch import epoch_batches, to_batch
from ..errors import InputError
from ..solvers._fit import fit
from ..ndimage._masks import frequency_edge
from ..ndimage._fourier import radius_grid, resample_real
from ..rotations._grids import geodesic_distance_deg, local_grid, shift_grid, so3_grid
from ..forward._operators import make_operator
from ..solvers._optim import harmonic_schedule, preconditioned_sgd, sgd
from ..forward._particles import ParticleMetadata
from ..leastsq._priors import fourier_fsc
from ..forward._projection import Projector, fourier_to_volume, volume_to_fourier
from ._centring import masked_fourier, recentre, solvent_mask
from ._scale import reference_scale
from ._noise import noise_spectrum, offset_log_prior, shell_filter, whiten_batch
from ._scoring import best_poses, score_local, score_pixels, score_poses, soft_weights
from ..data._sources import ArrayDataset, ParticleDataset, split_halves
from ..solvers._strategies import Problem, initial_step_size


@dataclass(frozen=True)
class RefineSettings:
    """The choices of a refinement (all angles in degrees, lengths in Å unless named ``_px``).

    Attributes:
        init_resolution: the reference is low-pass filtered to this resolution first (RELION's
            ``--ini_high``).
        global_step: angular sampling of the global search (when the particles have no poses).
        local_step: the angular step of the first local search (``local_only``: the expected pose error / 2).
        min_step: the finest angular step.
        local_radius_steps: local searches cover ``+- local_radius_steps`` steps around each pose.
        max_shift_px: the global translation search covers ``+- max_shift_px`` pixels.
        global_shift_step_px: its step.
        local_shift_steps: local shift grids cover ``+- local_shift_steps`` steps of the current shift step
            (which starts at ``local_shift_step_px`` and halves with the angular step, down to 0.25 px).
        kmax_margin: shells searched beyond the current resolution.
        iterations: iterations at most.
        patience: iterations at the finest step without a one-shell improvement before stopping.
        epochs_per_iteration: epochs of the volume update per iteration.
        optimizer: ``"psgd"`` (preconditioned SGD) or ``"sgd"`` for the volume updates.
        top_k: pose assignment of the local searches: 1 = hard (each image at its best candidate); K > 1 =
            soft: each image enters the volume update at its K most likely candidates with their posterior
            weights (:func:`assign_poses`); the particles' poses are the best candidates either way.
        lam: Tikhonov weight of the volume updates.
        batch_size: images per step of the volume updates and of the pose scoring.
        interp: slice operator name for scoring and updates.
        fsc_weighting: score against each half map weighted per shell by ``sqrt(2 FSC / (1 + FSC))`` of the
            last half-map FSC (the map's SNR weighting, as RELION's and cryoSPARC's references for alignment),
            not against the raw half map, whose noisy high shells add pose error.
        score_oversample: the scoring operator oversamples the map this many times (with the gridding
            correction): plain trilinear slices bias the best pose by degrees, which the volume updates (plain
            operator: exact batch diagonal) do not suffer from.
        seed: half-set split and data order.
        particle_diameter: issue 19 prototype: the references the poses are scored against are multiplied by
            a soft spherical solvent mask of this diameter (Å; :func:`jaxcryo.poses._centring.solvent_mask`),
            as RELION's ``--particle_diameter``; ``None``: no mask.
        recentre: issue 19 prototype: after each volume update, move the half maps so their density is
            centred and the particles' origins with them (:func:`jaxcryo.poses._centring.recentre`).
        whiten: issue 19 prototype: score with the per-shell noise spectrum of the residuals at the current
            poses (:mod:`jaxcryo.poses._noise`; the first global search: the images' own power spectrum).
        offset_sigma_px: issue 19 prototype: a Gaussian prior of this width (px) on the origins, added to the
            scores (scaled as log-likelihoods by the noise estimate; a white one unless ``whiten``).
        scale_reference: issue 19: before the first iteration, rescale the reference to the images' intensity
            (:func:`jaxcryo.poses._scale.reference_scale`): the least-squares scores are not scale invariant,
            and a reference on another scale biases every pose.
    """

    init_resolution: float = 30.0
    global_step: float = 15.0
    local_step: float = 2.5
    min_step: float = 0.6
    local_radius_steps: float = 2.0
    max_shift_px: float = 6.0
    global_shift_step_px: float = 2.0
    local_shift_step_px: float = 1.0
    local_shift_steps: int = 2
    kmax_margin: int = 4
    iterations: int = 12
    patience: int = 1
    epochs_per_iteration: int = 2
    optimizer: str = "psgd"
    top_k: int = 1
    lam: float = 1e-3
    batch_size: int = 200
    interp: str = "trilinear"
    fsc_weighting: bool = True
    score_oversample: int = 2
    seed: int = 0
    particle_diameter: float | None = None
    recentre: bool = False
    whiten: bool = False
    offset_sigma_px: float | None = None
    scale_reference: bool = True


@dataclass
class RefineState:
    """Everything a refinement carries between iterations (checkpointed as data)."""

    half_maps: list  # two centred Fourier volumes (complex64)
    rotations: np.ndarray | None  # (n, 3, 3) RELION matrices, None before the first global search
    shifts: np.ndarray  # (n, 2) Å
    resolution: float  # Å, half-map FSC 0.143 (the initial low-pass before the first iteration)
    step: float  # current angular step (degrees)
    shift_step_px: float
    iteration: int = 0
    stalls: int = 0
    history: list = field(default_factory=list)


class RefineResult(NamedTuple):
    metadata: ParticleMetadata  # the particles with the refined poses (and rlnRandomSubset)
    state: RefineState
    history: list
    final: object  # the ReconstructResult of the closing known-pose reconstruction


def lowpass(vol_f, resolution: float, pixel_size: float, width: float = 2.0):
    """A centred Fourier volume low-pass filtered at ``resolution`` Å with a raised-cosine edge of ``width``
    shells."""
    n = vol_f.shape[-1]
    r = radius_grid(n, 3)
    k0 = n * pixel_size / resolution
    return vol_f * jnp.asarray(frequency_edge(r, k0, width), jnp.real(vol_f).dtype)


def prepare_reference(reference: np.ndarray, ref_pixel_size: float | None, box: int, pixel_size: float,
                      warn: Callable[[str], None] | None = None) -> np.ndarray:
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


def _with_poses(source, rotations, shifts):
    """The same images with other poses."""
    md = dataclasses.replace(source.metadata, rotations=np.asarray(rotations, np.float64),
                             shifts=np.asarray(shifts, np.float64), missing_poses=None)
    if isinstance(source, ArrayDataset):
        return ArrayDataset(md, source._images)
    if isinstance(source, ParticleDataset):
        ds = ParticleDataset(md)
        ds._stacks, ds._lock = source._stacks, source._lock  # share the open stacks (and their lock)
        return ds
    new = type(source).__new__(type(source))
    new.__dict__.update(source.__dict__)
    new.metadata = md
    return new


def _per_image(f: Callable, mesh, traced: list | None = None) -> Callable:
    """``f(volume_f, raw_batch, *per_image_args) -> per-image outputs`` jitted; on a mesh of more than one
    device, run under :func:`jax.shard_map` with the batch and the per-image arguments split over the devices
    and the volume replicated (pose scoring is independent per image: no reduction is needed, and each device
    computes its own images' candidate projections). ``traced``: gets the leading batch dimension each trace
    of ``f`` saw (``B / D`` on ``D`` devices)."""
    if traced is not None:
        inner = f

        def f(v, raw, *args):
            traced.append(int(jax.tree_util.tree_leaves(raw)[0].shape[0]))
            return inner(v, raw, *args)

    if mesh is None:
        return jax.jit(f)
    spec, rep = jax.sharding.PartitionSpec(parallel.AXIS), jax.sharding.PartitionSpec()

    def wrapped(v, raw, *args):
        sm = jax.shard_map(f, mesh=mesh, in_specs=(rep, spec) + (spec,) * len(args), out_specs=spec)
        return sm(v, raw, *args)

    return jax.jit(wrapped)


class _Scorer:
    """Jitted pose searches over a half set's batches at one ``kmax`` (on ``mesh``: data-parallel over its
    devices, each batch padded to a multiple of the device count). ``traced_batch_shapes``: the per-device
    batch each search was traced with."""

    def __init__(self, projector: Projector, settings: RefineSettings, mesh=None):
        self.projector, self.s, self.mesh = projector, settings, mesh
        self.traced_batch_shapes: list[int] = []
        self.white_2d = None

    def _batch(self, raw):  # issue 19 hook: whitened images (the map is whitened by the caller)
        b = to_batch(raw)
        return b if self.white_2d is None else whiten_batch(b, self.white_2d)

    def _prior(self, shifts):  # issue 19 hook: Gaussian prior on the origins, (..., 2) Å -> (...)
        if self.s.offset_sigma_px is None:
            return jnp.zeros(shifts.shape[:-1], shifts.dtype)
        return offset_log_prior(shifts, self.s.offset_sigma_px * self.projector.pixel_size)

    def global_search(self, vol_f, source, idx, kmax, progress, desc):
        s, px = self.s, self.projector.pixel_size
        rots = jnp.asarray(so3_grid(s.global_step), jnp.float32)
        shifts = jnp.asarray(shift_grid(s.max_shift_px * px, s.global_shift_step_px * px), jnp.float32)
        f = _per_image(lambda v, raw: _best(score_poses(v, self._batch(raw), self.projector, rots, shifts, kmax=kmax)
                                            + self._prior(shifts), rots, shifts), self.mesh, self.traced_batch_shapes)
        return self._run(f, vol_f, source, idx, progress, desc)

    def local_search(self, vol_f, source, idx, rotations, shifts, step, shift_step_px, kmax, progress, desc):
        s, px = self.s, self.projector.pixel_size
        radius = s.local_radius_steps * step
        grid = jnp.asarray(shift_grid(s.local_shift_steps * shift_step_px * px, shift_step_px * px), jnp.float32)

        top_k = int(s.top_k)
        n_pix = len(score_pixels(self.projector, kmax))

        def one(v, raw, rot, sh):
            cand = local_grid(rot, step, radius)
            csh = sh[:, None, :] + grid[None]
            sc = score_local(v, self._batch(raw), self.projector, cand, csh, kmax=kmax) + self._prior(csh)[:, None, :]
            return tuple(assign_poses(sc, cand, csh, top_k, n_pix))

        f = _per_image(one, self.mesh, self.traced_batch_shapes)
        return self._run(f, vol_f, source, idx, progress, desc, rotations, shifts)

    def _run(self, f, vol_f, source, idx, progress, desc, rotations=None, shifts=None):
        n = len(idx)
        outs = None
        mesh = self.mesh
        batches = epoch_batches(np.arange(n), self.s.batch_size, multiple=parallel.mesh_size(mesh))
        vol_f = parallel.replicate(vol_f, mesh)
        for pos, mask in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress):
            raw = parallel.load_sharded(source, idx[pos], mask, mesh)
            if rotations is None:
                res = f(vol_f, raw)
            else:
                per = (np.asarray(rotations[pos], np.float32), np.asarray(shifts[pos], np.float32))
                res = f(vol_f, raw, *parallel.shard_batch(per, mesh))
            res = [np.asarray(x, np.float64) for x in res]
            if outs is None:
                outs = [np.zeros((n,) + x.shape[1:]) for x in res]
            keep = np.asarray(mask) > 0
            for o, x in zip(outs, res):
                o[pos[keep]] = x[keep]
        return tuple(outs)


def _best(scores, rotations, shifts):
    b = best_poses(scores, rotations, shifts)
    return b.rotations, b.shifts


class Assignment(NamedTuple):
    """Each image's ``K`` most likely candidates, best first: ``rotations`` ``(B, K, 3, 3)``, ``shifts``
    ``(B, K, 2)`` (Å), ``weights`` ``(B, K)`` (posterior weights summing to 1; ``K = 1``: hard assignment)."""

    rotations: jax.Array
    shifts: jax.Array
    weights: jax.Array


def assign_poses(scores, rotations, shifts, top_k: int = 1, n_pixels: int | None = None) -> Assignment:
    """Hard (``top_k=1``: :func:`jaxcryo.poses.best_poses`) or soft assignment from the scores of
    :func:`jaxcryo.poses.score_poses` / :func:`~jaxcryo.poses.score_local` (``rotations``, ``shifts``: the
    candidates, shared or per image).

    Soft: the scores are log-likelihoods for unit noise variance (the objective's), so before the softmax of
    :func:`jaxcryo.poses.soft_weights` each image's scores are divided by its own noise variance estimated
    from its best residual, ``sigma_i^2 = -2 max L_i / n_pixels`` (the mean squared residual per scored pixel
    at the best pose, an upper bound on the noise variance: weights at least as broad as the data's, as
    RELION's residual-based noise estimate). Per image, so the result does not depend on the batch or the
    number of devices. Pure, jittable (``top_k`` and ``n_pixels`` static)."""
    rotations, shifts = jnp.asarray(rotations), jnp.asarray(shifts)
    if top_k == 1:
        b = best_poses(scores, rotations, shifts)
        return Assignment(b.rotations[:, None], b.shifts[:, None], jnp.ones((b.rotations.shape[0], 1), scores.dtype))
    if n_pixels is None:
        raise ValueError("soft assignment (top_k > 1) needs n_pixels, the number of scored pixels")
    best = jnp.max(scores, axis=(1, 2))
    sigma2 = jnp.maximum(-2.0 * best / n_pixels, jnp.finfo(scores.dtype).tiny)  # padding (score 0): no matter
    pw = soft_weights(scores / sigma2[:, None, None], top_k)
    rows = jnp.arange(scores.shape[0])[:, None]
    rot = rotations[pw.rotation_index] if rotations.ndim == 3 else rotations[rows, pw.rotation_index]
    sh = shifts[pw.shift_index] if shifts.ndim == 2 else shifts[rows, pw.shift_index]
    return Assignment(rot, sh, pw.weights)


class SoftPoses:
    """A particle source for soft assignment: each particle of ``source`` repeated as ``K`` rows (row
    ``i * K + k`` is particle ``i`` at its ``k``-th candidate pose), with per-row ``weights`` (``K`` x the
    posterior weight, so each particle's rows average 1 and the objective keeps its per-image scale). The
    images are read from ``source`` (each distinct image once per batch); :func:`jaxcryo.data.load_batch`
    reads the ``weights`` attribute."""

    def __init__(self, source, rotations, shifts, weights):
        n, k = np.shape(weights)
        self.base, self.k = source, k
        self.rows = np.repeat(np.arange(n), k)
        md = source.metadata.subset(self.rows)
        self.metadata = dataclasses.replace(md, rotations=np.asarray(rotations, np.float64).reshape(n * k, 3, 3),
                                            shifts=np.asarray(shifts, np.float64).reshape(n * k, 2),
                                            missing_poses=None)
        self.weights = (k * np.asarray(weights, np.float64)).reshape(n * k).astype(np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def images(self, idx) -> np.ndarray:
        return self.base.images(self.rows[np.asarray(idx)])

    def row_indices(self, idx) -> np.ndarray:
        """The rows of particles ``idx``."""
        return (np.asarray(idx)[:, None] * self.k + np.arange(self.k)).reshape(-1)


def fsc_weighted(vol_f, fsc) -> jax.Array:
    """``vol_f`` (centred Fourier volume) multiplied in each shell ``s`` by ``sqrt(2 F_s / (1 + F_s))``, the
    half-map FSC ``F`` turned into the full map's correlation with the truth (``F`` clipped to [0, 1]; shells
    beyond ``F``'s length get 0)."""
    from ..ndimage._fourier import shell_index

    n = vol_f.shape[-1]
    f = np.clip(np.asarray(fsc, np.float64), 0.0, 1.0)
    w = np.sqrt(2 * f / (1 + f))
    shells = shell_index(n, 3)
    table = np.zeros(shells.max() + 1)
    table[: min(len(w), len(table))] = w[: len(table)]
    return vol_f * jnp.asarray(table[shells], jnp.real(vol_f).dtype)


def _orthonormalise(r: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(r)
    d = np.sign(np.linalg.det(u @ vt))
    u[..., :, -1] *= d[..., None]
    return u @ vt


def _update_volume(source, idx, projector, vol_f, settings: RefineSettings, eta_cache: dict, progress, desc,
                   mesh=None):
    s = settings
    problem = Problem(source, projector, idx, s.lam, min(s.batch_size, len(idx)), s.seed)
    spe = problem.steps_per_epoch
    key = (s.optimizer, len(idx))
    if key not in eta_cache:  # the step size depends on the data's Hessian, not on small pose changes
        eta_cache[key] = initial_step_size(s.optimizer, problem, probes=0 if projector.operator.has_local_stencil
                                           else 1) if s.optimizer == "psgd" else initial_step_size("sgd", problem)
    eta = eta_cache[key]
    if s.optimizer == "psgd":
        diag = "batch" if projector.operator.has_local_stencil else "hutchinson"
        opt = preconditioned_sgd(harmonic_schedule(eta, spe), diagonal=diag, projector=projector, lam=s.lam,
                                 seed=s.seed)
    elif s.optimizer == "sgd":
        opt = sgd(harmonic_schedule(eta, spe))
    else:
        raise InputError(f"{{param}} {s.optimizer!r}: expected psgd or sgd", param="optimizer")
    res = fit(source, opt, projector, epochs=s.epochs_per_iteration, batch_size=problem.batch_size, lam=s.lam,
              indices=idx, init=vol_f, seed=s.seed, progress=progress, desc=desc, divergence_factor=1e8,
              mesh=mesh)
    return jax.device_get(res.volume_f)  # host copy: the half maps are kept (and checkpointed) off the mesh


def refine_iteration(state: RefineState, source, halves, projector: Projector, settings: RefineSettings,
                     eta_cache: dict | None = None, progress: bool = False, devices=None) -> RefineState:
    """One gold-standard iteration (module docstring): poses per half at the current ``kmax``, volume updates,
    half-map FSC, next angular step. Returns the new state (the input is not modified).

    ``devices``: a device count or a :class:`jax.sharding.Mesh` (``None``: all local devices): the pose
    scoring and the volume updates are split over a 1-D mesh of that many devices (:mod:`jaxcryo.parallel`;
    the batch is the global batch, so the result does not depend on the count beyond rounding)."""
    s = settings
    mesh = parallel.resolve_mesh(devices)
    eta_cache = {} if eta_cache is None else eta_cache
    t0 = time.perf_counter()
    n, px = projector.n, projector.pixel_size
    kmax = float(min(n // 2 - 1, np.ceil(n * px / state.resolution) + s.kmax_margin))
    op = make_operator(s.interp, oversample=s.score_oversample) if s.score_oversample > 1 else projector.operator
    scorer = _Scorer(Projector(n=n, pixel_size=px, operator=op), s, mesh)
    rots = None if state.rotations is None else state.rotations.copy()
    shifts = state.shifts.copy()
    global_search = rots is None
    k = int(s.top_k)
    new_r, new_s = np.zeros((len(shifts), 3, 3)), shifts.copy()
    soft_r, soft_s, soft_w = np.zeros((len(shifts), k, 3, 3)), np.zeros((len(shifts), k, 2)), np.zeros((len(shifts), k))
    prev_fsc = state.history[-1].get("half_map_fsc") if state.history else None
    noise_log: list = []
    for h, idx in enumerate(halves):
        src = source if rots is None else _with_poses(source, rots, shifts)
        v = state.half_maps[h]
        if s.fsc_weighting and prev_fsc is not None:  # the first iteration scores against the low-passed reference
            v = fsc_weighted(v, prev_fsc)
        if s.particle_diameter is not None:  # issue 19 hook: solvent-flattened references
            v = masked_fourier(v, solvent_mask(n, px, s.particle_diameter))
        if s.whiten or s.offset_sigma_px is not None:  # issue 19 hook: scores as log-likelihoods
            sig2 = noise_spectrum(src, idx, state.half_maps[h] if rots is not None else jnp.zeros_like(v),
                                  projector, s.batch_size)
            if not s.whiten:  # white: one variance, the mean over the scored shells
                sig2 = np.full_like(sig2, np.mean(sig2[1:int(kmax) + 1]))
            noise_log.append([float(x) for x in sig2])
            v = v * jnp.asarray(shell_filter(1 / np.sqrt(sig2), n, 3))
            scorer.white_2d = jnp.asarray(shell_filter(1 / np.sqrt(sig2), n, 2))
        if global_search:
            r, sh = scorer.global_search(v, src, idx, kmax, progress, f"global search, half {h + 1}")
            r, sh, w = scorer.local_search(v, src, idx, r, sh, s.global_step / 2, s.global_shift_step_px / 2, kmax,
                                           progress, f"local search, half {h + 1}")
        else:
            r, sh, w = scorer.local_search(v, src, idx, rots[idx], shifts[idx], state.step, state.shift_step_px,
                                           kmax, progress, f"local search, half {h + 1}")
        r = _orthonormalise(r)
        new_r[idx], new_s[idx] = r[:, 0], sh[:, 0]  # the best candidate (soft: the first of the top K)
        soft_r[idx], soft_s[idx], soft_w[idx] = r, sh, w
    change = None if rots is None else float(np.mean(geodesic_distance_deg(rots, new_r)))
    shift_change = float(np.mean(np.linalg.norm(new_s - shifts, axis=1))) / px
    t_pose = time.perf_counter() - t0
    if k == 1:
        posed, rows = _with_poses(source, new_r, new_s), list(halves)
    else:  # soft assignment: every particle at its top K candidates, weighted
        posed = SoftPoses(source, soft_r, soft_s, soft_w)
        rows = [posed.row_indices(idx) for idx in halves]
    maps = [_update_volume(posed, rows[h], projector, state.half_maps[h], s, eta_cache, progress,
                           f"{s.optimizer} update, half {h + 1}", mesh) for h in range(len(halves))]
    centre_offset = None
    if s.recentre:  # issue 19 hook: keep the density centred, the origins moved to match
        maps, new_s, c = recentre(maps, new_r, new_s, px, min_offset_px=0.05 * n)  # only a drift, not the map's own
        centre_offset = [float(x) for x in c]
    f = fourier_fsc(maps[0], maps[1])
    shells = np.arange(len(f))
    below = np.flatnonzero((f < 0.143) & (shells > 0))
    k143 = int(below[0]) if below.size else len(f)
    res = float(n * px / max(k143, 1))
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
           "seconds": time.perf_counter() - t0, "pose_seconds": t_pose, "optimizer": s.optimizer,
           "devices": parallel.mesh_size(mesh), "top_k": k,
           "mean_best_weight": float(np.mean(soft_w[:, 0])), "centre_offset_px": centre_offset,
           "noise_spectrum": noise_log or None,
           "half_map_fsc": [float(x) for x in f]}
    hist = list(state.history) + [rec]
    return RefineState(list(maps), new_r, new_s, res, step, shift_step, state.iteration + 1, stalls, hist)


def done(state: RefineState, settings: RefineSettings) -> bool:
    """Stop at ``iterations``, or after ``patience`` iterations at the finest step without improvement."""
    return state.iteration >= settings.iterations or (state.step / 2 < settings.min_step
                                                        and state.stalls >= settings.patience)


def initial_state(source, reference_f, projector: Projector, settings: RefineSettings,
                  local_only: bool) -> RefineState:
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


def refine(source, reference: np.ndarray, settings: RefineSettings = RefineSettings(), local_only: bool = False,
           reference_pixel_size: float | None = None, progress: bool = True, state: RefineState | None = None,
           on_iteration: Callable[[RefineState], None] | None = None, warn: Callable[[str], None] | None = None,
           truth: np.ndarray | None = None, devices=None) -> RefineResult:
    """Refine poses and maps of ``source`` from ``reference`` (module docstring).

    Args:
        source: particles (poses used only with ``local_only``).
        reference: real-space map (resampled to the particles' box if its extent matches).
        settings: :class:`RefineSettings`.
        local_only: start from the particles' own poses (local searches only).
        state: a :class:`RefineState` to resume from.
        on_iteration: called with the state after each iteration (checkpointing).
        truth: optional ground-truth map (simulations): each history record gains its FSC-0.5 shell.
        devices: local devices to split the pose scoring and the volume updates over (a count or a mesh;
            default all JAX sees; see :func:`refine_iteration`); the closing known-pose reconstruction gets the
            same (:func:`jaxcryo.reconstruct`).
    """
    from ..solvers._reconstruct import reconstruct

    md = source.metadata
    if len(md) < 2:
        raise InputError(f"{md.source or 'particles'}: {len(md)} particle(s); refinement needs at least 2")
    _check_poses(md)
    n, px = md.box, float(md.pixel_size)
    projector = Projector(n=n, pixel_size=px, operator=settings.interp)
    ref = prepare_reference(reference, reference_pixel_size, n, px, warn)
    halves = split_halves(md, settings.seed)
    mesh = parallel.resolve_mesh(devices)  # validates the count before any work
    ref_scale = None
    if state is None and settings.scale_reference:  # issue 19 hook: the reference on the images' scale
        ref_scale = reference_scale(source, lowpass(volume_to_fourier(jnp.asarray(ref)), settings.init_resolution, px),
                                    projector, settings.init_resolution, seed=settings.seed)
        ref = ref * np.float32(ref_scale)
        if warn is not None and not 0.5 < ref_scale < 2.0:
            warn(f"reference: scaled by {ref_scale:.3g} to the particles' intensity (its projections' power "
                 f"against the images')")
    if state is None:
        state = initial_state(source, volume_to_fourier(jnp.asarray(ref)), projector, settings, local_only)
    truth_f = None if truth is None else volume_to_fourier(jnp.asarray(np.asarray(truth, np.float32)))
    eta_cache: dict = {}
    bar = tqdm(total=settings.iterations, initial=state.iteration, desc="refine", unit="it", disable=not progress)
    while not done(state, settings):
        state = refine_iteration(state, source, halves, projector, settings, eta_cache, progress, mesh or 1)
        if ref_scale is not None and state.iteration == 1:
            state.history[-1]["reference_scale"] = ref_scale
        if truth_f is not None:
            avg = 0.5 * (state.half_maps[0] + state.half_maps[1])
            f = fourier_fsc(avg, truth_f)
            below = np.flatnonzero(f[1:] < 0.5)
            state.history[-1]["fsc05_truth_shell"] = int(below[0] + 1) if below.size else len(f)
        bar.update(1)
        bar.set_postfix(res=f"{state.resolution:.1f}A", step=f"{state.step:g}")
        if on_iteration is not None:
            on_iteration(state)
    bar.close()
    sub = np.zeros(len(md), np.int64)
    sub[halves[0]], sub[halves[1]] = 1, 2
    out_md = dataclasses.replace(md, rotations=state.rotations, shifts=state.shifts, random_subset=sub,
                                 missing_poses=None)
    posed = _with_poses(source, state.rotations, state.shifts)
    posed.metadata = out_md
    final = reconstruct(posed, seed=settings.seed, progress=progress, reference=truth,  # the known-pose default
                        devices=mesh or 1)
    return RefineResult(out_md, state, state.history, final)


def half_map_volumes(state: RefineState):
    """The two half maps in real space (float32)."""
    return [np.asarray(fourier_to_volume(v), np.float32) for v in state.half_maps]
