"""Data-parallel scaling of the epoch step over forced CPU devices, and the effect of the batch prefetch.

**Scaling.** For each device count ``D`` (1, 2, 4) a worker process is started with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (set before JAX is imported: the process sees exactly ``D``
CPU devices) and times :func:`jaxcryo.solvers._fit.make_step` with a ``D``-device mesh (:mod:`jaxcryo.parallel._mesh`: the batch
split over the devices, volume and optimiser state replicated, gradient and Hutchinson products reduced inside
the step) for a PSGD step (Hutchinson, one probe, the ``psgd`` strategy's optimiser) and a plain SGD step, on
one static minibatch of random poses, shifts, CTFs and noise images (the cost does not depend on the content),
already placed on the devices. ``images_per_s`` = global batch / median step time; the calls alternate between
the two steps, ``block_until_ready`` after each. Each worker also checks that its sharded step gives the
1-device step's output (``max_rel_diff_vs_1_device``, the same process, the same inputs).

**What forced CPU devices on this machine do and do not predict for GPUs** (also in the JSON, ``note``): the
``D`` devices are logical devices of one process that share the same cores (2 here), memory and memory
bandwidth; their all-reduce is a memory copy. The total compute cannot grow with ``D``: whatever changes is the
balance between two effects on fixed hardware. Sharding adds work (each device backprojects its shard into its
own full-size gradient volume, then the volumes are all-reduced: one all-reduce of ``N^3`` complex values for
SGD, two for PSGD with its Hessian-vector product; smaller per-device batches), and it can use idle cores: XLA's
CPU backend runs some operations on one thread (the scatter-add of the backprojection among them), and ``D``
devices run ``D`` of them at once, so a step can get faster up to the core count, never beyond. On a shared
machine (the load average is recorded) the differences are also within run-to-run noise. The measurement checks
that the sharded step is correct, that the batch is split rather than gathered, and what sharding costs or gains
on a CPU. It does not predict GPU speed-ups: on ``D`` GPUs the compute and memory bandwidth grow ``D``-fold,
the all-reduce goes over NVLink or PCIe (``N^3 x 8`` bytes per reduction: 2 MiB at box 64, 128 MiB at box 256,
a fraction of a millisecond to a few milliseconds on NVLink, an estimate, not measured here), and the
per-device batch ``B / D`` decides how well each GPU is used. Scaling on GPUs must be measured on GPUs.

**Prefetch.** :func:`jaxcryo.solvers._fit.fit` reads the next batch in a background thread while the current step runs
(``prefetch=1``, the default); ``prefetch=0`` reads each batch when its step starts. Measured on one device with a
stack written to disk: seconds per epoch of a PSGD fit with and without prefetch, alternating, with the stack in
the page cache (``warm``) and evicted before every epoch with ``posix_fadvise(DONTNEED)`` (``cold``: reads from
the disk, as for a stack larger than memory; ``read_s_per_epoch`` shows whether the eviction took effect), plus
the reading alone (``read_s_per_epoch``) and whether the maps with and without prefetch are identical (they must
be: the batches are the same, only read earlier).

Usage: python benchmarks/scaling.py [--quick] [--out DIR] [--devices 1 2 4] [--box 64] [--batch 128] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import evict, loadavg  # noqa: E402

NOTE = (
    "Forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count=D) are D logical devices of one "
    "process sharing the same CPU cores, memory and memory bandwidth; their all-reduce is a memory copy. Total "
    "compute cannot grow with D: sharding adds work (a full-size gradient volume per device and its all-reduce, "
    "one per gradient and one per Hessian-vector product; smaller per-device batches) and can use idle cores "
    "(XLA CPU runs some operations, e.g. the backprojection's scatter-add, on one thread; D devices run D at "
    "once), so a step can gain at most the core count (2 here), and on a shared machine the differences are "
    "within run-to-run noise. The numbers check that the sharded step is correct and the batch split, not "
    "gathered, and what sharding costs or gains on a CPU. They do not predict GPU speed-ups, where compute and memory "
    "bandwidth grow with D, the all-reduce (N^3 x 8 bytes per reduction) goes over NVLink/PCIe, and the "
    "per-device batch B/D sets each GPU's efficiency: GPU scaling must be measured on GPUs."
)


# --------------------------------------------------------------------------------------------------
# worker: one device count, in its own process
# --------------------------------------------------------------------------------------------------
def worker(n_devices: int, box: int, batch: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxcryo as jc
    from jaxcryo import parallel
    from throughput import make_raw_batch

    assert len(jax.devices()) == n_devices, (len(jax.devices()), n_devices)
    mesh = parallel.make_mesh(n_devices)
    proj = jc.Projector(n=box, pixel_size=3.0, operator="trilinear")
    lam = 1e-3
    opts = {
        "psgd_step": lambda: jc.preconditioned_sgd(jc.harmonic_schedule(0.5, 4), n_probes=1),
        "sgd_step": lambda: jc.sgd(0.1),
    }
    raw_np = jax.device_get(make_raw_batch(box, parallel.padded_batch_size(batch, mesh)))
    raw = parallel.shard_batch(raw_np, mesh)
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    vol0 = (jax.random.normal(k1, (box,) * 3) + 1j * jax.random.normal(k2, (box,) * 3)).astype(jnp.complex64)
    vol0 = vol0 * 0.01

    runs = {}
    for name, make in opts.items():
        step = jc.make_step(make(), proj, lam, mesh=mesh)
        # agreement with the 1-device step on the same inputs (not donated: compared below)
        one = jc.make_step(make(), proj, lam, donate=False)
        o1 = one(vol0, make().init(vol0), raw_np)
        v, s = parallel.replicate((jnp.array(vol0, copy=True), make().init(vol0)), mesh)
        t0 = time.perf_counter()
        v, s, val = step(v, s, raw)
        jax.block_until_ready(v)
        compile_s = time.perf_counter() - t0
        diff = float(jnp.max(jnp.abs(np.asarray(v) - np.asarray(o1[0]))) / jnp.max(jnp.abs(o1[0])))
        runs[name] = {"step": step, "state": [v, s], "compile_s": compile_s, "times": [], "diff": diff,
                      "local_batch": step.local_batch_shapes[-1] if isinstance(step, parallel.ShardedStep) else batch}
    for _ in range(reps):  # round robin: a change of machine load affects both steps alike
        for name, r in runs.items():
            v, s = r["state"]
            t0 = time.perf_counter()
            v, s, val = r["step"](v, s, raw)
            jax.block_until_ready(v)
            r["times"].append(time.perf_counter() - t0)
            r["state"] = [v, s]
    out = []
    for name, r in runs.items():
        med = float(np.median(r["times"]))
        out.append({"op": name, "devices": n_devices, "box": box, "batch": batch,
                    "padded_batch": parallel.padded_batch_size(batch, mesh), "per_device_batch": r["local_batch"],
                    "compile_s": r["compile_s"], "step_s": med, "step_min_s": float(np.min(r["times"])),
                    "images_per_s": batch / med, "max_rel_diff_vs_1_device": r["diff"],
                    "loadavg": loadavg()})
    return {"results": out}


def run_worker(n: int, args) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    env.pop("JAX_PLATFORMS", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cmd = [sys.executable, __file__, "--worker", str(n), "--box", str(args.box), "--batch", str(args.batch),
           "--reps", str(args.reps), "--out", str(args.out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {n} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SCALING ")][-1]
    return json.loads(line.split(" ", 1)[1])


# --------------------------------------------------------------------------------------------------
# prefetch: one device, a stack on disk
# --------------------------------------------------------------------------------------------------
def prefetch_benchmark(args, workdir: Path) -> dict:
    import jax
    import numpy as np

    import jaxcryo as jc
    from jaxcryo import ParticleMetadata
    from jaxcryo.data import ParticleDataset, random_ctf_params, write_dataset
    from jaxcryo.rotations import random_rotations

    box, n, batch, epochs = args.prefetch_box, args.prefetch_particles, args.prefetch_batch, args.prefetch_epochs
    rng = np.random.default_rng(0)
    md = ParticleMetadata(
        rotations=np.asarray(random_rotations(jax.random.PRNGKey(0), n), np.float64),
        shifts=rng.uniform(-6, 6, (n, 2)), ctf=random_ctf_params(rng, n),
        image_files=np.array(["mem"] * n, dtype=object), image_indices=np.arange(n), pixel_size=3.0, box=box,
        source="scaling")
    star = write_dataset(workdir / "stack", md, rng.standard_normal((n, box, box)).astype(np.float32))
    stack = workdir / "stack" / "particles.mrcs"
    ds = ParticleDataset.from_file(star)
    proj = jc.Projector(n=box, pixel_size=3.0, operator="trilinear")
    steps_per_epoch = -(-n // batch)

    def opt():
        return jc.preconditioned_sgd(jc.harmonic_schedule(0.5, steps_per_epoch), n_probes=1)

    step = jc.make_step(opt(), proj, 1e-3)
    jc.fit(ds, opt(), proj, epochs=1, batch_size=batch, lam=1e-3, step_fn=step, prefetch=0)  # compile

    def read_epoch() -> float:
        t0 = time.perf_counter()
        for idx, mask in jc.epoch_batches(np.arange(n), batch, np.random.default_rng(1)):
            jc.load_batch(ds, idx, mask)
        return time.perf_counter() - t0

    def fit_epochs(depth: int, cold: bool):
        if cold:
            evict(stack)
        res = jc.fit(ds, opt(), proj, epochs=epochs, batch_size=batch, lam=1e-3, step_fn=step, prefetch=depth,
                     callback=(lambda rec, v: evict(stack)) if cold else None)
        secs = np.diff([0.0] + [h["seconds"] for h in res.history]).tolist()
        return secs, np.asarray(res.volume_f)

    load0 = loadavg()
    out = {"box": box, "n_particles": n, "batch": batch, "epochs_per_run": epochs, "rounds": args.prefetch_rounds,
           "stack_mb": stack.stat().st_size / 2**20, "steps_per_epoch": steps_per_epoch, "optimizer": "psgd (k=1)",
           "device": str(jax.devices()[0])}
    for cache in ("warm", "cold"):
        cold = cache == "cold"
        reads = []
        for _ in range(2):
            if cold:
                evict(stack)
            reads.append(read_epoch())
        secs = {"off": [], "on": []}
        maps = {}
        for _ in range(args.prefetch_rounds):  # alternate, so load changes hit both alike
            for key, depth in (("off", 0), ("on", 1)):
                s, vol = fit_epochs(depth, cold)
                secs[key] += s
                maps[key] = vol
        off, on = float(np.median(secs["off"])), float(np.median(secs["on"]))
        out[cache] = {"read_s_per_epoch": float(min(reads)), "seconds_per_epoch": secs,
                      "median_off_s": off, "median_on_s": on, "saved_s_per_epoch": off - on,
                      "speedup": off / on, "identical_maps": bool(np.array_equal(maps["off"], maps["on"]))}
    out["loadavg_before"] = load0
    out["loadavg_after"] = loadavg()
    return out


# --------------------------------------------------------------------------------------------------
def plot(d: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    from jaxcryo.plotting import save_figure

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4))
    res = d["results"]
    for op, c in (("psgd_step", "C1"), ("sgd_step", "C0")):
        rs = sorted((r for r in res if r["op"] == op), key=lambda r: r["devices"])
        x = [r["devices"] for r in rs]
        a.plot(x, [r["images_per_s"] for r in rs], "o-", color=c, label=op)
        a.plot(x, [rs[0]["images_per_s"] * n for n in x], ":", color=c, alpha=0.6,
               label=f"{op}, linear from 1 device (the ideal on D real devices)")
    a.set_xlabel("forced CPU devices (same cores)")
    a.set_ylabel("images / s")
    a.set_xticks(sorted({r["devices"] for r in res}))
    a.set_title(f"box {d['settings']['box']}, global batch {d['settings']['batch']}, "
                f"{d['machine']['cores']} cores")
    a.legend(fontsize=8)
    p = d["prefetch"]
    labels, vals = [], []
    for cache in ("warm", "cold"):
        for key in ("off", "on"):
            labels.append(f"{cache}\nprefetch {key}")
            vals.append(p[cache][f"median_{key}_s"])
    b.bar(range(len(vals)), vals, color=["C7", "C2", "C7", "C2"])
    b.set_xticks(range(len(vals)), labels, fontsize=8)
    b.set_ylabel("seconds per epoch (median)")
    b.set_title(f"prefetch, stack on disk: box {p['box']}, {p['n_particles']} particles, batch {p['batch']}")
    save_figure(fig, path)


def main(argv=None) -> int:
    from _common import machine_info, parse_args, use_agg, write_json

    def add(p):
        p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
        p.add_argument("--box", type=int, default=None)
        p.add_argument("--batch", type=int, default=None)
        p.add_argument("--reps", type=int, default=None)
        p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)

    args = parse_args(__doc__.splitlines()[0], argv, add)
    q = args.quick
    args.box = args.box or (16 if q else 64)
    args.batch = args.batch or (16 if q else 128)
    args.reps = args.reps or (3 if q else 7)
    if args.worker is not None:
        print("SCALING " + json.dumps(worker(args.worker, args.box, args.batch, args.reps)))
        return 0
    args.prefetch_box = 16 if q else 64
    args.prefetch_particles = 256 if q else 3000
    args.prefetch_batch = 32 if q else 128
    args.prefetch_epochs = 2 if q else 2
    args.prefetch_rounds = 1 if q else 3
    use_agg()
    results = []
    for n in args.devices:
        results += run_worker(n, args)["results"]
    base = {r["op"]: r["images_per_s"] for r in results if r["devices"] == 1}
    for r in results:
        r["speedup_vs_1"] = r["images_per_s"] / base[r["op"]] if r["op"] in base else None
        r["images_per_s_per_device"] = r["images_per_s"] / r["devices"]
    import tempfile

    with tempfile.TemporaryDirectory(prefix="jaxcryo-scaling-") as tmp:
        pf = prefetch_benchmark(args, Path(tmp))
    d = {"machine": machine_info(), "note": NOTE,
         "settings": {"quick": q, "box": args.box, "batch": args.batch, "reps": args.reps, "devices": args.devices,
                      "interp": "trilinear", "psgd": "preconditioned_sgd, Hutchinson k=1 (the psgd strategy)",
                      "sgd": "optax sgd"},
         "results": results, "prefetch": pf}
    write_json(args.out / "scaling.json", d)
    plot(d, args.out / "scaling.png")
    for r in results:
        print(f"{r['op']:10s} devices {r['devices']}: {r['images_per_s']:8.1f} images/s "
              f"(x{r['speedup_vs_1']:.2f}), max rel diff vs 1 device {r['max_rel_diff_vs_1_device']:.1e}")
    for cache in ("warm", "cold"):
        p = pf[cache]
        print(f"prefetch ({cache}): {p['median_off_s']:.3f} s/epoch off, {p['median_on_s']:.3f} s/epoch on "
              f"(read alone {p['read_s_per_epoch']:.3f} s/epoch), identical maps: {p['identical_maps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
