"""``jaxcryo simulate``: a synthetic particle set (STAR + MRCS) with its ground-truth map."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..ndimage._fourier import resample_real
from ..io._validate import VOLUME, read_volume
from ..io.outputs import output_folder, write_outputs
from ..io.star import write_star
from ..rotations._rotations import preferred_orientations
from ..data._simulate import perturbed_metadata, simulate, without_poses
from ..data._sources import read_particles, write_dataset


def register(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate a particle set from the built-in phantom or a map",
        description=(
            "Simulate particles with uniform random (or preferred) poses, RELION CTF, random shifts and white "
            "noise. Writes DIR/particles.star (RELION 3.1, rlnOriginXAngst, the true poses), DIR/particles.mrcs "
            "and DIR/ground_truth.mrc; optionally DIR/particles_perturbed.star (poses rotated by --perturb-angle "
            "about random axes, shifts moved by --perturb-shift px) and DIR/particles_noposes.star. Defaults: CTF on with defocus uniform 1-2.5 um, 300 kV, Cs 2.7 mm, "
            "Q0 0.07; 3 A/px; shifts up to 2 px; SNR 0.1."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--box", type=int, default=32, help="box size in pixels")
    p.add_argument("--n-particles", type=int, default=1000, help="number of particles")
    p.add_argument("--snr", type=float, default=0.1,
                   help="mean variance of the clean CTF-modulated images / noise variance ('inf' for none)")
    p.add_argument("--pixel-size", type=float, default=None,
                   help="pixel size in A (default 3.0, or the map's with --volume)")
    p.add_argument("--ctf", dest="ctf", action="store_true", default=True, help="apply a CTF")
    p.add_argument("--no-ctf", dest="ctf", action="store_false", help="no CTF")
    p.add_argument("--max-shift", type=float, default=None, help="max shift per axis in A (default 2 px)")
    p.add_argument("--volume", type=Path, default=None,
                   help="ground-truth map (MRC); Fourier-cropped/padded to --box (default: built-in phantom)")
    p.add_argument("--poses", choices=("uniform", "preferred"), default="uniform",
                   help="pose distribution (preferred: jaxcryo.preferred_orientations)")
    p.add_argument("--perturb-angle", type=float, default=None, metavar="DEG",
                   help="also write particles_perturbed.star: each pose rotated by DEG about a random axis")
    p.add_argument("--perturb-shift", type=float, default=0.0, metavar="PX",
                   help="with --perturb-angle: shifts also moved by PX pixels in a random direction")
    p.add_argument("--remove-poses", action="store_true",
                   help="also write particles_noposes.star (no angles, zero shifts)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.box < 4:
        raise InputError(f"--box {args.box}: expected at least 4 pixels")
    if args.n_particles < 1:
        raise InputError(f"--n-particles {args.n_particles}: expected at least 1")
    if not args.snr > 0:
        raise InputError(f"--snr {args.snr}: expected a positive number")
    if args.pixel_size is not None and not (np.isfinite(args.pixel_size) and args.pixel_size > 0):
        raise InputError(f"--pixel-size {args.pixel_size}: expected a pixel size > 0 Å")
    if args.max_shift is not None and not (np.isfinite(args.max_shift) and args.max_shift >= 0):
        raise InputError(f"--max-shift {args.max_shift}: expected Å >= 0")
    volume = None
    pixel_size = args.pixel_size
    if args.volume is not None:
        vol, px = read_volume(args.volume, VOLUME)[:2]
        if pixel_size is None:
            if not px:
                raise InputError(f"{args.volume}: no pixel size in the header; give --pixel-size")
            pixel_size = float(px) * vol.shape[0] / args.box
        volume = np.asarray(resample_real(vol, args.box, 3), np.float32)
    if pixel_size is None:
        pixel_size = 3.0
    if args.perturb_angle is not None and not (np.isfinite(args.perturb_angle) and 0 <= args.perturb_angle <= 180):
        raise InputError(f"--perturb-angle {args.perturb_angle}: expected degrees in [0, 180]")
    if not (np.isfinite(args.perturb_shift) and args.perturb_shift >= 0):
        raise InputError(f"--perturb-shift {args.perturb_shift}: expected pixels >= 0")
    rots = preferred_orientations(args.seed, args.n_particles) if args.poses == "preferred" else None
    sim = simulate(
        n_particles=args.n_particles, box=args.box, snr=args.snr, pixel_size=pixel_size, ctf=args.ctf,
        max_shift=args.max_shift, volume=volume, seed=args.seed, progress=not args.quiet, rotations=rots,
    )
    out = output_folder(args.out)
    star = write_dataset(out, sim.metadata, sim.images)
    write_outputs(out, pixel_size=pixel_size, maps={"ground_truth.mrc": sim.volume})
    written = read_particles(star)  # the STAR as written (image paths, contrast), to derive the copies from
    if args.perturb_angle is not None:
        write_star(out / "particles_perturbed.star",
                   perturbed_metadata(written, args.perturb_angle, args.perturb_shift, args.seed))
    if args.remove_poses:
        write_star(out / "particles_noposes.star", without_poses(written))
    if not args.quiet:
        print(f"wrote {out}/particles.star, particles.mrcs ({args.n_particles} x {args.box}^2 at "
              f"{pixel_size:.3f} A/px, noise sigma {sim.noise_sigma:.4g}) and ground_truth.mrc")
    return 0
