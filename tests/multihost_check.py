"""Run by ``tests/test_multihost.py`` in subprocesses: one process of a multi-process run on localhost, or the
one-process reference. Sets ``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=K``
before JAX is imported, then prints one JSON line ``MULTIHOST_CHECK {...}`` on stdout.

``python tests/multihost_check.py multi STAR OUT --coordinator HOST:PORT --num-processes P --process-id I
--local-devices K``: joins the run (:func:`jaxcryo.parallel._distributed.initialize`), then

* ``api``: :func:`jaxcryo.solvers._fit` (Hutchinson PSGD, trilinear slices) over the mesh of all ``P * K`` devices,
  recording which particles this process read from disk; saves the map to ``OUT/api_multi_p{I}.npy``;
* ``cli``: ``jaxcryo reconstruct STAR --optimizer psgd --coordinator ... --num-processes P --process-id I``
  into ``OUT/cli_multi`` (process 0 writes the outputs; the others their checkpoints only);
* ``backproject``: the same command with the default one-pass optimiser into ``OUT/bp_multi``;
* ``cg``: refused with several processes (exit code 2).

``python tests/multihost_check.py single STAR OUT --local-devices K``: the same ``fit`` on 1 and (``K > 1``) on
``K`` devices (``OUT/api_single_d{n}.npy``) and ``jaxcryo reconstruct --devices 1`` into ``OUT/cli_single`` (psgd) and
``OUT/bp_single`` (backproject).
"""

from __future__ import annotations

import argparse
import os

p = argparse.ArgumentParser()
p.add_argument("mode", choices=("multi", "single"))
p.add_argument("star")
p.add_argument("out")
p.add_argument("--coordinator")
p.add_argument("--num-processes", type=int)
p.add_argument("--process-id", type=int)
p.add_argument("--local-devices", type=int, default=1)
p.add_argument("--timeout", type=int, default=60)
args = p.parse_args()

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={args.local_devices}").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["JAXCRYO_NO_COMPILATION_CACHE"] = "1"

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from jaxcryo.parallel import _distributed as distributed  # noqa: E402

T0 = time.perf_counter()
OUT = Path(args.out)
BATCH, EPOCHS, LAM, SEED = 40, 3, 1e-3, 3


class Recording:
    """A particle source that records the particles read from it (which share this process read)."""

    def __init__(self, source):
        self.source, self.metadata, self.read = source, source.metadata, []

    def __len__(self):
        return len(self.metadata)

    def images(self, idx):
        self.read.append([int(i) for i in np.asarray(idx).ravel()])
        return self.source.images(idx)


def fit_map(mesh, source):
    import jaxcryo as jc

    n = source.metadata.box
    proj = jc.Projector(n=n, pixel_size=float(source.metadata.pixel_size), operator="trilinear")
    opt = jc.preconditioned_sgd(jc.harmonic_schedule(0.5, 4), projector=proj, lam=LAM, n_probes=2)
    res = jc.fit(source, opt, proj, epochs=EPOCHS, batch_size=BATCH, lam=LAM, seed=SEED, mesh=mesh)
    return np.asarray(res.volume_f), [h["loss"] for h in res.history], res


def cli_args(out: Path, optimizer: str = "psgd") -> list[str]:
    extra = ["--epochs", "2", "--lr", "0.5"] if optimizer == "psgd" else []
    return ["--no-compilation-cache", "reconstruct", args.star, "--out", str(out), "--optimizer", optimizer,
            "--batch-size", "30", "--seed", "5", "--quiet"] + extra


def multi() -> dict:
    t = time.perf_counter()
    joined = distributed.initialize(args.coordinator, args.num_processes, args.process_id, timeout=args.timeout)
    import jax

    import jaxcryo as jc
    from jaxcryo import parallel
    from jaxcryo.cli import main

    rep = {"joined": joined, "join_seconds": time.perf_counter() - t, "process_index": jax.process_index(),
           "process_count": jax.process_count(), "device_count": jax.device_count(),
           "local_device_count": jax.local_device_count(),
           "collectives": jax.config.jax_cpu_collectives_implementation}
    mesh = parallel.make_mesh()
    rep["mesh_devices"] = [[d.process_index, d.id] for d in mesh.devices.flat]
    rep["share_of_40"] = [distributed.process_share(40, mesh).start, distributed.process_share(40, mesh).stop]
    src = Recording(jc.ParticleDataset.from_file(args.star))
    vol, losses, res = fit_map(mesh, src)
    np.save(OUT / f"api_multi_p{args.process_id}.npy", vol)
    rep["losses"] = losses
    rep["reads"] = src.read  # one list of particles per batch read (each distinct image once, sorted)
    rep["result_sharding"] = str(res.volume_f.sharding)
    rep["result_fully_addressable"] = bool(res.volume_f.is_fully_addressable)
    rep["seconds_api"] = time.perf_counter() - T0
    flags = ["--coordinator", args.coordinator, "--num-processes", str(args.num_processes),
             "--process-id", str(args.process_id)]
    rep["rc_cli"] = main(cli_args(OUT / "cli_multi") + flags)
    rep["rc_backproject"] = main(cli_args(OUT / "bp_multi", "backproject") + flags)
    rep["rc_cg"] = main(cli_args(OUT / "cg_multi", "cg"))
    return rep


def single() -> dict:
    import jax

    import jaxcryo as jc
    from jaxcryo import parallel
    from jaxcryo.cli import main

    rep = {"device_count": jax.device_count(), "process_count": jax.process_count(), "losses": {}}
    for n in sorted({1, args.local_devices}):
        vol, losses, _ = fit_map(parallel.make_mesh(n), jc.ParticleDataset.from_file(args.star))
        np.save(OUT / f"api_single_d{n}.npy", vol)
        rep["losses"][str(n)] = losses
    rep["seconds_api"] = time.perf_counter() - T0
    rep["rc_cli"] = main(cli_args(OUT / "cli_single") + ["--devices", "1"])
    rep["rc_backproject"] = main(cli_args(OUT / "bp_single", "backproject") + ["--devices", "1"])
    return rep


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    result = multi() if args.mode == "multi" else single()
    result["seconds"] = time.perf_counter() - T0
    print("MULTIHOST_CHECK " + json.dumps(result), flush=True)
