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
     the best candidate, each halving the angular and shift steps (radius: two steps). Hard assignment to the
     best candidate. Scoring reads the map with ``Trilinear(oversample=score_oversample)`` (plain trilinear
     slices bias the best pose, see :class:`jaxcryo.poses.RefineSettings`);
   * **volume**: one preconditioned SGD step on that minibatch at those poses,
     ``v <- M(v - eta_t(k) D_B^-1 grad F_B(v))``: ``F_B`` the known-pose objective of :mod:`jaxcryo.loss`
     (Tikhonov ``lam``), ``D_B`` its exact minibatch Hessian diagonal for the plain trilinear operator
     (:func:`jaxcryo.solvers.preconditioned_sgd` with ``diagonal="batch"``), ``eta_t(k)`` a per-shell step
     size: zero beyond ``kmax_t`` (raised-cosine edge of two shells, so the map never fits noise beyond the
     frequency limit), ``eta_0 / (1 + age / decay_steps)`` floored at ``rate_floor * eta_0`` inside it,
     ``age`` the steps since the shell opened (a running average of the minibatch estimates that keeps
     forgetting the early, wrongly posed ones), ``eta_0 = 1 / lambda_max(D_B^-1 H_B)`` measured on the first
     minibatch (``learning_rate`` overrides it); ``M``: the real-space soft spherical mask (support
     constraint).
3. **final poses**: a global search (same grids, at the final ``kmax``) of every particle against the final
   map, so that each particle has a pose in the map's frame: ``jaxcryo refine --local-only`` can take the
   particles and the map from there.

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ..data._batch import RawBatch, epoch_batches, load_batch, to_batch
from ..errors import DivergenceError, InputError
from ..ndimage._masks import frequency_edge
from ..ndimage._fourier import shell_index
from ..rotations._grids import MIRROR, align_rotations, geodesic_distance_deg, local_grid, shift_grid, so3_grid
from ..leastsq._loss import batch_filters, objective, value_and_grad
from ..ndimage._metrics import first_shell_below, fsc as fsc_fn, soft_sphere_mask
from ..forward._operators import make_operator
from ..leastsq._linalg import preconditioned_max_eigenvalue
from ..solvers._optim import minibatch_diagonal, preconditioned_sgd
from ..forward._particles import ParticleMetadata
from ..forward._projection import Projector, fourier_to_volume, volume_to_fourier
from ..rotations._rotations import random_rotations
from ._scoring import best_poses, score_local, score_poses

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
        local_levels: local searches after the global one, each halving the angular and shift steps.
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
    """

    steps: int = 150
    batch_size: int = 200
    init_resolution: float = 35.0
    final_resolution: float = 12.0
    ramp_fraction: float = 0.7
    angular_step: float = 15.0
    local_levels: int = 2
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


class AbinitioResult(NamedTuple):
    """What :func:`abinitio` returns.

    Attributes:
        volume: the final map, real space ``(n, n, n)`` float32 (low-pass filtered at the final limit; its
            hand is undetermined, :data:`HANDEDNESS`).
        metadata: the particles with the poses of the final global search (RELION conventions).
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
    """

    volume: np.ndarray
    metadata: ParticleMetadata
    history: list
    scores: np.ndarray
    seconds: float
    final_kmax: int
    eta0: float


# --------------------------------------------------------------------------------------------------
# Map alignment (simulations)
# --------------------------------------------------------------------------------------------------
class MapAlignment(NamedTuple):
    """A map put into a reference's frame (:func:`align_map_to`).

    Attributes:
        volume: the aligned map ``(n, n, n)`` float32.
        shift_px: ``(3,)`` the translation applied after the rotation, ``(x, y, z)`` voxels.
        correlation: the normalised cross-correlation with the reference at that translation.
    """

    volume: np.ndarray
    shift_px: np.ndarray
    correlation: float


def rotate_map(volume, matrix) -> np.ndarray:
    """``out(x) = volume(x @ matrix)`` for real-space maps ``[z, y, x]`` and row vectors ``x = (x, y, z)``
    about the centre voxel ``n // 2`` (order-1 interpolation, zero outside). A map ``V'(x) = V(x R)`` has the
    Fourier transform ``V'^(k) = V^(k R)`` for orthogonal ``R``, so its images at pose ``A`` are ``V``'s at
    ``A R``."""
    vol = jnp.asarray(volume, jnp.float32)
    n = vol.shape[0]
    c = n // 2
    i = jnp.arange(n, dtype=jnp.float32) - c
    z, y, x = jnp.meshgrid(i, i, i, indexing="ij")
    pts = jnp.stack([x.ravel(), y.ravel(), z.ravel()], axis=-1) @ jnp.asarray(matrix, jnp.float32)
    out = jax.scipy.ndimage.map_coordinates(vol, [pts[:, 2] + c, pts[:, 1] + c, pts[:, 0] + c], order=1,
                                            mode="constant", cval=0.0)
    return np.asarray(out.reshape(vol.shape), np.float32)


def _parabolic(cm, c0, cp) -> float:
    den = cm - 2 * c0 + cp
    return float(np.clip(0.5 * (cm - cp) / den, -0.5, 0.5)) if den < 0 else 0.0


def translate_to(volume, reference) -> MapAlignment:
    """The translation of ``volume`` that best matches ``reference`` (peak of the FFT cross-correlation,
    refined to a fraction of a voxel by a parabola per axis) and the volume so translated (Fourier phase
    shift, periodic)."""
    a = np.asarray(volume, np.float64)
    r = np.asarray(reference, np.float64)
    n = a.shape[0]
    fa, fr = np.fft.fftn(a), np.fft.fftn(r)
    cc = np.real(np.fft.ifftn(np.conj(fa) * fr))  # cc[t] = sum_x a(x) r(x + t)
    peak = np.array(np.unravel_index(int(np.argmax(cc)), cc.shape))
    sub = np.zeros(3)
    for ax in range(3):
        m, p = peak.copy(), peak.copy()
        m[ax], p[ax] = (peak[ax] - 1) % n, (peak[ax] + 1) % n
        sub[ax] = _parabolic(cc[tuple(m)], cc[tuple(peak)], cc[tuple(p)])
    t_zyx = (peak + n // 2) % n - n // 2 + sub  # wrapped to [-n/2, n/2)
    k = np.fft.fftfreq(n)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    phase = np.exp(-2j * np.pi * (kz * t_zyx[0] + ky * t_zyx[1] + kx * t_zyx[2]))  # a(x - t)
    out = np.real(np.fft.ifftn(fa * phase))
    den = np.sqrt(np.sum(out * out) * np.sum(r * r))
    corr = float(np.sum(out * r) / den) if den > 0 else 0.0
    return MapAlignment(out.astype(np.float32), t_zyx[::-1].copy(), corr)


def align_map_to(volume, reference, rotation, mirrored: bool) -> MapAlignment:
    """Put ``volume`` (reconstructed from poses ``est``) into ``reference``'s frame, given
    :func:`jaxcryo.rotations.align_rotations` ``(est, true, mirror=True)``'s ``rotation`` ``G`` and ``mirrored``.

    Poses with ``true_i ~ est'_i @ G`` (``est' = J est J`` when mirrored, ``J`` = :data:`~jaxcryo.rotations.MIRROR`)
    mean that the volume seen at ``est_i`` matches the reference seen at ``true_i``; the aligned map is
    ``V(x G^T J)`` (mirrored) or ``V(x G^T)`` (:func:`rotate_map`, order-1 interpolation in real space),
    then translated onto the reference by cross-correlation (:func:`translate_to`; a map's origin is free
    when the shifts are searched).
    """
    g = np.asarray(rotation, np.float64)
    if g.shape != (3, 3):
        raise InputError(f"{{param}} must be a (3, 3) rotation matrix, got shape {g.shape}", param="rotation")
    m = g.T @ MIRROR if mirrored else g.T
    vol, ref = np.asarray(volume, np.float32), np.asarray(reference, np.float32)
    if vol.shape != ref.shape or vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"volume {vol.shape} and reference {ref.shape} must be cubic maps of the same box")
    return translate_to(rotate_map(vol, m), ref)


def truth_metrics(volume, rotations, truth, true_rotations, pixel_size: float, shifts=None,
                  true_shifts=None) -> dict:
    """FSC to the ground truth after aligning ``volume`` (poses ``rotations``) to it (:func:`align_map_to`
    with :func:`jaxcryo.rotations.align_rotations` ``mirror=True``), and the pose errors. Shift errors are given
    only when no global rotation or mirror was needed (otherwise the two frames' origins differ)."""
    a = align_rotations(rotations, true_rotations, mirror=True)
    al = align_map_to(volume, truth, a.rotation, a.mirrored)
    f = fsc_fn(al.volume, np.asarray(truth, np.float32), pixel_size=pixel_size)
    angle = float(np.degrees(np.arccos(np.clip((np.trace(a.rotation) - 1) / 2, -1, 1))))
    out = {"fsc05_shell": first_shell_below(f.fsc, 0.5), "fsc0143_shell": first_shell_below(f.fsc, 0.143),
           "resolution_05": float(f.resolution_05), "resolution_0143": float(f.resolution_0143),
           "mirrored": bool(a.mirrored), "global_rotation_deg": angle,
           "map_shift_px": [float(x) for x in al.shift_px], "map_correlation": al.correlation,
           "pose_error_median_deg": float(a.median_deg), "pose_error_mean_deg": float(a.mean_deg),
           "fsc": [float(x) for x in f.fsc]}
    if shifts is not None and true_shifts is not None and not a.mirrored and angle < 0.5:
        out["shift_error_median_px"] = float(np.median(np.linalg.norm(np.asarray(shifts) - np.asarray(true_shifts),
                                                                      axis=1)) / pixel_size)
    return out


# --------------------------------------------------------------------------------------------------
# The pieces of a run
# --------------------------------------------------------------------------------------------------
def kmax_schedule(settings: AbinitioSettings, n: int, pixel_size: float) -> np.ndarray:
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

    def bad(name, why):
        raise InputError(f"{{param}} {getattr(s, name)!r}: {why}", param=name)

    if isinstance(s.steps, bool) or not isinstance(s.steps, (int, np.integer)) or s.steps < 1:
        bad("steps", "expected a positive integer")
    if isinstance(s.batch_size, bool) or not isinstance(s.batch_size, (int, np.integer)) or s.batch_size < 1:
        bad("batch_size", "expected a positive integer")
    for name in ("init_resolution", "final_resolution", "angular_step", "shift_step_px", "decay_steps"):
        v = getattr(s, name)
        if not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
            bad(name, "expected a positive number")
    if s.final_resolution > s.init_resolution:
        bad("final_resolution", f"expected at most the initial resolution ({s.init_resolution:g} A)")
    if not (np.isfinite(s.max_shift_px) and s.max_shift_px >= 0):
        bad("max_shift_px", "expected pixels >= 0")
    if not 0 < s.ramp_fraction <= 1:
        bad("ramp_fraction", "expected a fraction in (0, 1]")
    if s.learning_rate is not None and not (np.isfinite(s.learning_rate) and s.learning_rate > 0):
        bad("learning_rate", "expected a positive number (or None: measured)")
    if not 0 <= s.rate_floor <= 1:
        bad("rate_floor", "expected a fraction in [0, 1]")
    if not (np.isfinite(s.lam) and s.lam >= 0):
        bad("lam", "expected a number >= 0")
    if isinstance(s.local_levels, bool) or not isinstance(s.local_levels, (int, np.integer)) or s.local_levels < 0:
        bad("local_levels", "expected an integer >= 0")
    if isinstance(s.score_oversample, bool) or not isinstance(s.score_oversample, (int, np.integer)) \
            or s.score_oversample < 1:
        bad("score_oversample", "expected a positive integer")
    if s.angular_step > 90:
        bad("angular_step", "expected at most 90 degrees")
    if s.particle_diameter is not None and not (np.isfinite(s.particle_diameter) and s.particle_diameter > 0):
        bad("particle_diameter", "expected a positive diameter in A")


class _Searcher:
    """Global + local pose searches of raw batches against a map at one ``kmax`` (jitted per shell)."""

    def __init__(self, projector: Projector, settings: AbinitioSettings, batch_size: int):
        s = settings
        px = projector.pixel_size
        self.projector, self.s = projector, s
        self.rots = jnp.asarray(so3_grid(s.angular_step), jnp.float32)
        self.shifts = jnp.asarray(shift_grid(s.max_shift_px * px, s.shift_step_px * px), jnp.float32)
        # local levels: angular step / 2^l over +- 2 steps; shift grids of +- 2 steps of shift_step / 2^l
        self.levels = [(s.angular_step / 2 ** lv, jnp.asarray(shift_grid(2 * s.shift_step_px * px / 2 ** lv,
                                                                          s.shift_step_px * px / 2 ** lv),
                                                              jnp.float32))
                       for lv in range(1, s.local_levels + 1)]
        per_image = self.rots.shape[0] * self.shifts.shape[0]
        self.chunk = int(max(1, min(batch_size, s.score_memory // per_image)))
        self._jit: dict = {}

    def _fn(self, kmax: int):
        if kmax not in self._jit:
            proj, levels = self.projector, [lv[0] for lv in self.levels]

            def search(vol_f, raw, rots, shifts, local_shifts):
                batch = to_batch(raw)
                b = best_poses(score_poses(vol_f, batch, proj, rots, shifts, kmax=kmax), rots, shifts)
                r, sh, score = b.rotations, b.shifts, b.score
                for step, grid in zip(levels, local_shifts):
                    cand = local_grid(r, step, 2 * step)
                    csh = sh[:, None, :] + grid[None]
                    b = best_poses(score_local(vol_f, batch, proj, cand, csh, kmax=kmax), cand, csh)
                    r, sh, score = b.rotations, b.shifts, b.score
                return r, sh, score

            self._jit[kmax] = jax.jit(search)
        return self._jit[kmax]

    def __call__(self, vol_f, raw: RawBatch, kmax: int):
        """Best rotations ``(B, 3, 3)``, shifts ``(B, 2)`` Å and scores ``(B,)`` (NumPy) of a raw batch."""
        f = self._fn(int(kmax))
        b, c = len(raw.mask), self.chunk
        out_r, out_s, out_c = np.zeros((b, 3, 3)), np.zeros((b, 2)), np.zeros(b)
        grids = [lv[1] for lv in self.levels]
        for start in range(0, b, c):
            sel = np.arange(start, start + c)
            sel = np.where(sel < b, sel, b - 1)  # static chunk shape: pad with the last image (masked)
            part = RawBatch(raw.images[sel], raw.rotations[sel], raw.shifts[sel],
                            None if raw.ctf is None else type(raw.ctf)(*(f_[sel] for f_ in raw.ctf)),
                            raw.weights[sel], np.where(np.arange(start, start + c) < b, raw.mask[sel], 0.0))
            r, sh, score = f(vol_f, part, self.rots, self.shifts, grids)
            keep = min(c, b - start)
            out_r[start:start + keep] = np.asarray(r, np.float64)[:keep]
            out_s[start:start + keep] = np.asarray(sh, np.float64)[:keep]
            out_c[start:start + keep] = np.asarray(score, np.float64)[:keep]
        return _orthonormalise(out_r), out_s, out_c


def _orthonormalise(r: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(r)
    d = np.sign(np.linalg.det(u @ vt))
    u[..., :, -1] *= d[..., None]
    return u @ vt


def _make_update(projector: Projector, lam: float, support):
    """The jitted volume step ``(v, opt_state, raw, rate_per_shell) -> (v, opt_state, loss)``: the PSGD
    direction ``-D_B^-1 grad F_B`` (exact minibatch diagonal) scaled voxel-wise by the step size of its
    shell, then the real-space support mask."""
    opt = preconditioned_sgd(1.0, diagonal="batch", projector=projector, lam=lam, beta=0.0)
    shells = jnp.asarray(np.minimum(shell_index(projector.n, 3), projector.n // 2 + 1))
    mask = jnp.asarray(support, jnp.float32)

    def step(v, opt_state, raw, rate):
        batch = to_batch(raw)
        filters = batch_filters(batch, projector)
        fn = objective(batch, projector, lam, None, filters)
        val, g = value_and_grad(fn)(v)
        upd, opt_state = opt.update(g, opt_state, v, obj_fn=fn, grad=g, value=val, batch=batch, filters=filters)
        v = optax.apply_updates(v, rate[shells].astype(jnp.real(upd).dtype) * upd)
        v = volume_to_fourier(fourier_to_volume(v) * mask)
        return v, opt_state, val

    return opt, jax.jit(step)


def _edge(k: float, n: int, width: float = 2.0) -> np.ndarray:
    """The raised-cosine frequency limit per shell ``0..n//2+1``: 1 below ``k - width/2``, 0 beyond
    ``k + width/2``."""
    return frequency_edge(np.arange(n // 2 + 2, dtype=np.float64), k, width)


def _decay(age: np.ndarray, eta0: float, s: AbinitioSettings) -> np.ndarray:
    """The step size of a shell opened ``age`` steps ago: ``eta0 / (1 + age / decay_steps)``, floored at
    ``rate_floor * eta0``."""
    return eta0 * np.maximum(1.0 / (1.0 + np.maximum(age, 0) / s.decay_steps), s.rate_floor)


def _measured_rate(projector: Projector, raw: RawBatch, lam: float) -> float:
    """``1 / lambda_max(D_B^-1 H_B)`` of a raw batch (its own exact diagonal), by power iteration."""

    @jax.jit
    def lmax(raw):
        batch = to_batch(raw)
        zeros = jnp.zeros((projector.n,) * 3, jnp.complex64)
        return preconditioned_max_eigenvalue(objective(batch, projector, lam), zeros,
                                             minibatch_diagonal(projector, batch, lam))

    return float(1.0 / max(float(lmax(raw)), 1.0))


def _support_mask(settings: AbinitioSettings, n: int, pixel_size: float) -> np.ndarray:
    d = 0.8 * n * pixel_size if settings.particle_diameter is None else float(settings.particle_diameter)
    radius = min(0.5 * d / pixel_size, 0.5 * n - 1)
    width = max(2.0, 0.1 * n)
    return soft_sphere_mask(n, radius=max(radius - width / 2, 1.0), width=width)


def _check_batch(raw: RawBatch, md: ParticleMetadata, idx) -> None:
    ok = np.isfinite(raw.images).all(axis=(1, 2))
    if not ok.all():
        bad = int(np.asarray(idx)[np.flatnonzero(~ok)[0]])
        raise InputError(f"{md.source or 'particles'}: the image of particle {bad + 1} contains NaN or inf")


def _with_poses(raw: RawBatch, rotations, shifts) -> RawBatch:
    return raw._replace(rotations=np.asarray(rotations, np.float32), shifts=np.asarray(shifts, np.float32))


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def abinitio(source, settings: AbinitioSettings = AbinitioSettings(), progress: bool = True, truth=None,
             true_rotations=None) -> AbinitioResult:
    """An ab initio map and poses from particles without poses (module docstring).

    Args:
        source: particles (:class:`~jaxcryo.data.ParticleDataset`, :class:`~jaxcryo.data.ArrayDataset`);
            their poses, if any, are ignored.
        settings: :class:`AbinitioSettings`.
        progress: tqdm progress bars.
        truth: optional ground-truth map (simulations, same box); with ``true_rotations`` (``(n, 3, 3)``, the
            true poses of the particles) each history record gains the FSC-0.5 shell of the map to the truth
            after alignment (:func:`truth_metrics` on the minibatch's poses) and the minibatch's pose error.

    Returns:
        :class:`AbinitioResult`. The map's hand is undetermined (:data:`HANDEDNESS`).

    Raises:
        InputError: no particles, non-finite images, bad settings.
    """
    t_start = time.perf_counter()
    s = settings
    check_settings(s)
    md = source.metadata
    n_part = len(md)
    if n_part == 0:
        raise InputError(f"{md.source or 'particles'}: no particles")
    n, px = int(md.box), float(md.pixel_size)
    if truth is not None and np.asarray(truth).shape != (n, n, n):
        raise InputError(f"{{param}} has shape {np.asarray(truth).shape}, expected ({n}, {n}, {n}) (the "
                         "particles' box)", param="truth")
    track = truth is not None and true_rotations is not None
    projector = Projector(n=n, pixel_size=px, operator="trilinear")
    batch = int(min(s.batch_size, n_part))
    scorer = _Searcher(Projector(n=n, pixel_size=px,
                                 operator=make_operator("trilinear", oversample=s.score_oversample)
                                 if s.score_oversample > 1 else "trilinear"), s, batch)
    support = _support_mask(s, n, px)
    opt, step_fn = _make_update(projector, s.lam, support)
    kmaxes = kmax_schedule(s, n, px)
    rng = np.random.default_rng([s.seed, 31])
    nsh = n // 2 + 2
    opened = np.full(nsh, -1, np.int64)  # the step at which each shell's step size became non-zero

    def rates(k, t):  # per-shell step sizes at step t (eta0: set below, before the first call)
        edge = _edge(k, n)
        opened[(edge > 0) & (opened < 0)] = t
        return (_decay(t - opened, eta0, s) * edge).astype(np.float32)

    # 1. the start: one full step from zero at random poses
    queue: list = []

    def next_batch():
        if not queue:
            queue.extend(epoch_batches(np.arange(n_part), batch, rng))
        return queue.pop(0)

    idx, mask = next_batch()
    raw = load_batch(source, idx, mask)
    _check_batch(raw, md, idx)
    rand = np.asarray(random_rotations(jax.random.PRNGKey(s.seed), batch, jnp.float32), np.float64)
    k0 = float(kmaxes[0])
    vol = jnp.zeros((n, n, n), jnp.complex64)
    opt_state = opt.init(vol)
    start = _with_poses(raw, rand, np.zeros((batch, 2)))
    eta0 = float(s.learning_rate) if s.learning_rate is not None else _measured_rate(projector, start, s.lam)
    rates(k0, 0)  # the shells inside the first limit open at step 0
    start_rate = _edge(k0, n).astype(np.float32)  # eta = 1 from zero: the (preconditioned) backprojection
    vol, opt_state, _ = step_fn(vol, opt_state, start, jnp.asarray(start_rate))

    cur_r = np.full((n_part, 3, 3), np.nan)
    history: list = []
    bar = tqdm(total=s.steps, desc="ab initio", unit="step", disable=not progress)
    for t in range(s.steps):
        t0 = time.perf_counter()
        k = int(kmaxes[t])
        if t > 0:
            idx, mask = next_batch()
            raw = load_batch(source, idx, mask)
            _check_batch(raw, md, idx)
        r, sh, score = scorer(vol, raw, k)
        real = np.asarray(mask) > 0
        ids = np.asarray(idx)[real]
        seen = np.isfinite(cur_r[ids, 0, 0])
        change = (float(np.mean(geodesic_distance_deg(cur_r[ids][seen], r[real][seen]))) if seen.any() else None)
        cur_r[ids] = r[real]
        rate = rates(k, t)
        vol, opt_state, loss = step_fn(vol, opt_state, _with_poses(raw, r, sh), jnp.asarray(rate))
        loss = float(loss)
        if not np.isfinite(loss):
            raise DivergenceError("the volume update diverged (non-finite loss); lower {param}", param="learning_rate")
        dt = time.perf_counter() - t0
        rec = {"step": t + 1, "kmax": k, "resolution_limit": n * px / k, "learning_rate": float(rate[1]),
               "seconds": dt, "elapsed": time.perf_counter() - t_start,
               "mean_best_score": float(np.mean(score[real])), "scored_pixels": _scored_pixels(scorer, k),
               "mean_pose_change_deg": change, "loss": loss}
        if track:
            m = truth_metrics(np.asarray(fourier_to_volume(vol)), r[real], truth, np.asarray(true_rotations)[ids], px)
            rec.update(fsc05_truth_shell=m["fsc05_shell"], pose_error_median_deg=m["pose_error_median_deg"],
                       mirrored=m["mirrored"])
        history.append(rec)
        bar.update(1)
        bar.set_postfix(res=f"{n * px / k:.1f}A", score=f"{rec['mean_best_score']:.3g}")
    bar.close()

    # 3. final poses: every particle against the final map at the final limit
    k = int(kmaxes[-1])
    all_r, all_s, all_c = np.zeros((n_part, 3, 3)), np.zeros((n_part, 2)), np.zeros(n_part)
    for idx, mask in tqdm(epoch_batches(np.arange(n_part), batch), desc="final poses", unit="batch", leave=False,
                          disable=not progress):
        raw = load_batch(source, idx, mask)
        _check_batch(raw, md, idx)
        r, sh, score = scorer(vol, raw, k)
        real = np.asarray(mask) > 0
        all_r[idx[real]], all_s[idx[real]], all_c[idx[real]] = r[real], sh[real], score[real]
    out_md = dataclasses.replace(md, rotations=all_r, shifts=all_s, missing_poses=None)
    volume = np.asarray(fourier_to_volume(vol), np.float32)
    return AbinitioResult(volume, out_md, history, all_c, time.perf_counter() - t_start, k, eta0)


def _scored_pixels(scorer: _Searcher, kmax: int) -> int:
    from ._scoring import score_pixels

    return int(score_pixels(scorer.projector, kmax).size)
