"""``jaxcryo project``: noise-free images of a map for the poses, shifts and CTF of a particle file."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..ndimage._fourier import resample_real
from ..io._validate import PROJECTED, read_volume, require_extent
from ..io.mrc import write_stack
from ..forward._operators import NUFFT, OPERATOR_NAMES, make_operator, operator_name
from ..data._simulate import project_metadata
from ..data._sources import read_particles


def register(sub) -> None:
    p = sub.add_parser(
        "project",
        help="noise-free projections of a map for a STAR/.cs file's poses, shifts and CTF",
        description=(
            "Project MAP (MRC, or a .npy volume [z,y,x]) with the poses, origins and CTF of PARTICLES and "
            "write an MRC stack. Uses the particle file's pixel size; the map is Fourier-cropped or "
            "zero-padded to the image box if needed (a map whose header pixel size gives another physical "
            "extent than the particles' box is refused)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("map", type=Path, help="map (.mrc/.map or .npy)")
    p.add_argument("particles", type=Path, help="particles (.star or .cs)")
    p.add_argument("--out", required=True, type=Path, help="output stack (.mrcs)")
    p.add_argument("--interp", choices=OPERATOR_NAMES, default=operator_name(NUFFT()),
                   help="slice operator")
    p.add_argument("--oversample", type=int, default=1, help="real-space padding factor (trilinear/nearest)")
    p.add_argument("--gridding", choices=("auto", "on", "off"), default="auto",
                   help="gridding correction of trilinear/nearest (auto: on for trilinear with --oversample > 1)")
    p.add_argument("--datadir", type=Path, default=None, help="folder holding the particle stacks")
    p.add_argument("--apix", type=float, default=None, help="pixel size in A if the files lack one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    md = read_particles(args.particles, datadir=args.datadir, apix=args.apix)
    checked = read_volume(args.map, PROJECTED)
    require_extent(checked, md.box, md.pixel_size, f"the particles in {args.particles}")
    vol = np.asarray(resample_real(checked.data, md.box, 3), np.float32)
    opts = {"oversample": args.oversample} if args.oversample != 1 else {}
    if args.gridding != "auto":
        opts["gridding"] = args.gridding == "on"
    op = make_operator(args.interp, **opts)
    imgs = project_metadata(vol, md, operator=op, progress=not args.quiet)
    write_stack(args.out, imgs, md.pixel_size)
    if not args.quiet:
        print(f"wrote {args.out}: {len(imgs)} images {md.box}x{md.box} at {md.pixel_size:.4g} A/px")
    return 0
