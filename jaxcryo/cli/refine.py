"""``jaxcryo refine``: gold-standard refinement of poses and maps from a reference (RELION auto-refine's job)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ..errors import InputError
from ..rotations._grids import align_rotations
from ..io.atomic import atomic_write_text
from ..io.checkpoint import load_checkpoint, save_checkpoint
from ..io.mrc import read_map, write_map
from ..io.star import write_star
from ..plotting import plot_convergence, plot_fsc
from ..poses._diagnostics import run_warnings
from ..poses._refine import RefineSettings, RefineState, half_map_volumes, prepare_reference, refine
from ..data._sources import ParticleDataset

CHECKPOINT_KIND = "refine"


def register(sub) -> None:
    d = RefineSettings()
    p = sub.add_parser(
        "refine",
        help="refine poses and half maps from a reference (gold standard), like RELION's auto-refine",
        description=(
            "Each iteration assigns poses to each half set by device-side scoring against its own half map "
            "(a global search over SO(3) x shifts when the particles have no poses, then local searches), "
            "updates each half map with preconditioned SGD (or --optimizer sgd) on the known-pose objective, "
            "and uses the half-map FSC to set the next frequency limit and angular step, until the resolution "
            "stops improving. Ends with a known-pose reconstruction from the refined poses (jaxcryo "
            "reconstruct's defaults). Writes DIR/particles.star (refined poses, rlnRandomSubset), half1.mrc, "
            "half2.mrc, map.mrc, fsc.json/fsc.png, history.json/convergence.png, run.json and a checkpoint "
            "after every iteration (--resume)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("particles", type=Path, help="particles (.star or .cs)")
    p.add_argument("--reference", type=Path, required=True, help="reference map (MRC), same extent as the particles")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--local-only", action="store_true", help="start from the particles' poses (local searches only)")
    p.add_argument("--optimizer", choices=("psgd", "sgd"), default=d.optimizer, help="volume updates")
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help="pose assignment: 1 = hard (best pose); K > 1 = soft, each image weighted over its K most "
                        "likely poses in the volume updates (K times the update cost)")
    p.add_argument("--iterations", type=int, default=d.iterations, help="iterations at most")
    p.add_argument("--init-resolution", type=float, default=d.init_resolution,
                   help="low-pass the reference to this resolution (A) first")
    p.add_argument("--global-step", type=float, default=d.global_step, help="global search step (degrees)")
    p.add_argument("--local-step", type=float, default=d.local_step, help="first local step with --local-only (deg)")
    p.add_argument("--min-step", type=float, default=d.min_step,
                   help="finest angular step (degrees) the local searches halve down to")
    p.add_argument("--max-shift", type=float, default=d.max_shift_px, help="global translation range (+- px)")
    p.add_argument("--epochs-per-iteration", type=int, default=d.epochs_per_iteration)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--particle-diameter", type=float, default=d.particle_diameter,
                   help="(prototype, issue 19) score against references masked by a soft sphere of this diameter "
                        "(A), as RELION's --particle_diameter; default: no mask")
    p.add_argument("--recentre", action="store_true",
                   help="(prototype, issue 19) after each volume update, centre the half maps' density and move "
                        "the particles' origins to match")
    p.add_argument("--whiten", action="store_true",
                   help="(prototype, issue 19) score with the per-shell noise spectrum of the residuals")
    p.add_argument("--offset-sigma", type=float, default=d.offset_sigma_px,
                   help="(prototype, issue 19) Gaussian prior of this width (px) on the particles' origins")
    p.add_argument("--no-scale-reference", dest="scale_reference", action="store_false",
                   help="do not rescale the reference to the particles' intensity before the first pose search")
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
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def _state_trees(state: RefineState) -> dict:
    n = len(state.shifts)
    rot = np.zeros((n, 3, 3)) if state.rotations is None else state.rotations
    return {"half_maps": [jnp.asarray(v) for v in state.half_maps], "rotations": rot, "shifts": state.shifts}


def _save(stem: Path, state: RefineState, settings: RefineSettings, local_only: bool) -> None:
    save_checkpoint(stem, _state_trees(state), {
        "kind": CHECKPOINT_KIND, "settings": dataclasses.asdict(settings), "local_only": local_only,
        "has_rotations": state.rotations is not None, "resolution": state.resolution, "step": state.step,
        "shift_step_px": state.shift_step_px, "iteration": state.iteration, "stalls": state.stalls,
        "history": state.history})


def _load(stem: Path, template: RefineState) -> tuple[RefineState, dict]:
    trees, meta = load_checkpoint(stem, _state_trees(template))
    if meta.get("kind") != CHECKPOINT_KIND:
        raise InputError(f"{stem}.npz: not a refine checkpoint (kind {meta.get('kind')!r})")
    state = RefineState(list(trees["half_maps"]), np.asarray(trees["rotations"]) if meta["has_rotations"] else None,
                        np.asarray(trees["shifts"]), float(meta["resolution"]), float(meta["step"]),
                        float(meta["shift_step_px"]), int(meta["iteration"]), int(meta["stalls"]), list(meta["history"]))
    return state, meta


def run(args) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; --out needs a folder")
    if not args.reference.exists():
        raise InputError(f"{args.reference}: no such file (--reference)")
    if args.iterations < 1:
        raise InputError(f"--iterations {args.iterations}: expected at least 1")
    if not args.min_step > 0:
        raise InputError(f"--min-step {args.min_step}: expected a positive angle (degrees)")
    if args.top_k < 1:
        raise InputError(f"--top-k {args.top_k}: expected at least 1 (1 = hard assignment)")
    ds = ParticleDataset.from_file(args.particles, datadir=args.datadir)
    md = ds.metadata
    if len(md) == 0:
        raise InputError(f"{args.particles}: no particles")
    ds.validate(check_images=True)
    ref, ref_px = read_map(args.reference)
    truth = read_map(args.truth)[0] if args.truth is not None else None
    settings = RefineSettings(init_resolution=args.init_resolution, global_step=args.global_step,
                              local_step=args.local_step, min_step=args.min_step, max_shift_px=args.max_shift,
                              iterations=args.iterations,
                              epochs_per_iteration=args.epochs_per_iteration, optimizer=args.optimizer,
                              top_k=args.top_k, particle_diameter=args.particle_diameter,
                              recentre=args.recentre, whiten=args.whiten, offset_sigma_px=args.offset_sigma,
                              scale_reference=args.scale_reference,
                              batch_size=args.batch_size, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "checkpoint"
    state = None
    if args.resume:
        if not stem.with_suffix(".npz").exists():
            raise InputError(f"{stem}.npz: no checkpoint to resume from (--resume)")
        from ..poses._refine import initial_state
        from ..forward._projection import Projector, volume_to_fourier

        proj = Projector(n=md.box, pixel_size=float(md.pixel_size), operator=settings.interp)
        r = prepare_reference(ref, ref_px, md.box, float(md.pixel_size))
        template = initial_state(ds, volume_to_fourier(jnp.asarray(r)), proj, settings,
                                 args.local_only and md.rotations is not None)
        if template.rotations is None:
            template.rotations = np.zeros((len(md), 3, 3))
        state, meta = _load(stem, template)
        args.local_only = bool(meta["local_only"])

    def warn(msg):
        if not args.quiet:
            print(f"jaxcryo refine: warning: {msg}", file=sys.stderr)

    def checkpoint(st):
        _save(stem, st, settings, args.local_only)
        atomic_write_text(out / "history.json", json.dumps(st.history, indent=1))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = refine(ds, ref, settings, local_only=args.local_only, reference_pixel_size=ref_px,
                         progress=not args.quiet, state=state, on_iteration=checkpoint, warn=warn, truth=truth,
                         devices=args.devices)
    except KeyboardInterrupt:
        print(f"jaxcryo refine: interrupted; continue with --resume ({stem}.npz)", file=sys.stderr)
        return 130
    px = float(md.pixel_size)
    final = res.final
    h1, h2 = half_map_volumes(res.state)
    write_map(out / "half1.mrc", final.half1 if final.half1 is not None else h1, px)
    write_map(out / "half2.mrc", final.half2 if final.half2 is not None else h2, px)
    write_map(out / "map.mrc", final.volume, px)
    write_star(out / "particles.star", res.metadata)
    fsc = final.fsc_half.to_dict()
    summary = {"iterations": res.state.iteration, "resolution_0143": final.fsc_half.resolution_0143,
               "resolution_05": final.fsc_half.resolution_05, "wall_seconds": None,
               "handedness": "kept from the reference (a refinement cannot change the hand of its reference)"}
    if final.fsc_ref is not None:
        fsc["reference"] = final.fsc_ref.to_dict()
        summary["truth_resolution_05"] = final.fsc_ref.resolution_05
    if args.true_poses is not None:
        from ..data._sources import read_particles

        tmd = read_particles(args.true_poses, datadir=args.datadir)
        if tmd.rotations is None or len(tmd) != len(md):
            raise InputError(f"{args.true_poses}: expected poses for the same {len(md)} particles (--true-poses)")
        summary["pose_errors"] = pose_errors(res.metadata, tmd)
    # issue 19: say when it failed (drifted map, collapse against the reference, poses stalled at a poor resolution)
    run_warns = run_warnings(final.volume, prepare_reference(ref, ref_px, md.box, px), res.history, px,
                             settings.init_resolution)
    for w in run_warns:
        print(f"jaxcryo refine: warning: {w}", file=sys.stderr)
    atomic_write_text(out / "fsc.json", json.dumps(fsc, indent=1))
    curves = {"half maps": final.fsc_half}
    if final.fsc_ref is not None:
        curves["map vs truth"] = final.fsc_ref
    plot_fsc(curves, out / "fsc.png", title="FSC after refinement")
    atomic_write_text(out / "history.json", json.dumps(res.history, indent=1))
    plot_convergence({settings.optimizer: [dict(h, epoch=h["iteration"]) for h in res.history]}, out / "convergence.png",
                     x_keys=("epoch",), y_keys=("resolution", "mean_pose_change_deg", "fsc05_truth_shell"),
                     title="refinement per iteration")
    summary["wall_seconds"] = time.perf_counter() - t0
    n_devices = res.history[-1].get("devices", 1) if res.history else 1
    atomic_write_text(out / "run.json", json.dumps({"command": "refine", "argv": sys.argv,
                                                    "settings": dataclasses.asdict(settings),
                                                    "local_only": args.local_only, "devices": n_devices,
                                                    "devices_requested": args.devices,
                                                    "summary": summary, "warnings": run_warns}, indent=1))
    print(f"jaxcryo refine: {len(md)} particles, {res.state.iteration} iterations, {summary['wall_seconds']:.0f} s; "
          f"half-map FSC 0.143: {summary['resolution_0143']:.2f} A"
          + (f"; vs truth 0.5: {summary['truth_resolution_05']:.2f} A" if "truth_resolution_05" in summary else "")
          + (f"; pose error median {summary['pose_errors']['median_deg']:.2f} deg" if "pose_errors" in summary else "")
          + f" -> {out}/map.mrc, {out}/particles.star")
    return 0


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
