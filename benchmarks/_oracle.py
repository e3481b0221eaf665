"""The oracle row of the robustness matrix (issue 19): how well a maximum-likelihood pose estimate of each image
(what jaxcryo and RELION report) can do on a set, given the perfect map.

Each image is searched locally around its **true** pose against the **true** map (put on the images' scale by
:func:`jaxcryo.poses._scale.reference_scale`), with jaxcryo's likelihood (:class:`jaxcryo.poses.Scorer`, every
shell to Nyquist) and engine (:class:`jaxcryo.poses.PoseSearch`): a :class:`jaxcryo.poses.Cascade` of two
:class:`jaxcryo.poses.LocalSearch` (1° steps over ±6° with origins ±2 px in 1 px steps, then 0.25° steps
over ±1° with origins ±0.5 px in 0.25 px steps). The median error of these maximum-likelihood poses is
what noise alone costs: a refinement, whose map is estimated from the same noisy images, cannot be expected
to beat it (beyond the prior that a local search's bounded range adds), and at low SNR it says when a fixed
target (e.g. < 1.5°) is out of reach of per-image maximum-likelihood poses. (A posterior mean over poses could
have a smaller error; neither program reports one.)
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from jaxcryo.cli.refine import pose_errors
from jaxcryo.forward._operators import make_operator
from jaxcryo.forward._projection import Projector, volume_to_fourier
from jaxcryo.poses._scale import reference_scale
from jaxcryo.poses._search import Cascade, LocalSearch, PoseSearch
from jaxcryo.rotations._grids import shift_grid

#: (step, radius) degrees, (range, step) px of the two stages
STAGES = ((1.0, 6.0, 2.0, 1.0), (0.25, 1.0, 0.5, 0.25))



def _setup(source, truth: np.ndarray, n_images: int, seed: int):
    """What both oracles share: the set's metadata, box and pixel size, the scoring projector (trilinear x2),
    the true map's transform and its scale to the images, and a seeded subset of ``n_images`` particles."""
    md = source.metadata
    n, px = md.box, float(md.pixel_size)
    plain = Projector(n=n, pixel_size=px, operator=make_operator("trilinear"))
    scoring = Projector(n=n, pixel_size=px, operator=make_operator("trilinear", oversample=2))
    vol_f = volume_to_fourier(jnp.asarray(np.asarray(truth, np.float32)))
    scale = reference_scale(source, vol_f, plain, 2 * px, seed=seed)
    idx = np.sort(np.random.default_rng(seed).choice(len(md), min(n_images, len(md)), replace=False))
    return md, n, px, scoring, vol_f, scale, idx

def oracle_errors(source, truth: np.ndarray, n_images: int = 200, seed: int = 0) -> dict:
    """Median/mean angular error (degrees) and median shift error (px) of the maximum-likelihood poses of
    ``n_images`` particles (a seeded random subset) of ``source`` (true poses in its metadata) searched
    around their true poses against ``truth`` (module docstring)."""
    t0 = time.perf_counter()
    md, n, px, scoring, vol_f, scale, idx = _setup(source, truth, n_images, seed)
    method = Cascade(tuple(LocalSearch(step, radius, jnp.asarray(shift_grid(srange * px, sstep * px), jnp.float32))
                           for step, radius, srange, sstep in STAGES))
    found = PoseSearch(scoring, 64, 1 << 24)(method, vol_f * scale, n // 2 - 1, source, idx,
                                             rotations=np.asarray(md.rotations)[idx],
                                             shifts=np.asarray(md.shifts)[idx])
    sub = md.subset(idx)
    e = pose_errors(dataclasses.replace(sub, rotations=found.rotations[:, 0], shifts=found.shifts[:, 0]), sub)
    return {"oracle_median_angular_error_deg": e["median_deg"], "oracle_mean_angular_error_deg": e["mean_deg"],
            "oracle_median_shift_error_px": e["shift_error_median_px"], "oracle_images": int(len(idx)),
            "oracle_search": "local searches around the true poses, " + ", then ".join(
                f"{a:g} deg steps over +-{b:g} deg with origins +-{c:g} px in {d:g} px" for a, b, c, d in STAGES)
                + f"; every shell to Nyquist; the true map scaled by {scale:.4g}",
            "oracle_seconds": time.perf_counter() - t0}


def score_margins(source, truth: np.ndarray, n_images: int = 300, thetas=(0.5, 1.0, 2.0, 3.0, 5.0),
                  directions: int = 20, seed: int = 0) -> dict:
    """For each angle ``theta`` (degrees): the fraction of images (the first ``n_images``) whose score against
    ``truth`` (scaled as in :func:`oracle_errors`, every shell to Nyquist) is higher at their true pose rotated
    by ``theta`` about a random axis (``directions`` seeded axes) than at the true pose itself."""
    from scipy.spatial.transform import Rotation

    from jaxcryo.data._batch import load_batch, to_batch
    from jaxcryo.poses._scoring import score_local

    md = source.metadata
    n, px = md.box, float(md.pixel_size)
    plain = Projector(n=n, pixel_size=px, operator=make_operator("trilinear"))
    scoring = Projector(n=n, pixel_size=px, operator=make_operator("trilinear", oversample=2))
    vol_f = volume_to_fourier(jnp.asarray(np.asarray(truth, np.float32)))
    vol_f = vol_f * reference_scale(source, vol_f, plain, 2 * px, seed=seed)
    b = min(n_images, len(md))
    batch = to_batch(load_batch(source, np.arange(b)))
    axes = np.random.default_rng(seed).normal(size=(directions, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    rot = np.asarray(md.rotations[:b])
    cands = [rot[:, None]] + [np.einsum("qij,bjk->bqik", Rotation.from_rotvec(axes * np.radians(t)).as_matrix(), rot)
                              for t in thetas]
    sc = np.asarray(score_local(vol_f, batch, scoring, jnp.asarray(np.concatenate(cands, 1), jnp.float32),
                                jnp.asarray(np.asarray(md.shifts[:b], np.float32)[:, None]), kmax=n // 2 - 1))[..., 0]
    better = sc[:, 1:].reshape(b, len(thetas), directions) > sc[:, :1, None]
    return {f"{t:g}": float(better[:, i].mean()) for i, t in enumerate(thetas)}


if __name__ == "__main__":  # python benchmarks/_oracle.py SETDIR ...: the floor and the score margins of sets
    import sys
    from pathlib import Path

    from jaxcryo.data._sources import ParticleDataset
    from jaxcryo.io.mrc import read_map

    for d in map(Path, sys.argv[1:]):
        ds, (truth, _) = ParticleDataset.from_file(d / "particles.star"), read_map(d / "truth.mrc")
        print(d.name, "fraction of images preferring a pose theta degrees off:", score_margins(ds, truth))
        print(d.name, oracle_errors(ds, truth))


#: the global oracle: a global search at this step (degrees) over origins +- GLOBAL_SHIFT px in 2 px steps, then
#: local searches (step, radius) degrees with origins (range, step) px around the best candidate
GLOBAL_STEP, GLOBAL_SHIFT = 7.5, 6.0
GLOBAL_STAGES = ((2.5, 7.5, 2.0, 1.0), (1.0, 3.0, 1.0, 0.5), (0.25, 1.0, 0.5, 0.25))


def oracle_global_errors(source, truth: np.ndarray, n_images: int = 100, seed: int = 0) -> dict:
    """The floor of a refinement *without* starting poses: the maximum-likelihood pose of each image found by a
    global search (:data:`GLOBAL_STEP` over SO(3), origins +- :data:`GLOBAL_SHIFT` px) against the true map,
    refined by local searches (:data:`GLOBAL_STAGES`), every shell to Nyquist. Unlike :func:`oracle_errors`
    it includes the images whose likelihood peaks in another basin (a wrong view), which a global refinement
    cannot avoid either; ``oracle_global_fraction_over_20deg`` is their share."""
    from jaxcryo.poses._search import GlobalSearch
    from jaxcryo.rotations._grids import so3_grid

    t0 = time.perf_counter()
    md, n, px, scoring, vol_f, scale, idx = _setup(source, truth, n_images, seed)
    glob = GlobalSearch(jnp.asarray(so3_grid(GLOBAL_STEP), jnp.float32),
                        jnp.asarray(shift_grid(GLOBAL_SHIFT * px, 2.0 * px), jnp.float32))
    method = Cascade((glob,) + tuple(
        LocalSearch(step, radius, jnp.asarray(shift_grid(srange * px, sstep * px), jnp.float32))
        for step, radius, srange, sstep in GLOBAL_STAGES))
    found = PoseSearch(scoring, 16, 1 << 26)(method, vol_f * scale, n // 2 - 1, source, idx)
    sub = md.subset(idx)
    est = dataclasses.replace(sub, rotations=found.rotations[:, 0], shifts=found.shifts[:, 0])
    e = pose_errors(est, sub)
    d = np.degrees(np.arccos(np.clip((np.einsum("nij,nij->n", est.rotations, np.asarray(sub.rotations)) - 1) / 2,
                                     -1, 1)))  # no global alignment: the true map fixes the frame
    return {"oracle_global_median_angular_error_deg": float(np.median(d)),
            "oracle_global_mean_angular_error_deg": float(np.mean(d)),
            "oracle_global_fraction_over_20deg": float(np.mean(d > 20)),
            "oracle_global_median_after_alignment_deg": e["median_deg"],
            "oracle_global_median_shift_error_px": e["shift_error_median_px"], "oracle_images": int(len(idx)),
            "oracle_search": f"global search at {GLOBAL_STEP:g} deg over origins +-{GLOBAL_SHIFT:g} px in 2 px steps, "
                             "then " + ", then ".join(f"{a:g} deg steps over +-{b:g} deg with origins +-{c:g} px in "
                                                      f"{dd:g} px" for a, b, c, dd in GLOBAL_STAGES)
                             + f"; every shell to Nyquist; the true map scaled by {scale:.4g}",
            "oracle_seconds": time.perf_counter() - t0}
