"""``jaxcryo postprocess``: masked, phase-randomisation-corrected FSC, B-factor sharpening, FSC weighting and
low-pass of two half maps, as RELION's ``relion_postprocess``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..post._postprocess import FIT_FROM, FIT_TO


def register(sub) -> None:
    p = sub.add_parser("postprocess", help="masked corrected FSC, B-factor sharpening (as relion_postprocess)",
                       description="Post-process two half maps as RELION 3.1's relion_postprocess: FSC unmasked, "
                                   "masked, phase-randomised masked and corrected (Chen et al. 2013); B-factor "
                                   "from a Guinier fit (Rosenthal & Henderson 2003) or given; FSC weighting; "
                                   "low-pass at the corrected FSC-0.143 resolution. Writes postprocess.mrc, "
                                   "postprocess_masked.mrc, postprocess.json, fsc.png and guinier.png in --out.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("half1", type=Path, help="first half map (MRC); its pixel size is used")
    p.add_argument("half2", type=Path, help="second half map (MRC), same box and pixel size")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--mask", type=Path, default=None, help="solvent mask (MRC, values in [0, 1], same box)")
    m.add_argument("--auto-mask", action="store_true",
                   help="make the mask from the half-map average with `jaxcryo mask`'s defaults (written as "
                        "mask.mrc in --out)")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--bfactor", type=float, default=None,
                   help="apply this B-factor (Å², negative sharpens; 0: none) instead of fitting one")
    b.add_argument("--auto-bfactor", action="store_true",
                   help="fit the B-factor on the Guinier plot (the default when --bfactor is not given)")
    p.add_argument("--fit-from", type=float, default=FIT_FROM, help="lowest resolution (Å) of the B-factor fit")
    p.add_argument("--fit-to", type=float, default=FIT_TO,
                   help="highest resolution (Å) of the B-factor fit; 0: every shell with signal (as RELION)")
    p.add_argument("--low-pass", type=float, default=None,
                   help="low-pass the final map at this resolution (Å); default: the corrected FSC-0.143 "
                        "resolution; 0: none")
    p.add_argument("--force-mask", action="store_true",
                   help="keep the mask-corrected FSC even where the unmasked FSC reaches a higher shell (by default "
                        "the unmasked FSC is used then, as RELION)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phase randomisation")
    p.add_argument("--apix", type=float, default=None, help="pixel size (Å); overrides the half maps' headers")
    p.set_defaults(func=run)


def write_outputs(result, out_dir, extra: dict | None = None, plot_prefix: str = "") -> list[Path]:
    """Everything ``jaxcryo postprocess`` writes into ``out_dir`` for a
    :class:`jaxcryo.post.PostprocessResult`: the maps and JSON (:func:`jaxcryo.post.write_postprocess`) and
    ``fsc.png``, ``guinier.png`` (:func:`jaxcryo.plotting.plot_postprocess`; ``plot_prefix`` before their
    names, e.g. ``"postprocess_"`` beside another command's ``fsc.png``). Returns the paths."""
    from ..plotting import plot_postprocess
    from ..post import write_postprocess

    return write_postprocess(result, out_dir, extra) + plot_postprocess(result, out_dir, plot_prefix)


def read_half_maps(path1: Path, path2: Path, apix: float | None):
    """(half1, half2, pixel size) from two MRC files, the half maps as checked :class:`jaxcryo.io.Volume` objects;
    InputError naming the file for non-finite or non-cubic maps, different boxes or pixel sizes, or no pixel
    size."""
    from ..errors import InputError
    from ..io import HALF_MAP, read_volume, require_same_grid

    h1, h2 = read_volume(path1, HALF_MAP), read_volume(path2, HALF_MAP)
    require_same_grid(h1, h2, pixel_size=apix is None)  # --apix states the pixel size of both
    px = apix if apix is not None else h1.pixel_size
    if not px:
        raise InputError(f"{path1}: no pixel size in the header; give --apix")
    return h1._replace(pixel_size=px), h2._replace(pixel_size=px), px


def run(args) -> int:
    import warnings

    from ..errors import InputError
    from ..io import MASK, read_volume, require_same_grid, write_map
    from ..ndimage._masks import auto_mask
    from ..plotting import preload
    from ..post import check_half_maps, postprocess

    preload()
    if args.apix is not None and not args.apix > 0:
        raise InputError(f"--apix must be > 0, got {args.apix}")
    if args.fit_from <= 0 or args.fit_to < 0 or (args.fit_to and args.fit_to >= args.fit_from):
        raise InputError(f"--fit-from must be > --fit-to >= 0 Å, got {args.fit_from} and {args.fit_to}")
    if args.low_pass is not None and args.low_pass < 0:
        raise InputError(f"--low-pass must be >= 0 Å, got {args.low_pass}")
    h1, h2, px = read_half_maps(args.half1, args.half2, args.apix)
    a, b = h1.data, h2.data
    mask = None
    if args.mask is not None:
        m = read_volume(args.mask, MASK)  # in [0, 1], not empty, finite
        require_same_grid(h1, m, pixel_size=args.apix is None)
        mask = m.data
    names = (str(args.half1), str(args.half2), str(args.mask))
    checked = check_half_maps(a, b, mask, names=names)  # one line naming the file at fault
    if args.auto_mask:
        try:
            mask = auto_mask(0.5 * (checked[0] + checked[1]), px)
        except InputError as e:
            raise InputError(f"{args.half1}, {args.half2}: automatic mask: {e}") from None
        args.out.mkdir(parents=True, exist_ok=True)
        write_map(args.out / "mask.mrc", mask, px)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = postprocess(a, b, pixel_size=px, mask=mask, bfactor=args.bfactor, fit_from=args.fit_from,
                             fit_to=args.fit_to, low_pass=args.low_pass, force_mask=args.force_mask,
                             seed=args.seed)
    for w in caught:
        print(f"jaxcryo postprocess: warning: {w.message}", file=sys.stderr)
    extra = {"half1": str(args.half1), "half2": str(args.half2),
             "mask": str(args.out / "mask.mrc") if args.auto_mask else (str(args.mask) if args.mask else None)}
    paths = write_outputs(result, args.out, extra)
    fit = (f" (fit {result.fit_from:.2f}-{result.fit_to:.2f} Å)" if result.bfactor_fitted else "")
    print(f"corrected FSC=0.143: {result.resolution_0143:.2f} Å   FSC=0.5: {result.resolution_05:.2f} Å   "
          f"B-factor {result.bfactor:.1f} Å²{fit}")
    print("wrote " + ", ".join(p.name for p in paths) + f" in {args.out}")
    return 0
