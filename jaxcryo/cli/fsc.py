"""``jaxcryo fsc``: Fourier shell correlation of two maps and the resolution at 0.143 and 0.5."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("fsc", help="FSC between two maps; prints the 0.143 and 0.5 resolutions",
                       description="Fourier shell correlation of two cubic maps of the same box (shells one "
                                   "Fourier voxel wide, up to Nyquist). Prints the resolutions where the curve "
                                   "first falls below 0.143 and 0.5.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("map1", type=Path, help="first map (MRC); its pixel size is used")
    p.add_argument("map2", type=Path, help="second map (MRC), same box and pixel size as map1")
    p.add_argument("--json", type=Path, default=None,
                   help="write {resolution_0143, resolution_05, frequency, fsc} as JSON")
    p.add_argument("--plot", type=Path, default=None, help="write the curve as a PNG")
    p.add_argument("--mask", action="store_true", help="apply a soft spherical mask (radius 0.4 box)")
    p.add_argument("--mask-radius", type=float, default=None, help="mask radius in pixels (implies --mask)")
    p.add_argument("--apix", type=float, default=None,
                   help="pixel size (Å) of both maps; overrides their headers (required if map1 has none)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import InputError
    from ..io.atomic import atomic_write_text
    from ..io._validate import COMPARED, check_values, read_volume, require_same_grid
    from ..ndimage._metrics import fsc, soft_sphere_mask
    from ..plotting import plot_fsc

    if args.apix is not None and not args.apix > 0:
        raise InputError(f"--apix must be > 0, got {args.apix}")
    if args.mask_radius is not None and not args.mask_radius > 0:
        raise InputError(f"--mask-radius must be > 0 pixels, got {args.mask_radius}")
    # the grids first (a box mismatch names both files), then each map's values
    first, second = read_volume(args.map1, COMPARED, values=False), read_volume(args.map2, COMPARED, values=False)
    require_same_grid(first, second, pixel_size=args.apix is None)  # --apix: the user's pixel size for both
    for vol in (first, second):
        check_values(vol.data, vol.label, COMPARED)
    a, b, pa = first.data, second.data, first.pixel_size
    px = args.apix if args.apix is not None else pa
    if not px:
        raise InputError(f"{args.map1}: no pixel size in the header; give --apix")
    use_mask = args.mask or args.mask_radius is not None
    mask = soft_sphere_mask(a.shape[0], args.mask_radius) if use_mask else None
    r = fsc(a, b, pixel_size=px, mask=mask)
    print(f"FSC=0.143: {r.resolution_0143:.2f} Å   FSC=0.5: {r.resolution_05:.2f} Å")
    if args.json:
        atomic_write_text(args.json, json.dumps(r.to_dict(), indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        title = f"FSC, pixel {px:.4g} Å" + (", soft spherical mask" if use_mask else "")
        plot_fsc({f"{args.map1.name} vs {args.map2.name}": r}, args.plot, title=title)
        print(f"wrote {args.plot}")
    return 0
