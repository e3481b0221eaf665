"""``jaxcryo refine``: gold-standard refinement of poses and maps from a reference (RELION auto-refine's job)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..rotations._grids import align_rotations
from ..io._validate import MASK, REFERENCE, TRUTH, MapRole, Volume, read_volume, require_same_grid
from ..io.outputs import ConvergencePlot, fsc_json, output_folder, write_json, write_outputs
from ..io.star import write_star
from ..poses import DIAMETER_FRACTION, RefineSettings, half_map_volumes, refine
from ..data._sources import ParticleDataset
from .postprocess import write_outputs as write_postprocess_outputs

def register(sub) -> None:
    d = RefineSettings()
    p = sub.add_parser(
        "refine",
        help="refine poses and half maps from a reference (gold standard), like RELION's auto-refine",
        description=(
            "Each iteration assigns poses to each half set by device-side scoring against its own half map "
            "(a global search over SO(3) x shifts when the particles have no poses, then local searches), "
            "re-estimates each half map from the particles at their new poses (the one-pass Wiener filter with "
            "the spectral prior of the half-map FSC, as RELION; --optimizer psgd or sgd: minibatch epochs from "
            "zero on the same objective; --warm-start: epochs from the last half maps), "
            "and uses the half-map FSC to set the next frequency limit and angular step, until the resolution "
            "stops improving. Ends with a known-pose reconstruction from the refined poses (jaxcryo "
            "reconstruct's defaults) and the postprocess of its half maps (jaxcryo postprocess: masked FSC "
            "corrected by phase randomisation, with --mask or a soft spherical mask; B-factor sharpening): the "
            "reported resolution is the corrected masked FSC's. Writes DIR/particles.star (refined poses, "
            "rlnRandomSubset), half1.mrc, half2.mrc, map.mrc, fsc.json/fsc.png (unmasked half maps), "
            "postprocess.mrc, postprocess_masked.mrc, postprocess.json, postprocess_fsc.png, "
            "postprocess_guinier.png, history.json/convergence.png, run.json (with warnings when the map drifted, "
            "collapsed or stalled) and a checkpoint after every iteration (--resume)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("particles", type=Path, help="particles (.star or .cs)")
    p.add_argument("--reference", type=Path, required=True, help="reference map (MRC), same extent as the particles")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--local-only", action="store_true", help="start from the particles' poses (local searches only)")
    p.add_argument("--optimizer", choices=("psgd", "sgd", "adam", "backproject"), default=d.optimizer,
                   help="volume updates (backproject: the one-pass Wiener filter)")
    p.add_argument("--warm-start", dest="reestimate", action="store_false",
                   help="update the half maps by epochs warm-started from the last ones (Tikhonov prior) instead "
                        "of estimating them anew each iteration with the half-map FSC's spectral prior (RELION's "
                        "scheme; without it: reestimate=%(default)s)")
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help="pose assignment: 1 = hard (best pose); K > 1 = soft, each image weighted over its K most "
                        "likely poses in the volume updates (K times the update cost)")
    p.add_argument("--iterations", type=int, default=d.iterations, help="iterations at most")
    p.add_argument("--init-resolution", type=float, default=d.init_resolution,
                   help="low-pass the reference to this resolution (A) first")
    p.add_argument("--global-step", type=float, default=d.global_step, help="global search step (degrees)")
    p.add_argument("--global-iterations", type=int, default=d.global_iterations,
                   help="without starting poses: iterations that search globally, each against the last half maps")
    p.add_argument("--local-step", type=float, default=d.local_step, help="first local step with --local-only (deg)")
    p.add_argument("--min-step", type=float, default=d.min_step,
                   help="finest angular step (degrees) the local searches halve down to")
    p.add_argument("--max-shift", type=float, default=d.max_shift_px, help="global translation range (+- px)")
    p.add_argument("--epochs-per-iteration", type=int, default=d.epochs_per_iteration)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--truth", type=Path, default=None,
                   help="ground-truth map (simulations): history gains its FSC, particles.star pose errors")
    p.add_argument("--true-poses", type=Path, default=None,
                   help="STAR with the true poses (simulations): run.json and the summary report pose errors")
    p.add_argument("--datadir", type=Path, default=None, help="folder to look for the image stacks in")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--devices", type=int, default=None,
                   help="local devices to split the pose scoring and the volume updates over (default: all JAX "
                        "sees); --batch-size is the global batch, so the result does not depend on it beyond "
                        "rounding. On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices")
    p.add_argument("--mask", type=Path, default=None,
                   help="solvent mask (MRC, values in [0, 1], the particles' box and pixel size) of the closing "
                        "postprocess; default: a soft spherical mask of --particle-diameter")
    p.add_argument("--particle-diameter", type=float, default=None,
                   help=f"diameter (A) of the default spherical mask; default: {DIAMETER_FRACTION:g} x the box")
    p.add_argument("--no-scale-reference", dest="scale_reference", action="store_false",
                   help="do not rescale the reference to the particles' intensity before the first pose search "
                        "(without it: scale_reference=%(default)s)")
    p.add_argument("--solvent-mask", action="store_true",
                   help="(prototype, issue 19) score against references masked by a soft sphere of "
                        "--particle-diameter, as RELION's --particle_diameter")
    p.add_argument("--recentre", action="store_true",
                   help="(prototype, issue 19) after each volume update, centre the half maps' density and move "
                        "the particles' origins to match")
    p.add_argument("--whiten", action="store_true",
                   help="(prototype, issue 19) score with the per-shell noise spectrum of the residuals")
    p.add_argument("--offset-sigma", type=float, default=d.offset_sigma_px,
                   help="(prototype, issue 19) Gaussian prior of this width (px) on each particle's origin, "
                        "centred at its current one")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    t0 = time.perf_counter()
    out = output_folder(args.out, create=False)
    if not args.reference.exists():
        raise InputError(f"{args.reference}: no such file (--reference)")
    settings = RefineSettings(init_resolution=args.init_resolution, global_step=args.global_step,
                              global_iterations=args.global_iterations,
                              local_step=args.local_step, min_step=args.min_step, max_shift_px=args.max_shift,
                              iterations=args.iterations, epochs_per_iteration=args.epochs_per_iteration,
                              optimizer=args.optimizer, top_k=args.top_k, batch_size=args.batch_size, seed=args.seed,
                              particle_diameter=args.particle_diameter, scale_reference=args.scale_reference,
                              solvent_mask=args.solvent_mask, recentre=args.recentre, whiten=args.whiten,
                              offset_sigma_px=args.offset_sigma, reestimate=args.reestimate)
    ds = ParticleDataset.from_file(args.particles, datadir=args.datadir)
    md = ds.metadata
    if len(md) == 0:
        raise InputError(f"{args.particles}: no particles")
    ds.validate(check_images=True)
    ref, ref_px = read_volume(args.reference, REFERENCE)[:2]  # checked: finite, cubic, pixel size
    truth = read_volume(args.truth, TRUTH).data if args.truth is not None else None
    mask = read_mask(args.mask, md.box, float(md.pixel_size), args.particles) if args.mask is not None else None
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "checkpoint"

    def warn(msg):
        if not args.quiet:
            print(f"jaxcryo refine: warning: {msg}", file=sys.stderr)

    def on_iteration(st):
        write_json(out / "history.json", st.history)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = refine(ds, ref, settings, local_only=args.local_only, reference_pixel_size=ref_px,
                         progress=not args.quiet, on_iteration=on_iteration, warn=warn, truth=truth,
                         devices=args.devices, checkpoint=stem, resume=args.resume, mask=mask)
    except KeyboardInterrupt:
        print(f"jaxcryo refine: interrupted; continue with --resume ({stem}.npz)", file=sys.stderr)
        return 130
    for w in res.warnings:  # issue 19: said even with --quiet (and in run.json's warnings)
        print(f"jaxcryo refine: warning: {w}", file=sys.stderr)
    px = float(md.pixel_size)
    local_only = bool(json.loads((stem.with_suffix(".json")).read_text()).get("local_only", args.local_only))
    final = res.final
    h1, h2 = half_map_volumes(res.state)
    write_star(out / "particles.star", res.metadata)
    summary = {"iterations": res.state.iteration, "resolution_0143": res.resolution_0143,
               "resolution_05": res.resolution_05, "wall_seconds": None,
               "resolution_0143_unmasked": final.fsc_half.resolution_0143,
               "resolution_05_unmasked": final.fsc_half.resolution_05,
               "resolution_from": resolution_from(res),
               "handedness": "kept from the reference (a refinement cannot change the hand of its reference)"}
    if final.fsc_ref is not None:
        summary["truth_resolution_05"] = final.fsc_ref.resolution_05
    if args.true_poses is not None:
        from ..data._sources import read_particles

        tmd = read_particles(args.true_poses, datadir=args.datadir)
        if tmd.rotations is None or len(tmd) != len(md):
            raise InputError(f"{args.true_poses}: expected poses for the same {len(md)} particles (--true-poses)")
        summary["pose_errors"] = pose_errors(res.metadata, tmd)
    post = postprocess_record(res, args.mask)
    if res.postprocess is not None:
        post["files"] = [p.name for p in write_postprocess_outputs(res.postprocess, out, {
            "half1": str(out / "half1.mrc"), "half2": str(out / "half2.mrc"), "mask": post["mask"],
            "spherical_mask_diameter": res.mask_diameter},
            plot_prefix="postprocess_")]
    summary["wall_seconds"] = time.perf_counter() - t0
    n_devices = res.history[-1].get("devices", 1) if res.history else 1
    write_outputs(out, pixel_size=px,
                  maps={"half1.mrc": final.half1 if final.half1 is not None else h1,
                        "half2.mrc": final.half2 if final.half2 is not None else h2, "map.mrc": final.volume},
                  fsc=fsc_json(final.fsc_half, final.fsc_ref),
                  fsc_curves={"half maps": final.fsc_half, "map vs truth": final.fsc_ref},
                  fsc_title="FSC after refinement", history=res.history,
                  convergence=ConvergencePlot({settings.to_dict()["optimizer"]: [dict(h, epoch=h["iteration"])
                                                                                for h in res.history]},
                                              x_keys=("epoch",),
                                              y_keys=("resolution", "mean_pose_change_deg", "fsc05_truth_shell"),
                                              title="refinement per iteration"),
                  run={"command": "refine", "argv": sys.argv, "settings": settings.to_dict(),
                       "local_only": local_only, "devices": n_devices, "devices_requested": args.devices,
                       "summary": summary, "postprocess": post, "warnings": list(res.warnings)})
    what = "corrected masked FSC" if res.postprocess is not None else "half-map FSC"
    print(f"jaxcryo refine: {len(md)} particles, {res.state.iteration} iterations, {summary['wall_seconds']:.0f} s; "
          f"{what} 0.143: {summary['resolution_0143']:.2f} A (unmasked half maps: "
          f"{summary['resolution_0143_unmasked']:.2f} A)"
          + (f"; vs truth 0.5: {summary['truth_resolution_05']:.2f} A" if "truth_resolution_05" in summary else "")
          + (f"; pose error median {summary['pose_errors']['median_deg']:.2f} deg" if "pose_errors" in summary else "")
          + f" -> {out}/map.mrc, {out}/postprocess.mrc, {out}/particles.star")
    return 0


def read_mask(path: Path, box: int, pixel_size: float, particles: Path) -> np.ndarray:
    """The mask at ``path`` (``--mask``), checked (values in [0, 1], not empty, finite) and on the particles'
    grid (``box`` px of ``pixel_size`` Å, those of ``particles``); InputError naming the file otherwise."""
    m = read_volume(path, MASK)
    grid = Volume(np.broadcast_to(np.float32(0), (box,) * 3), pixel_size, particles, MapRole("particles"))
    require_same_grid(grid, m)
    return m.data


def resolution_from(res) -> str:
    """Which FSC ``summary.resolution_0143``/``resolution_05`` come from."""
    if res.postprocess is None:
        return "unmasked half-map FSC (the postprocess could not run: run.json's postprocess.error)"
    if res.postprocess.unmasked_fallback:
        return ("corrected masked FSC (postprocess.json), which fell back to the unmasked FSC: it reached a "
                "higher shell, as RELION")
    return "corrected masked FSC (postprocess.json)"


def postprocess_record(res, mask_path: Path | None) -> dict:
    """``run.json``'s ``postprocess``: the mask used, the resolutions, B-factor and warnings of the closing
    postprocess, or why there is none."""
    p = res.postprocess
    rec: dict = {"mask": str(mask_path) if mask_path is not None else None,
                 "spherical_mask_diameter": res.mask_diameter, "warnings": list(res.postprocess_warnings),
                 "error": res.postprocess_error, "files": []}
    if p is not None:
        rec.update(resolution_0143=p.resolution_0143, resolution_05=p.resolution_05, bfactor=p.bfactor,
                   bfactor_fitted=p.bfactor_fitted, unmasked_fallback=p.unmasked_fallback)
    return rec


def pose_errors(est, true) -> dict:
    """Pose errors of the particles ``est`` against ``true`` (:class:`~jaxcryo.forward.ParticleMetadata`,
    same particles; simulations): median/mean angular error in degrees after the best global alignment
    (rotation and hand, :func:`jaxcryo.rotations.align_rotations`), and the median shift error in pixels, given
    only when no global rotation was needed (otherwise the two frames' origins differ)."""
    a = align_rotations(est.rotations, true.rotations, mirror=True)
    rotated = bool(a.mirrored or np.degrees(np.arccos(np.clip((np.trace(a.rotation) - 1) / 2, -1, 1))) > 0.5)
    shift = None if rotated else float(np.median(np.linalg.norm(est.shifts - true.shifts, axis=1)) / true.pixel_size)
    return {"median_deg": float(a.median_deg), "mean_deg": float(a.mean_deg), "mirrored": bool(a.mirrored),
            "global_rotation_applied": rotated, "shift_error_median_px": shift}
