"""``jaxcryo condition``: condition numbers of the Hessian with and without the diagonal preconditioner."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "condition",
        help="condition number of the Hessian, with and without the preconditioner, per box size",
        description=(
            "Lanczos estimates of kappa(H) and kappa(D^-1 H) inside the Fourier ball of radius N/2 for "
            "uniform random poses, D = the exact Hessian diagonal thresholded as the optimiser uses it, and "
            "the paper's predicted kappa. Defaults: trilinear slices, 2000 poses, no CTF."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--box", type=int, nargs="+", default=[16, 32, 64], help="box sizes")
    p.add_argument("--n-poses", type=int, default=2000, help="number of uniform random poses")
    p.add_argument("--interp", choices=("trilinear", "nearest"), default="trilinear")
    p.add_argument("--ctf", action="store_true", help="random CTFs (defocus 1-2.5 um, 300 kV, 3 A/px)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.0, help="Tikhonov weight added to H")
    p.add_argument("--lanczos-iters", type=int, default=100, help="Lanczos iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--plot", type=Path, default=None, help="write kappa vs box as a PNG")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..conditioning import condition_report
    from ..errors import InputError
    from ..io.atomic import atomic_write_text

    if any(b < 4 for b in args.box):
        raise InputError(f"--box {args.box}: every box must be at least 4")
    r = condition_report(args.box, n_poses=args.n_poses, method=args.interp, ctf=args.ctf, seed=args.seed,
                         lam=args.lam, lanczos_iters=args.lanczos_iters)
    print(f"{'box':>5} {'kappa(H)':>12} {'kappa(D^-1 H)':>14} {'predicted':>10}")
    for b, k1, k2, kp in zip(r["box"], r["kappa_H"], r["kappa_DinvH"], r["kappa_predicted"]):
        print(f"{b:>5} {k1:>12.1f} {k2:>14.1f} {kp:>10.1f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(r, indent=1))
    if args.plot:
        plot_kappa(r, args.plot)
    return 0


def plot_kappa(r: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import os

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog(r["box"], r["kappa_H"], "o-", label="κ(H) measured")
    ax.loglog(r["box"], r["kappa_DinvH"], "s-", label="κ(D⁻¹H) measured")
    ax.loglog(r["box"], r["kappa_predicted"], "k--", label="predicted (paper's bound)")
    ax.set_xlabel("box size N")
    ax.set_ylabel("condition number")
    ax.set_xticks(r["box"])
    ax.set_xticklabels([str(b) for b in r["box"]])
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    s = r["settings"]
    ax.set_title(f"{s['interp']}, {s['n_poses']} poses, CTF {'on' if s['ctf'] else 'off'}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    plt.close(fig)
