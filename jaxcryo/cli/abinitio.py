"""``jaxcryo abinitio``: a first map and poses from particles without poses (cryoSPARC's ab initio, RELION's
initial model)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from ..poses import HANDEDNESS, AbinitioSettings, abinitio, prepare_reference, truth_metrics
from ..errors import InputError
from ..rotations._grids import align_rotations
from ..io._validate import TRUTH, read_volume
from ..io.outputs import ConvergencePlot, OutputFiles, output_folder, write_outputs
from ..io.star import write_star
from ..data._sources import ParticleDataset


def register(sub) -> None:
    d = AbinitioSettings()
    p = sub.add_parser(
        "abinitio",
        help="a first low-resolution map and poses from particles without poses (ab initio / initial model)",
        description=(
            "Stochastic gradient descent from a featureless start (the backprojection of the first minibatch at "
            "random poses): each minibatch gets poses by a global search over SO(3) x shifts against the current "
            "map (soft assignment over its --top-k best poses; hard: then local searches), at a frequency limit that marches from --init-resolution to "
            "--final-resolution, and the map takes one preconditioned SGD step (exact minibatch Hessian "
            "diagonal) on it, restricted to that limit and to a soft spherical support. A final global search "
            "gives every particle a pose in the map's frame. The map's hand is undetermined: it may be the "
            "mirror image of the structure. Writes DIR/map.mrc (next: jaxcryo refine PARTICLES --reference "
            "DIR/map.mrc, a global search from it, so that the half sets' poses are found independently beyond the "
            "reference's 30 A; --local-only from DIR/particles.star keeps poses that were all assigned against one "
            "map, and the half maps then share its features: an inflated resolution when the map is wrong), "
            "DIR/particles.star, DIR/history.json, DIR/abinitio.png and DIR/run.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("particles", type=Path, help="particles (.star or .cs); their poses, if any, are ignored")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per minibatch")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--steps", type=int, default=None, help=f"minibatch steps ({d.steps} unless --epochs is given)")
    n.add_argument("--epochs", type=float, default=None, help="passes over the data instead of --steps")
    p.add_argument("--init-resolution", type=float, default=d.init_resolution, help="first frequency limit (A)")
    p.add_argument("--final-resolution", type=float, default=d.final_resolution, help="final frequency limit (A)")
    p.add_argument("--angular-step", type=float, default=d.angular_step, help="global search step (degrees)")
    p.add_argument("--max-shift", type=float, default=d.max_shift_px, help="global translation range (+- px)")
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help="1: hard assignment (best pose, then local searches); K > 1: soft assignment, each image "
                        "in the volume step at its K best poses of the global search weighted by their posterior "
                        "(finds the structure sooner at low SNR)")
    p.add_argument("--particle-diameter", type=float, default=None,
                   help="diameter of the soft spherical support (A; none: 0.8 box)")
    p.add_argument("--truth", type=Path, default=None,
                   help="ground-truth map (simulations; needs --true-poses): FSC after aligning the map to it")
    p.add_argument("--true-poses", type=Path, default=None,
                   help="STAR with the true poses of the same particles (simulations): pose errors after the "
                        "global rotation and hand")
    p.add_argument("--datadir", type=Path, default=None, help="folder to look for the image stacks in")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--devices", type=int, default=None,
                   help="local devices to split the pose searches and the volume steps over (default: all JAX "
                        "sees); the minibatches do not depend on it. On CPU, "
                        "XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint (written after every step)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out particles whose image has NaN/inf instead of failing (particles.star then "
                        "lists the particles used)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _settings(args, n_particles: int) -> AbinitioSettings:
    fields = dict(batch_size=args.batch_size, init_resolution=args.init_resolution,
                  final_resolution=args.final_resolution, angular_step=args.angular_step, max_shift_px=args.max_shift,
                  top_k=args.top_k, particle_diameter=args.particle_diameter, seed=args.seed, skip_bad=args.skip_bad)
    if args.epochs is not None:
        return AbinitioSettings.for_epochs(args.epochs, n_particles, **fields)
    return AbinitioSettings(**({} if args.steps is None else {"steps": args.steps}), **fields)


def run(args) -> int:
    t0 = time.perf_counter()
    out = output_folder(args.out, create=False)
    if args.truth is not None and args.true_poses is None:
        raise InputError("--truth needs --true-poses (the map is aligned to the truth through the poses)")
    for f, flag in ((args.truth, "--truth"), (args.true_poses, "--true-poses")):
        if f is not None and not f.exists():
            raise InputError(f"{f}: no such file ({flag})")
    ds = ParticleDataset.from_file(args.particles, datadir=args.datadir)
    md = ds.metadata
    if len(md) == 0:
        raise InputError(f"{args.particles}: no particles")
    settings = _settings(args, len(md))
    px = float(md.pixel_size)
    truth = tmd = None
    if args.true_poses is not None:
        from ..data._sources import read_particles

        tmd = read_particles(args.true_poses, datadir=args.datadir)
        if tmd.rotations is None or len(tmd) != len(md):
            raise InputError(f"{args.true_poses}: expected poses for the same {len(md)} particles (--true-poses)")
    if args.truth is not None:
        vol, tpx = read_volume(args.truth, TRUTH)[:2]  # checked: finite, cubic, pixel size
        truth = prepare_reference(vol, tpx, md.box, px)

    def warn(msg):
        print(f"jaxcryo abinitio: warning: {msg}", file=sys.stderr)

    try:  # the library checks the particles (stacks, finite images) before it writes anything
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = abinitio(ds, settings, progress=not args.quiet, truth=truth,
                           true_rotations=None if tmd is None else tmd.rotations, devices=args.devices,
                           checkpoint=out / "checkpoint", resume=args.resume, warn=warn)
    except KeyboardInterrupt:
        print(f"jaxcryo abinitio: interrupted; continue with --resume ({out / 'checkpoint'}.npz)", file=sys.stderr)
        return 130
    used = res.metadata
    if tmd is not None and res.indices is not None:  # --skip-bad left some out
        tmd = tmd.subset(res.indices)
    write_star(out / "particles.star", used)
    summary = {"particles": len(md), "steps": settings.steps, "final_frequency_limit_shell": res.final_kmax,
               "final_resolution_limit": md.box * px / res.final_kmax,
               "mean_final_score": float(np.mean(res.scores)), "initial_step_size": res.eta0,
               "abinitio_seconds": res.seconds}
    if res.skipped:
        summary.update(particles_used=len(used), skipped_bad_images=res.skipped)
    metrics = None
    if tmd is not None:
        if truth is not None:
            metrics = truth_metrics(res.volume, np.asarray(used.rotations), truth, np.asarray(tmd.rotations), px,
                                    used.shifts, tmd.shifts)
        else:
            a = align_rotations(np.asarray(used.rotations), np.asarray(tmd.rotations), mirror=True)
            metrics = {"pose_error_median_deg": float(a.median_deg), "pose_error_mean_deg": float(a.mean_deg),
                       "mirrored": bool(a.mirrored)}
    keys = ("resolution_limit", "mean_best_score", "mean_pose_change_deg", "fsc05_truth_shell", "pose_error_median_deg")
    summary["wall_seconds"] = time.perf_counter() - t0
    write_outputs(out, pixel_size=px, maps={"map.mrc": res.volume}, history=res.history,
                  convergence=ConvergencePlot({"ab initio": res.history}, x_keys=("step",), y_keys=keys,
                                              title="ab initio per minibatch step"),
                  run={"command": "abinitio", "argv": sys.argv, "settings": dataclasses.asdict(settings),
                       "handedness": HANDEDNESS, "devices": res.devices, "devices_requested": args.devices,
                       "summary": summary, "truth_metrics": metrics},
                  files=OutputFiles(convergence="abinitio.png"))
    msg = (f"jaxcryo abinitio: {len(used)} particles, {settings.steps} steps, {summary['wall_seconds']:.0f} s; "
           f"map low-pass at {summary['final_resolution_limit']:.1f} A (hand undetermined)")
    if metrics is not None and "fsc05_shell" in metrics:
        hand = ", mirrored" if metrics["mirrored"] else ""
        msg += f"; vs truth (aligned{hand}) FSC 0.5: {metrics['resolution_05']:.1f} A"
    if metrics is not None:
        msg += f"; pose error median {metrics['pose_error_median_deg']:.1f} deg"
    print(msg + f" -> {out}/map.mrc, {out}/particles.star")
    return 0
