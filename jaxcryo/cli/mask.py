"""``jaxcryo mask``: a soft solvent mask from a map (low-pass, threshold, extension, raised-cosine edge), as
RELION's ``relion_mask_create``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..ndimage._masks import MASK_EXTEND_PX, MASK_LOWPASS_A, MASK_SOFT_EDGE_PX


def register(sub) -> None:
    p = sub.add_parser("mask", help="soft solvent mask from a map (as relion_mask_create)",
                       description="Soft mask from a map: low-pass filter it, binarise at a threshold, extend the "
                                   "binary mask by some pixels and add a raised-cosine soft edge (RELION's "
                                   "relion_mask_create, with its GUI job's defaults). Writes an MRC with values "
                                   "in [0, 1] and the map's pixel size.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("map", type=Path, help="input map (MRC), e.g. the average of the half maps")
    p.add_argument("--out", type=Path, required=True, help="output mask (MRC)")
    p.add_argument("--lowpass", type=float, default=MASK_LOWPASS_A,
                   help="low-pass filter the map at this resolution (Å) before binarising; 0: none")
    p.add_argument("--threshold", type=float, default=None,
                   help="binarisation threshold (map units); default: from the map's statistics (solvent mean "
                        "+ max(5 solvent SD, 10%% of the way to the maximum), on the filtered map)")
    p.add_argument("--extend", type=float, default=MASK_EXTEND_PX,
                   help="extend the binary mask by this many pixels (negative: shrink)")
    p.add_argument("--soft-edge", type=float, default=MASK_SOFT_EDGE_PX,
                   help="width of the raised-cosine soft edge (pixels)")
    p.add_argument("--apix", type=float, default=None, help="pixel size (Å); overrides the map's header")
    p.set_defaults(func=run)


def run(args) -> int:
    import math

    from ..errors import InputError
    from ..io import MAP, read_volume, write_map
    from ..ndimage._masks import auto_mask, auto_threshold, low_pass

    if args.apix is not None and not args.apix > 0:
        raise InputError(f"--apix must be > 0, got {args.apix}")
    if not args.lowpass >= 0:  # NaN too
        raise InputError(f"--lowpass must be >= 0 Å (0: no filter), got {args.lowpass}")
    if not args.soft_edge >= 0:  # NaN too
        raise InputError(f"--soft-edge must be >= 0 pixels, got {args.soft_edge}")
    if not math.isfinite(args.extend):
        raise InputError(f"--extend must be a finite number of pixels, got {args.extend}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise InputError(f"--threshold must be a finite number, got {args.threshold}")
    vol, px = read_volume(args.map, MAP)[:2]  # finite, cubic 3D, a valid pixel size: or one line naming the file
    px = args.apix if args.apix is not None else px
    if not px:
        raise InputError(f"{args.map}: no pixel size in the header; give --apix")
    threshold = args.threshold
    if threshold is None:
        threshold = auto_threshold(low_pass(vol, px, args.lowpass) if args.lowpass else vol)
    try:
        mask = auto_mask(vol, px, lowpass=args.lowpass or None, threshold=threshold, extend=args.extend,
                         soft_edge=args.soft_edge)
    except InputError as e:
        raise InputError(f"{args.map}: {e}") from None
    write_map(args.out, mask, px)
    print(f"threshold {threshold:.4g}; {float((mask > 0.5).mean()) * 100:.1f}% of the box above 0.5; "
          f"wrote {args.out}")
    return 0
