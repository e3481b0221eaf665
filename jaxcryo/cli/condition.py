"""``jaxcryo condition``: condition number of the reconstruction Hessian with and without the diagonal
preconditioner, against box size (see :mod:`jaxcryo.leastsq`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..leastsq._conditioning import condition_report
from ..errors import InputError
from ..io.atomic import atomic_write_text
from ..leastsq._linalg import LANCZOS_ITERS
from ..forward._operators import OPERATORS, Trilinear, operator_name
from ..plotting import plot_condition

#: ``--interp`` choices: the registered operators that can have a local stencil (assembled Hessian, exact D).
INTERP_CHOICES = tuple(name for name, cls in OPERATORS.items() if cls.local_capable)


def register(sub) -> None:
    p = sub.add_parser(
        "condition",
        help="kappa(H) and kappa(D^-1 H) of the known-pose Hessian per box size",
        description="Extreme eigenvalues (Lanczos, inside the Fourier ball of radius N/2) of the Hessian H of "
                    "the least-squares loss for uniformly random poses, with and without the diagonal "
                    "preconditioner D (exact diagonal, thresholded as the optimiser does), and the paper's "
                    "predicted growth with the box size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--box", type=int, nargs="+", default=[16, 32, 64], help="box sizes N")
    p.add_argument("--n-poses", type=int, default=2000, help="number of uniformly random poses")
    p.add_argument("--interp", choices=INTERP_CHOICES, default=operator_name(Trilinear()), help="slice operator")
    p.add_argument("--ctf", action="store_true", help="random CTFs (defocus 1-2.5 um, 300 kV, 3 A/px)")
    p.add_argument("--seed", type=int, default=0, help="seed of the poses, CTFs and Lanczos start vectors")
    p.add_argument("--lanczos-iters", type=int, default=None,
                   help="maximum Lanczos iterations per operator (stops earlier once converged); "
                        "default: the library's")
    p.add_argument("--lam", type=float, default=0.0, help="Tikhonov weight added to H")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--plot", type=Path, default=None, help="write kappa against box (log-log) as a PNG")
    p.set_defaults(func=run)


def _finite(x):
    return x if (x is None or math.isfinite(x)) else None


def run(args) -> int:
    if any(b < 4 for b in args.box):
        raise InputError(f"--box: sizes must be at least 4, got {args.box}")
    if args.n_poses < 1:
        raise InputError(f"--n-poses must be positive, got {args.n_poses}")
    iters = LANCZOS_ITERS if args.lanczos_iters is None else args.lanczos_iters
    if iters < 2:
        raise InputError(f"--lanczos-iters must be at least 2, got {iters}")
    if args.lam < 0:
        raise InputError(f"--lam must be non-negative, got {args.lam}")

    print(f"{'box':>5} {'kappa(H)':>12} {'kappa(D^-1 H)':>14} {'predicted':>10}")

    def progress(n, kh, kp, kpred):
        print(f"{n:>5} {kh:>12.1f} {kp:>14.2f} {kpred:>10.1f}", flush=True)

    rep = condition_report(args.box, n_poses=args.n_poses, method=args.interp, ctf=args.ctf, seed=args.seed,
                           lam=args.lam, lanczos_iters=iters, progress=progress)
    bad = [b for b, k in zip(rep["box"], rep["kappa_H"]) if not math.isfinite(k)]
    if bad:
        print(f"note: lambda_min(H) <= 0 at box {bad} (voxels no slice touches); try --lam", file=sys.stderr)
    if args.json:
        out = {k: ([_finite(v) for v in rep[k]] if k != "settings" else rep[k]) for k in
               ("box", "kappa_H", "kappa_DinvH", "kappa_predicted", "settings")}
        atomic_write_text(args.json, json.dumps(out, indent=1, allow_nan=False))
    if args.plot:
        plot_condition(rep, args.plot)
    return 0
