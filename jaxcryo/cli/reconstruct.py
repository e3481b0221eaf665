"""``jaxcryo reconstruct``: particles with known poses in, gold-standard map out."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from ..parallel import _distributed as distributed
from ..errors import InputError
from ..io.atomic import atomic_write_text
from ..io.mrc import read_map, write_map
from ..forward._operators import OPERATOR_NAMES, operator_name
from ..plotting import plot_convergence, plot_fsc, preload
from ..solvers._reconstruct import DEFAULTS, OPTIMIZERS, reconstruct
from ..data._sources import ParticleDataset
from ..solvers._spectral import PRIORS
from ..solvers._strategies import OnePassStrategy, make_strategy


def register(sub) -> None:
    p = sub.add_parser(
        "reconstruct",
        help="reconstruct a map from particles with known poses (RELION .star or cryoSPARC .cs)",
        description=(
            "Known-pose regularised least-squares reconstruction. Writes DIR/map.mrc, half1.mrc, half2.mrc, "
            "fsc.json, fsc.png, history.json, convergence.png, run.json and (minibatch optimisers) "
            "checkpoint.npz/.json. Defaults, chosen by measurement against RELION's relion_reconstruct on "
            "ASPIRE-simulated sets (benchmarks/README.md): the one-pass Wiener filter (backproject) with "
            "trilinear slices and the spectral prior estimated from the half-map FSC (--prior fsc, RELION's "
            "tau^2): it reaches RELION's FSC-0.5 shell on both sets in one pass over the data. The iterative "
            "optimisers (psgd = SGD preconditioned by the Hessian diagonal, sgd, adam, cg) minimise the same "
            "objective; with trilinear slices its optimum fits noise that the interpolation cannot represent "
            "and measured one to four shells worse, so they are for other operators and models (cg with "
            "--interp nufft uses the Toeplitz normal operator: FFTs only per iteration)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("particles", type=Path, help="particles (.star or .cs)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULTS["optimizer"])
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="passes over the data (cg: iterations)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=None,
                   help="step size (default: 1/lambda_max of the (preconditioned) Hessian, measured)")
    p.add_argument("--interp", choices=OPERATOR_NAMES, default=operator_name(DEFAULTS["interp"]),
                   help="slice operator")
    p.add_argument("--probes", type=int, default=DEFAULTS["probes"],
                   help="Hutchinson probes per step (psgd); 0 = exact Hessian diagonal")
    p.add_argument("--prior", choices=tuple(PRIORS), default=DEFAULTS["prior"],
                   help="regulariser: fsc = spectral (Wiener/MAP) prior with the signal power per shell estimated "
                        "from the half-map FSC as RELION does (SNR = FSC/(1-FSC)); tikhonov = --lambda only "
                        "(the paper's objective with --lambda 1e-8)")
    p.add_argument("--lambda", dest="lam", type=float, default=DEFAULTS["lam"],
                   help="Tikhonov weight (with --prior fsc: of the one-pass estimate the prior is measured on, "
                        "and the prior's floor)")
    p.add_argument("--box", type=int, default=None, help="Fourier-crop the images to this box")
    p.add_argument("--datadir", type=Path, default=None, help="folder holding the stacks")
    p.add_argument("--apix", type=float, default=None, help="pixel size (A) when the files lack one")
    p.add_argument("--poses", type=Path, default=None, help="cryoDRGN pose pickle overriding the poses")
    p.add_argument("--reference", type=Path, default=None, help="reference map: FSC against it each epoch")
    p.add_argument("--no-halfmaps", dest="halfmaps", action="store_false", help="skip the half maps")
    p.add_argument("--mask", action="store_true", help="soft spherical mask for the FSCs")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.npz")
    p.add_argument("--skip-bad", action="store_true", help="skip images with NaN/inf instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--platform", choices=("cpu", "gpu"), default=None, help="JAX platform (default: what JAX finds)")
    p.add_argument("--devices", type=int, default=None,
                   help="devices to split each minibatch step over (default: all JAX sees; with several "
                        "processes, the total over all of them); --batch-size "
                        "is the global batch. The one-pass optimisers (backproject, cg) run on one device. On "
                        "CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices (sharing the "
                        "cores)")
    p.add_argument("--prefetch", type=int, default=1,
                   help="minibatches read ahead from disk by a background thread while a step computes (minibatch "
                        "optimisers; 0 = off). The result does not depend on it")
    add_distributed_flags(p)
    p.set_defaults(func=run)


def add_distributed_flags(p) -> None:
    """``--coordinator``, ``--num-processes``, ``--process-id``: a multi-process run (jaxcryo.parallel)."""
    g = p.add_argument_group(
        "several processes (hosts)",
        "every process runs the same command with its own --process-id; the devices of all of them form one "
        "mesh (--devices counts them all), each process reads its share of every batch, and process 0 writes "
        "the outputs. Not with --optimizer cg")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address and a free port (default: $JAX_COORDINATOR_ADDRESS; 'auto': JAX's "
                        "Slurm / Open MPI / mpi4py detection)")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the run (default: $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None,
                   help="this process's id, 0 to num-processes - 1 (default: $JAX_PROCESS_ID)")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("jaxcryo", "jax", "jaxlib", "optax", "equinox", "jax-finufft", "mrcfile", "starfile", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def run(args) -> int:
    t0 = time.perf_counter()
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)  # before JAX starts: no-op alone
    processes, rank = distributed.process_count(), distributed.process_index()
    strategy = make_strategy(args.optimizer)
    if processes > 1 and isinstance(strategy, OnePassStrategy) and not strategy.sharded:  # CG
        raise InputError(f"--optimizer {args.optimizer} with {processes} processes: {type(strategy).__name__} is not "
                         "split across devices or processes; "
                         "use --optimizer backproject, psgd, sgd or adam, or run it in one process")
    preload()  # matplotlib's import overlaps with the reconstruction
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; --out needs a folder (new or existing)")
    ds = ParticleDataset.from_file(args.particles, datadir=args.datadir, apix=args.apix, poses=args.poses)
    md = ds.metadata
    if md.rotations is None:
        why = md.missing_poses or "rlnAngleRot/rlnAngleTilt/rlnAnglePsi"
        raise InputError(f"{args.particles}: no poses ({why}); known-pose reconstruction needs them "
                         "(or give --poses POSES.pkl)")
    if md.mixed_optics and args.box is None:
        raise InputError(f"{args.particles}: optics groups have different pixel sizes or boxes; "
                         "give --box to bring them to one box")
    px_all = md.pixel_size_per_particle
    if args.box is not None and px_all is not None and len(set(np.round(np.asarray(px_all), 6))) > 1:
        raise InputError(f"{args.particles}: optics groups have different pixel sizes "
                         f"({', '.join(f'{p:g}' for p in sorted(set(np.round(np.asarray(px_all), 4))))} A); "
                         "rescaling each group to a common pixel size is not implemented yet, "
                         "select one pixel size (one optics group) per run")
    ds.validate(check_images=True)
    indices = np.arange(len(md))
    bad = ds.find_bad_images()
    if bad.any():
        if not args.skip_bad:
            first = int(np.flatnonzero(bad)[0])
            raise InputError(f"{md.image_files[first]}: {int(bad.sum())} image(s) contain NaN/inf "
                             f"(first: image {int(md.image_indices[first]) + 1}); use --skip-bad to skip them")
        indices = np.flatnonzero(~bad)
        if not args.quiet:
            print(f"skipping {int(bad.sum())} image(s) with NaN/inf", file=sys.stderr)
    if len(indices) == 0:
        raise InputError(f"{args.particles}: the selection is empty")
    if args.box is not None and args.box > md.box:
        raise InputError(f"--box {args.box} is larger than the images ({md.box} px)")
    reference = None
    if args.reference is not None:
        if not args.reference.exists():
            raise InputError(f"{args.reference}: no such file")
        reference, _ = read_map(args.reference)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    if rank > 0:  # process 0 writes the outputs; each other process checkpoints into its own folder (--resume)
        (out / f"process{rank}").mkdir(exist_ok=True)
        ckpt = out / f"process{rank}" / "checkpoint"
    if args.resume and not ckpt.with_suffix(".npz").exists():
        raise InputError(f"{ckpt}.npz: no checkpoint to resume from (--resume)")
    try:
        res = reconstruct(
            ds, optimizer=args.optimizer, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            interp=args.interp, probes=args.probes, lam=args.lam, prior=args.prior, box=args.box, halfmaps=args.halfmaps,
            reference=reference, mask=args.mask, seed=args.seed, progress=not args.quiet,
            checkpoint_path=ckpt, resume=args.resume, indices=indices, devices=args.devices,
            prefetch=args.prefetch,
        )
    except KeyboardInterrupt:
        done = ckpt.with_suffix(".npz").exists()
        msg = f"interrupted; continue with --resume ({ckpt}.npz)" if done else "interrupted"
        print(f"jaxcryo reconstruct: {msg}", file=sys.stderr)
        return 130
    if rank > 0:
        return 0
    px = res.pixel_size
    write_map(out / "map.mrc", res.volume, px)
    if res.half1 is not None:
        write_map(out / "half1.mrc", res.half1, px)
        write_map(out / "half2.mrc", res.half2, px)
    fsc = res.fsc_half.to_dict() if res.fsc_half is not None else {
        "resolution_0143": None, "resolution_05": None, "frequency": [], "fsc": []}
    if res.fsc_ref is not None:
        fsc["reference"] = res.fsc_ref.to_dict()
    _write_json(out / "fsc.json", fsc)
    curves = {}
    if res.fsc_half is not None:
        curves["half maps"] = res.fsc_half
    if res.fsc_ref is not None:
        curves["map vs reference"] = res.fsc_ref
    if curves:
        plot_fsc(curves, out / "fsc.png", title=f"FSC ({args.optimizer})")
    _write_json(out / "history.json", res.history)
    plot_convergence({args.optimizer: res.history}, out / "convergence.png")
    devices = [str(d) for d in jax.devices()]
    _write_json(out / "run.json", {
        "command": "reconstruct", "argv": sys.argv, "particles": str(args.particles),
        "config": res.config, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                       if k != "func"},
        "n_particles_used": int(len(indices)), "prior": res.prior, "versions": _versions(), "device": devices,
        "devices": res.devices, "processes": processes,
        "devices_requested": args.devices if args.devices is not None else len(devices),
        **({} if res.devices > 1 or args.optimizer != "cg" or args.devices in (None, 1) else {
            "devices_note": "cg is not sharded: it ran on one device"}),
        "wall_seconds": time.perf_counter() - t0,
    })
    wall = time.perf_counter() - t0
    parts = []
    if res.fsc_half is not None:
        parts.append(f"half-map FSC 0.143: {res.fsc_half.resolution_0143:.2f} A, 0.5: {res.fsc_half.resolution_05:.2f} A")
    if res.fsc_ref is not None:
        parts.append(f"vs reference 0.5: {res.fsc_ref.resolution_05:.2f} A")
    skipped = len(md) - len(indices)
    print(f"jaxcryo reconstruct: {len(indices)} particles"
          + (f" ({skipped} skipped: NaN/inf)" if skipped else "") + f", {args.optimizer}, {wall:.1f} s; "
          + ("; ".join(parts) if parts else "no FSC") + f" -> {out}/map.mrc")
    return 0
