"""``jaxcryo reconstruct``: particles with known poses in, gold-standard map out."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

from ..parallel import _distributed as distributed
from ..io.outputs import ConvergencePlot, fsc_json, output_folder, versions, write_outputs
from ..forward._operators import OPERATOR_NAMES, operator_name
from ..plotting import preload
from ..solvers._reconstruct import DEFAULTS, OPTIMIZERS, reconstruct
from ..solvers._reconstruct_settings import ReconstructSettings
from ..data._sources import ParticleDataset
from ..solvers._spectral import PRIORS


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


def settings_from_args(args) -> ReconstructSettings:
    """The :class:`ReconstructSettings` of the parsed flags (each setting's flag has its name as ``dest``)."""
    return ReconstructSettings(**{name: getattr(args, name) for name in ReconstructSettings.names()})


def run(args) -> int:
    t0 = time.perf_counter()
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)  # before JAX starts: no-op alone
    processes, rank = distributed.process_count(), distributed.process_index()
    settings = settings_from_args(args)
    preload()  # matplotlib's import overlaps with the reconstruction
    out = output_folder(args.out, create=False)
    ds = ParticleDataset.from_file(args.particles, datadir=args.datadir, apix=args.apix, poses=args.poses)
    ckpt = out / "checkpoint"
    if rank > 0:  # process 0 writes the outputs; each other process checkpoints into its own folder (--resume)
        ckpt = out / f"process{rank}" / "checkpoint"

    def warn(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr)

    try:
        res = reconstruct(ds, settings, reference=args.reference, progress=not args.quiet, checkpoint_path=ckpt,
                          resume=args.resume, warn=warn)
    except KeyboardInterrupt:
        done = ckpt.with_suffix(".npz").exists()
        msg = f"interrupted; continue with --resume ({ckpt}.npz)" if done else "interrupted"
        print(f"jaxcryo reconstruct: {msg}", file=sys.stderr)
        return 130
    if rank > 0:
        return 0
    used = res.config["n_particles"]
    curves = {"half maps": res.fsc_half, "map vs reference": res.fsc_ref}
    devices = [str(d) for d in jax.devices()]
    run_record = {
        "command": "reconstruct", "argv": sys.argv, "particles": str(args.particles),
        "config": res.config, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                       if k != "func"},
        "n_particles_used": int(used), "prior": res.prior, "versions": versions(), "device": devices,
        "devices": res.devices, "processes": processes,
        "devices_requested": args.devices if args.devices is not None else len(devices),
        **({} if res.devices > 1 or args.optimizer != "cg" or args.devices in (None, 1) else {
            "devices_note": "cg is not sharded: it ran on one device"}),
    }
    write_outputs(out, pixel_size=res.pixel_size,
                  maps={"map.mrc": res.volume, "half1.mrc": res.half1, "half2.mrc": res.half2},
                  fsc=fsc_json(res.fsc_half, res.fsc_ref), fsc_curves=curves, fsc_title=f"FSC ({args.optimizer})",
                  history=res.history, convergence=ConvergencePlot({args.optimizer: res.history}),
                  run=dict(run_record, wall_seconds=time.perf_counter() - t0))
    wall = time.perf_counter() - t0
    parts = []
    if res.fsc_half is not None:
        parts.append(f"half-map FSC 0.143: {res.fsc_half.resolution_0143:.2f} A, 0.5: {res.fsc_half.resolution_05:.2f} A")
    if res.fsc_ref is not None:
        parts.append(f"vs reference 0.5: {res.fsc_ref.resolution_05:.2f} A")
    print(f"jaxcryo reconstruct: {used} particles"
          + (f" ({res.skipped} skipped: NaN/inf)" if res.skipped else "") + f", {args.optimizer}, {wall:.1f} s; "
          + ("; ".join(parts) if parts else "no FSC") + f" -> {out}/map.mrc")
    return 0
