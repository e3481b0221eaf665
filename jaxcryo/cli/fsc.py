"""``jaxcryo fsc``: Fourier shell correlation of two maps and the resolution at 0.143 and 0.5."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("fsc", help="FSC between two maps; prints the 0.143 and 0.5 resolutions",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("map1", type=Path)
    p.add_argument("map2", type=Path)
    p.add_argument("--json", type=Path, default=None, help="write the curve and resolutions as JSON")
    p.add_argument("--plot", type=Path, default=None, help="write the curve as a PNG")
    p.add_argument("--mask", action="store_true", help="apply a soft spherical mask (radius 0.4 box)")
    p.add_argument("--mask-radius", type=float, default=None, help="mask radius in pixels (implies --mask)")
    p.add_argument("--apix", type=float, default=None, help="pixel size (A) if the headers lack one")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import InputError
    from ..io.atomic import atomic_write_text
    from ..io.mrc import read_map
    from ..metrics import fsc, soft_sphere_mask
    from ..plotting import plot_fsc

    a, pa = read_map(args.map1)
    b, _ = read_map(args.map2)
    if a.shape != b.shape:
        raise InputError(f"{args.map1} is {a.shape[0]}^3 but {args.map2} is {b.shape[0]}^3; maps must match")
    px = args.apix or pa
    if not px:
        raise InputError(f"{args.map1}: no pixel size in the header; give --apix")
    mask = soft_sphere_mask(a.shape[0], args.mask_radius) if (args.mask or args.mask_radius) else None
    r = fsc(a, b, pixel_size=px, mask=mask)
    print(f"FSC=0.143: {r.resolution_0143:.2f} A   FSC=0.5: {r.resolution_05:.2f} A")
    if args.json:
        atomic_write_text(args.json, json.dumps(r.to_dict(), indent=1))
    if args.plot:
        plot_fsc({f"{args.map1.name} vs {args.map2.name}": r}, args.plot)
    return 0
