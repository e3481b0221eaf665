"""Ab initio reconstruction: a first low-resolution map and poses from particles with no poses (the job of
cryoSPARC's *ab initio* and RELION's *initial model*), by stochastic gradient descent with a global pose
search per minibatch.

The algorithm (:func:`abinitio`):

1. **start**: the backprojection of the first minibatch at random poses (seeded uniform rotations, zero
   shifts): one preconditioned step of step size 1 from zero (``D_B^-1`` times the backprojection), low-pass
   filtered to ``init_resolution`` and multiplied by a soft spherical mask of the particle's diameter. A
   featureless blob whose few random low-frequency lumps break the symmetry that a perfectly round start
   would leave (every pose of a sphere scores the same, and the argmax would give every image one pose);
2. **minibatch steps** ``t = 1..steps`` (minibatches drawn epoch by epoch from a seeded permutation):

   * the frequency limit ``kmax_t`` (Fourier shells) marches linearly from ``box * pixel_size /
     init_resolution`` to ``box * pixel_size / final_resolution`` over the first ``ramp_fraction`` of the
     steps and then stays there (cryoSPARC's schedule; whole shells, so the scoring functions compile once
     per shell);
   * **poses**: each image of the minibatch is scored (:func:`jaxcryo.poses.score_poses`, the Gaussian
     log-likelihood at ``|k| <= kmax_t``) against the current map over :func:`jaxcryo.rotations.so3_grid`
     (``angular_step``) x :func:`jaxcryo.rotations.shift_grid` (``+-max_shift_px`` in steps of
     ``shift_step_px``), then ``local_levels`` local searches (:func:`jaxcryo.poses.score_local`) around
     the best candidate, each halving the angular and shift steps (radius: two steps): one
     :class:`~jaxcryo.poses.Cascade` run by the pose-search engine (:class:`~jaxcryo.poses.PoseSearch`: images
     in chunks under ``score_memory``, split over ``devices``). Soft assignment by default (``top_k`` = 8: the
     global search alone, each image taken at its 8 best candidates weighted by their posterior, which finds the
     structure at low SNR where hard assignment to the best candidate locks in a wrong map for longer);
     ``top_k = 1``: hard assignment after the local searches. Scoring reads the map with ``Trilinear(oversample=score_oversample)`` (plain trilinear
     slices bias the best pose, see :class:`jaxcryo.poses.RefineSettings`);
   * **volume**: one preconditioned SGD step on that minibatch at those poses,
     ``v <- M(v - eta_t(k) D_B^-1 grad F_B(v))``: ``F_B`` the known-pose objective of :mod:`jaxcryo.loss`
     (Tikhonov ``lam``), ``D_B`` its exact minibatch Hessian diagonal for the plain trilinear operator
     (the strategy :class:`jaxcryo.solvers.PSGD` with ``batch_diagonal``, no averaging, the per-shell
     schedule :func:`shell_rates` and the support ``M``), ``eta_t(k)`` a per-shell step
     size: zero beyond ``kmax_t`` (raised-cosine edge of two shells, so the map never fits noise beyond the
     frequency limit), ``eta_0 / (1 + age / decay_steps)`` floored at ``rate_floor * eta_0`` inside it,
     ``age`` the steps since the shell opened (a running average of the minibatch estimates that keeps
     forgetting the early, wrongly posed ones), ``eta_0 = 1 / lambda_max(D_B^-1 H_B)`` measured on the first
     minibatch (:func:`jaxcryo.solvers.batch_step_size`; ``learning_rate`` overrides it); ``M``: the real-space soft spherical mask (support
     constraint).
3. **final poses**: a global search (same grids, at the final ``kmax``) of every particle against the final
   map, so that each particle has a pose in the map's frame. Refine the map globally from it (``jaxcryo refine
   PARTICLES --reference DIR/map.mrc``): ``--local-only`` from these poses, all assigned against one map, gives
   half maps that share its features (a wrong map at SNR 0.02 then reported 12.6 Å with no warning).

Measured (``tests/test_abinitio.py``; box 32, 3 Å/px, 600 simulated particles, SNR 4, 24 steps of 200, a
shared 2-core CPU, about 50 s): FSC 0.5 to the aligned truth at 10.9 Å (the map is limited to 12 Å; the
known-pose reconstruction of the same images reaches 9.1 Å), pose error median 3.3 deg; after three local
iterations of ``jaxcryo refine``: 9.5 Å, 2.6 deg. At SNR 0.5: 11.1 Å (known poses: 10.3 Å). At SNR 0.1
(box 32, 600 images) the hard assignment did not converge in 60 steps (pose error median 72 deg).

Handedness: projections determine a map only up to its mirror image (a map mirrored through a plane, seen
at mirrored poses, gives the same images; :data:`jaxcryo.rotations.MIRROR`), so an ab initio map has the
correct hand or its mirror image with equal probability. Nothing here can tell them apart; check the hand
against known structure (e.g. the handedness of alpha helices at high resolution) and flip the map if
needed. :data:`HANDEDNESS` says so in the command's outputs.

Ground truth (simulations): :func:`align_map_to` puts a map into the frame of a reference, given the global
rotation and hand found by :func:`jaxcryo.rotations.align_rotations` from the poses (rotation in real space
with order-1 interpolation, then the translation by FFT cross-correlation); :func:`truth_metrics` reports
the FSC to the truth after that alignment and the pose errors.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, Int
from tqdm.auto import tqdm

from .. import parallel
from ..data._batch import RawBatch, epoch_batches, load_batch
from ..data._checks import usable_particles
from ..errors import DivergenceError, InputError
from ..forward._operators import make_operator
from ..forward._particles import ParticleMetadata
from ..forward._projection import Projector, fourier_to_volume
from ..ndimage._masks import frequency_edge, soft_sphere_mask
from ..rotations._grids import geodesic_distance_deg, shift_grid, so3_grid
from ..rotations._rotations import random_rotations
from ..solvers._strategies import PSGD, Plan, Problem, batch_step_size
from ._align import truth_metrics
from ._assign import soft_batch
from ._checkpoints import checkpoint_stem, load_run, save_run
from ._scoring import score_pixels
from ._validate import fail, integers, is_number, non_negative, positive
from ._search import AbstractSearchMethod, Cascade, GlobalSearch, LocalSearch, PoseSearch

#: The ``kind`` of an ab initio checkpoint.
KIND = "abinitio"

#: The handedness statement written with every ab initio result.
HANDEDNESS = ("undetermined: an ab initio map from projections may be the mirror image of the true structure "
              "(the mirrored map at mirrored poses explains the data equally well); check the hand and flip "
              "the map if needed")


@dataclass(frozen=True)
class AbinitioSettings:
    """The choices of an ab initio run (angles in degrees, lengths in Å unless named ``_px``).

    Attributes:
        steps: minibatch steps (each: pose search + one volume update).
        batch_size: images per minibatch.
        init_resolution: the frequency limit of the first steps (and the start map's low-pass).
        final_resolution: the frequency limit reached after ``ramp_fraction`` of the steps (shells are capped
            at ``box // 2 - 1``).
        ramp_fraction: fraction of the steps over which the limit marches up.
        angular_step: step of the global rotation grid (:func:`jaxcryo.rotations.so3_grid`).
        local_levels: local searches after the global one, each halving the angular and shift steps
            (hard assignment only; with ``top_k > 1`` the steps' searches are global only).
        top_k: ``1``: hard assignment (each image at its best pose). ``K > 1`` (default 8): soft assignment,
            each image in the volume step at its ``K`` best global-search poses weighted by their posterior
            (:func:`jaxcryo.poses.assign_poses`); the final poses are hard. ASPIRE set at SNR 0.05: hard
            assignment found the structure after step ~115 of 150, ``K = 8`` by step ~53 (benchmarks/README).
        max_shift_px: the global shift search covers ``+-max_shift_px`` pixels on each axis.
        shift_step_px: the global shift grid's step.
        learning_rate: step size ``eta_0`` of a shell when it opens; ``None``: ``1 / lambda_max(D_B^-1 H_B)``
            measured by power iteration on the first minibatch at its random poses (``D_B`` its own diagonal;
            larger steps were measured to oscillate at low frequencies, where trilinear slices couple
            neighbouring voxels: box 32, known poses, ``1 / lambda_max`` = 0.32; constant steps of 0.75
            diverged, 0.5 oscillated, 0.25 converged).
        decay_steps: a shell's step size is ``eta_0 / (1 + age / decay_steps)``, ``age`` the steps since it
            opened,
        rate_floor: floored at ``rate_floor * eta_0`` (a running average over about ``1 / (rate_floor eta_0)``
            minibatches that keeps forgetting the early, wrongly posed ones).
        lam: Tikhonov weight of the volume updates.
        particle_diameter: diameter (Å) of the soft spherical support mask; ``None``: 0.8 box.
        score_oversample: oversampling of the scoring operator (trilinear with the gridding correction).
        score_memory: the most score entries (images x rotations x shifts) held at once by a global search
            (minibatches are scored in chunks below it).
        seed: the start map's random poses and the minibatch order.
        skip_bad: leave out the particles whose image has NaN or inf (reported through ``warn``) instead of
            failing (:func:`jaxcryo.data.usable_particles`).
    """

    steps: int = 150
    batch_size: int = 200
    init_resolution: float = 35.0
    final_resolution: float = 12.0
    ramp_fraction: float = 0.7
    angular_step: float = 15.0
    local_levels: int = 2
    top_k: int = 8
    max_shift_px: float = 4.0
    shift_step_px: float = 2.0
    learning_rate: float | None = None
    decay_steps: float = 20.0
    rate_floor: float = 0.5
    lam: float = 1e-3
    particle_diameter: float | None = None
    score_oversample: int = 2
    score_memory: int = 1 << 24
    seed: int = 0
    skip_bad: bool = False

    def __post_init__(self):
        check_settings(self)

    @classmethod
    def for_epochs(cls, epochs: float, n_particles: int, **fields) -> "AbinitioSettings":
        """Settings whose ``steps`` make ``epochs`` passes over ``n_particles`` particles (at least one step;
        ``fields``: the other settings). Raises :class:`InputError` (parameter ``epochs``) for a bad count."""
        if isinstance(epochs, bool) or not (isinstance(epochs, (int, float)) and np.isfinite(epochs) and epochs > 0):
            raise InputError(f"{{param}} {epochs}: expected a positive number", param="epochs")
        base = cls(**fields)
        steps = max(1, int(np.ceil(epochs * n_particles / min(base.batch_size, max(n_particles, 1)))))
        return dataclasses.replace(base, steps=steps)


class AbinitioResult(NamedTuple):
    """What :func:`abinitio` returns.

    Attributes:
        volume: the final map, real space ``(n, n, n)`` float32 (low-pass filtered at the final limit; its
            hand is undetermined, :data:`HANDEDNESS`).
        metadata: the particles with the poses of the final global search (RELION conventions); with
            ``skip_bad``, only the particles used.
        history: one record per minibatch step: ``step``, ``kmax`` (the frequency limit, shells),
            ``resolution_limit`` (Å), ``learning_rate`` (the step size of shell 1), ``seconds`` (this step),
            ``elapsed`` (since the start), ``mean_best_score`` (the minibatch's mean best log-likelihood over
            ``scored_pixels`` pixels per image), ``mean_pose_change_deg`` (mean angle between the new pose of
            the minibatch's particles seen before and their previous one; ``None`` if none), ``loss`` (the
            minibatch objective before the step); with a truth also ``fsc05_truth_shell``,
            ``pose_error_median_deg`` and ``mirrored`` (:func:`truth_metrics` on the minibatch).
        scores: ``(n_particles,)`` the best score of each particle in the final search.
        seconds: wall time of the run.
        final_kmax: the final frequency limit (shells).
        eta0: the initial step size (``learning_rate`` or the measured ``1 / lambda_max``).
        devices: the devices the run was split over.
        skipped: particles left out for non-finite images (``skip_bad``).
        indices: the particles used (into the source) when some were left out, else ``None``.
    """

    volume: np.ndarray
    metadata: ParticleMetadata
    history: list
    scores: np.ndarray
    seconds: float
    final_kmax: int
    eta0: float
    devices: int = 1
    skipped: int = 0
    indices: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------
# The pieces of a run
# --------------------------------------------------------------------------------------------------
def kmax_schedule(settings: AbinitioSettings, n: int, pixel_size: float) -> Int[np.ndarray, " steps"]:
    """The frequency limit (whole Fourier shells) of each step ``1..steps``: linear from the initial to the
    final limit over ``ramp_fraction`` of the steps, then constant; within ``[2, n // 2 - 1]``."""
    s = settings
    top = max(2.0, n // 2 - 1.0)
    k0 = float(np.clip(n * pixel_size / s.init_resolution, 2.0, top))
    k1 = float(np.clip(n * pixel_size / s.final_resolution, k0, top))
    ramp = max(1, int(round(s.ramp_fraction * s.steps)))
    t = np.minimum(np.arange(s.steps) / max(ramp - 1, 1), 1.0)
    return np.round(k0 + (k1 - k0) * t).astype(int)


def check_settings(s: AbinitioSettings) -> None:
    """Raise :class:`InputError` naming the first impossible setting."""
    integers(s, ("steps", "batch_size", "score_oversample", "score_memory", "top_k"), 1)
    integers(s, ("local_levels", "seed"), 0)
    positive(s, ("init_resolution", "final_resolution", "angular_step", "shift_step_px", "decay_steps"))
    non_negative(s, ("max_shift_px", "lam"))
    if s.final_resolution > s.init_resolution:
        fail(s, "final_resolution", f"expected at most the initial resolution ({s.init_resolution:g} A)")
    if not 0 < s.ramp_fraction <= 1:
        fail(s, "ramp_fraction", "expected a fraction in (0, 1]")
    if s.learning_rate is not None and not (is_number(s.learning_rate) and s.learning_rate > 0):
        fail(s, "learning_rate", "expected a positive number (or None: measured)")
    if not 0 <= s.rate_floor <= 1:
        fail(s, "rate_floor", "expected a fraction in [0, 1]")
    if s.angular_step > 90:
        fail(s, "angular_step", "expected at most 90 degrees")
    if s.particle_diameter is not None and not (is_number(s.particle_diameter) and s.particle_diameter > 0):
        fail(s, "particle_diameter", "expected a positive diameter in A")
    if not isinstance(s.skip_bad, (bool, np.bool_)):
        fail(s, "skip_bad", "expected True or False")


def _support_mask(settings: AbinitioSettings, n: int, pixel_size: float) -> np.ndarray:
    d = 0.8 * n * pixel_size if settings.particle_diameter is None else float(settings.particle_diameter)
    radius = min(0.5 * d / pixel_size, 0.5 * n - 1)
    width = max(2.0, 0.1 * n)
    return soft_sphere_mask(n, radius=max(radius - width / 2, 1.0), width=width)


def shell_rates(settings: AbinitioSettings, n: int, pixel_size: float,
                eta0: float) -> Float[np.ndarray, "steps_plus_one shells"]:
    """The per-shell step sizes ``(steps + 1, n // 2 + 2)`` of a run (module docstring): row 0 is the start
    (step size 1 inside the first limit: the preconditioned backprojection from zero), row ``t + 1`` minibatch
    step ``t``: ``eta0 / (1 + age / decay_steps)`` floored at ``rate_floor * eta0``, ``age`` the steps since
    the shell opened, times the limit's raised-cosine edge (two shells wide)."""
    s = settings
    kmaxes = kmax_schedule(s, n, pixel_size)
    shells = np.arange(n // 2 + 2, dtype=np.float64)
    opened = np.full(shells.size, -1, np.int64)  # the step at which each shell's step size became non-zero
    rows = [frequency_edge(shells, float(kmaxes[0]), 2.0)]
    opened[rows[0] > 0] = 0
    for t, k in enumerate(kmaxes):
        edge = frequency_edge(shells, float(k), 2.0)
        opened[(edge > 0) & (opened < 0)] = t
        decay = np.maximum(1.0 / (1.0 + np.maximum(t - opened, 0) / s.decay_steps), s.rate_floor)
        rows.append(eta0 * decay * edge)
    return np.asarray(rows, np.float32)


def _batch_order(indices: Int[np.ndarray, " k"], batch: int, steps: int, seed: int, multiple: int) -> list:
    """The minibatch of each step ``0..steps-1`` over the particles ``indices`` (seeded permutations, epoch
    after epoch)."""
    rng = np.random.default_rng([seed, 31])
    order: list = []
    while len(order) < steps:
        order.extend(epoch_batches(np.asarray(indices), batch, rng, multiple))
    return order[:steps]


def _search_method(s: AbinitioSettings, pixel_size: float, top_k: int = 1) -> Cascade:
    """A global search then ``local_levels`` local searches, each halving the angular and shift steps
    (radius: two steps; shifts: +- two steps); with ``top_k > 1`` the global search alone, keeping the
    ``top_k`` best candidates and their posterior weights (soft assignment)."""
    px = pixel_size
    stages: list[AbstractSearchMethod] = [GlobalSearch(jnp.asarray(so3_grid(s.angular_step), jnp.float32),
                                                       jnp.asarray(shift_grid(s.max_shift_px * px,
                                                                              s.shift_step_px * px), jnp.float32),
                                                       int(top_k))]
    if top_k > 1:
        return Cascade(tuple(stages))
    for lv in range(1, s.local_levels + 1):
        step, sh = s.angular_step / 2 ** lv, s.shift_step_px * px / 2 ** lv
        stages.append(LocalSearch(step, 2 * step, jnp.asarray(shift_grid(2 * sh, sh), jnp.float32)))
    return Cascade(tuple(stages))


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def abinitio(source, settings: AbinitioSettings = AbinitioSettings(), progress: bool = True,
             truth: Float[ArrayLike, "n n n"] | None = None, true_rotations: Float[ArrayLike, "m 3 3"] | None = None,
             devices=None, checkpoint: "str | Path | None" = None,
             resume: bool = False, warn: Callable[[str], None] | None = None) -> AbinitioResult:
    """An ab initio map and poses from particles without poses (module docstring).

    Args:
        source: particles (:class:`~jaxcryo.data.ParticleDataset`, :class:`~jaxcryo.data.ArrayDataset`);
            their poses, if any, are ignored.
        settings: :class:`AbinitioSettings`.
        progress: tqdm progress bars.
        truth: optional ground-truth map (simulations, same box); with ``true_rotations`` (``(n, 3, 3)``, the
            true poses of the particles) each history record gains the FSC-0.5 shell of the map to the truth
            after alignment (:func:`truth_metrics` on the minibatch's poses) and the minibatch's pose error.
        devices: local devices to split the pose searches and the volume steps over (a count or a mesh;
            ``None``: all JAX sees); the minibatches are the same on any count.
        checkpoint: checkpoint stem (``DIR/checkpoint``: ``checkpoint.npz`` + ``checkpoint.json``), written
            atomically after every step; ``resume`` continues from it (to the same map as a run without
            interruption).
        warn: told how many particles ``skip_bad`` left out.

    The particles are checked first (:func:`jaxcryo.data.usable_particles`: stacks, finite images).

    Returns:
        :class:`AbinitioResult`. The map's hand is undetermined (:data:`HANDEDNESS`).

    Raises:
        InputError: no particles, non-finite images, bad settings, a checkpoint of other settings.
    """
    t_start = time.perf_counter()
    s = settings
    check_settings(s)
    md = source.metadata
    n_part = len(md)
    if n_part == 0:
        raise InputError(f"{md.source or 'particles'}: no particles")
    n, px = int(md.box), float(md.pixel_size)
    selection = usable_particles(source, needs_poses=False, skip_bad=s.skip_bad, warn=warn)
    use = selection.indices
    if truth is not None and np.asarray(truth).shape != (n, n, n):
        raise InputError(f"{{param}} has shape {np.asarray(truth).shape}, expected ({n}, {n}, {n}) (the "
                         "particles' box)", param="truth")
    mesh = parallel.resolve_mesh(devices)
    n_dev = parallel.mesh_size(mesh)
    mesh = mesh if n_dev > 1 else None
    stem = checkpoint_stem(checkpoint)
    if resume and stem is None:
        raise InputError("{param} needs a checkpoint path", param="resume")
    projector = Projector(n=n, pixel_size=px, operator=make_operator("trilinear"))
    batch = int(min(s.batch_size, len(use)))
    scoring_op = make_operator("trilinear", oversample=s.score_oversample) if s.score_oversample > 1 else projector.operator
    engine = PoseSearch(Projector(n=n, pixel_size=px, operator=scoring_op), batch, s.score_memory, mesh)
    method = _search_method(s, px)
    step_method = method if s.top_k == 1 else _search_method(s, px, s.top_k)
    kmaxes = kmax_schedule(s, n, px)
    order = _batch_order(use, batch, s.steps, s.seed, n_dev)
    problem = Problem(source, projector, use, s.lam, batch, s.seed)

    def read(t: int) -> RawBatch:
        idx, mask = order[t]
        return load_batch(source, idx, mask)

    def strategy(eta0: float) -> PSGD:  # the update: PSGD by each minibatch's own diagonal, per-shell steps
        return PSGD(batch_diagonal=True, beta=0.0, shell_rates=shell_rates(s, n, px, eta0),
                    support=_support_mask(s, n, px))

    settings_json = dataclasses.asdict(s)
    vol = jnp.zeros((n, n, n), jnp.complex64)
    cur_r = np.full((n_part, 3, 3), np.nan)
    if resume:
        assert stem is not None
        _, meta = load_run(stem, KIND, settings_json, {})  # eta0 first: it shapes the optimiser's schedule
        eta0 = float(meta.get("eta0", 1.0))
        opt = strategy(eta0).transformation(problem, Plan(1.0))
        trees, meta = load_run(stem, KIND, settings_json, {"volume_f": vol, "opt_state": opt.init(vol),
                                                           "rotations": cur_r})
        vol, opt_state = parallel.replicate((trees["volume_f"], trees["opt_state"]), mesh)
        cur_r = np.array(trees["rotations"])
        first, history = int(meta["step"]), list(meta["history"])
        step_fn = strategy(eta0).make_step(problem, Plan(1.0), mesh=mesh)
        raw = read(first) if first < s.steps else None
    else:
        # 1. the start: one full step from zero at random poses (step size 1: the preconditioned backprojection)
        raw = read(0)
        rand = np.tile(np.eye(3), (len(raw.mask), 1, 1))
        rand[:batch] = np.asarray(random_rotations(jax.random.PRNGKey(s.seed), batch, jnp.float32), np.float64)
        start = raw._replace(rotations=rand.astype(np.float32), shifts=np.zeros((len(raw.mask), 2), np.float32))
        eta0 = float(s.learning_rate) if s.learning_rate is not None else batch_step_size(projector, s.lam, start)
        opt = strategy(eta0).transformation(problem, Plan(1.0))
        step_fn = strategy(eta0).make_step(problem, Plan(1.0), mesh=mesh)
        vol, opt_state = parallel.replicate((vol, opt.init(vol)), mesh)
        vol, opt_state, _ = step_fn(vol, opt_state, parallel.shard_batch(start, mesh))
        first, history = 0, []
    rates = shell_rates(s, n, px, eta0)
    n_pixels = int(score_pixels(engine.projector, float(kmaxes[-1])).size)
    bar = tqdm(total=s.steps, initial=first, desc="ab initio", unit="step", disable=not progress)
    for t in range(first, s.steps):
        t0 = time.perf_counter()
        k = int(kmaxes[t])
        if raw is None or t > first:
            raw = read(t)
        idx, mask = order[t]
        res = engine(step_method, vol, k, raw)
        r, sh, score = res.rotations[:, 0], res.shifts[:, 0], res.scores[:, 0]  # the best candidate
        real = np.asarray(mask) > 0
        ids = np.asarray(idx)[real]
        seen = np.isfinite(cur_r[ids, 0, 0])
        change = (float(np.mean(geodesic_distance_deg(cur_r[ids][seen], r[real][seen]))) if seen.any() else None)
        cur_r[ids] = r[real]
        if s.top_k == 1:
            posed = raw._replace(rotations=np.asarray(r, np.float32), shifts=np.asarray(sh, np.float32))
        else:
            posed = soft_batch(raw, res.rotations, res.shifts, res.weights)
        vol, opt_state, loss = step_fn(vol, opt_state, parallel.shard_batch(posed, mesh))
        loss = float(loss)
        if not np.isfinite(loss):
            raise DivergenceError("the volume update diverged (non-finite loss); lower {param}", param="learning_rate")
        n_pixels = int(score_pixels(engine.projector, k).size)
        rec = {"step": t + 1, "kmax": k, "resolution_limit": n * px / k, "learning_rate": float(rates[t + 1][1]),
               "seconds": time.perf_counter() - t0, "elapsed": time.perf_counter() - t_start,
               "mean_best_score": float(np.mean(score[real])), "scored_pixels": n_pixels,
               "mean_pose_change_deg": change, "loss": loss}
        if truth is not None and true_rotations is not None:
            m = truth_metrics(np.asarray(fourier_to_volume(vol)), r[real], truth, np.asarray(true_rotations)[ids], px)
            rec.update(fsc05_truth_shell=m["fsc05_shell"], pose_error_median_deg=m["pose_error_median_deg"],
                       mirrored=m["mirrored"])
        history.append(rec)
        if stem is not None:
            save_run(stem, KIND, settings_json, {"volume_f": vol, "opt_state": opt_state, "rotations": cur_r},
                     {"step": t + 1, "eta0": eta0, "history": history})
        bar.update(1)
        bar.set_postfix(res=f"{n * px / k:.1f}A", score=f"{rec['mean_best_score']:.3g}")
    bar.close()

    # 3. final poses: every particle against the final map at the final limit
    k = int(kmaxes[-1])
    final = engine(method, vol, k, source, None if not selection.skipped else use, progress=progress,
                   desc="final poses")
    used_md = md if not selection.skipped else md.subset(use)
    out_md = dataclasses.replace(used_md, rotations=final.rotations[:, 0], shifts=final.shifts[:, 0],
                                 missing_poses=None)
    volume = np.asarray(fourier_to_volume(vol), np.float32)
    return AbinitioResult(volume, out_md, history, final.scores[:, 0], time.perf_counter() - t_start, k, eta0, n_dev,
                          selection.skipped, use if selection.skipped else None)
