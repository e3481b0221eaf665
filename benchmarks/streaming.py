"""Streaming a large particle set from disk: peak memory and whether the prefetch hides the disk.

**The data set** (issue 12): a simulated 200,000-particle, box-64 set at 3 Å/px (the built-in phantom, uniform
poses, shifts up to 2 px, RELION CTF, white noise at SNR 0.1, trilinear slices) in 20 ``.mrcs`` stacks of
10,000 plus one RELION 3.1 STAR file, 3.3 GB on disk, written to ``--work`` (default
``/tmp/jaxcryo-streaming``; not committed). It is generated a stack at a time, so the whole set is never in
memory (``generate_peak_rss_mb`` in the JSON), and reused when ``--work`` already holds it
(``DIR/set.json`` describes it; the stack sizes are checked).

**The runs.** Each run is one ``jaxcryo reconstruct`` command in its own process (the CLI's own code through
``jaxcryo.cli.main``, with a thin instrumentation layer described below), on the whole set:

* ``psgd``: ``--optimizer psgd --epochs 1 --prior tikhonov`` (one epoch of minibatch preconditioned SGD over
  both half sets, batch 256; ``--prior tikhonov`` because the default spectral prior first makes a one-pass
  estimate over all the data, which is the ``backproject`` run below), with ``--prefetch 1`` (the default: the
  next batch is read by a background thread while the step computes) and ``--prefetch 0`` (each batch read
  when its step starts), with a **cold** and a **warm** page cache for the stacks;
* ``backproject``: the default command (the one-pass Wiener filter with the spectral prior), cold.

Before them one untimed run of each on the first 2,048 particles fills the persistent compilation cache, so
the timed runs do not compile (the step shapes do not depend on the number of particles).

*Cold* means the stacks' pages are dropped from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)`` on
every ``.mrcs``: works without root for clean pages) before the command, again after the command's NaN scan
(``find_bad_images``, which reads every image once before any work and would otherwise leave the whole set in
the page cache: 3.3 GB fits in this machine's memory) and again when the epoch starts (the first
:func:`jaxcryo.solvers._fit.fit` call). So every data pass of a cold run reads from the disk, as it would for a set
larger than memory. *Warm* means every stack was read whole just before the command. ``fincore`` (where
available) records how much of the stacks was resident before each run, which checks the eviction.

**Instrumentation** (in the command's process, wrapping module functions without changing what they do):
the time of the NaN scan; the seconds spent inside :func:`jaxcryo.data._batch.load_batch` during the epoch (the
reads, in whichever thread does them); and the seconds the step loop waited for its next batch (the time in
``next()`` of the batch iterator): without prefetch that is the whole read time, with prefetch only the part
the background thread did not hide. ``epoch_s`` is the epoch's time from the run's ``history.json``; the
peak RSS is the process's ``ru_maxrss`` from ``wait4`` (file reads through ``read()`` do not count towards
it; memory-mapped pages would), and the RSS is also sampled every second for the plot.

**The disk alone**: every stack read sequentially in 8 MiB blocks after the eviction (``raw_read`` cold) and
again from the page cache (warm), and one epoch's batches read in the epoch's random order by
:func:`jaxcryo.data._batch.load_batch` without any compute (``read_only_epoch``, cold and warm): the read time share
of an epoch is that over the epoch's time without prefetch.

Runs alternate (``on, off`` then ``off, on`` in the next round, cold and warm interleaved) so that a change
of the machine's load hits every setting alike; the 1-minute load average is recorded before and after each.

Usage: python benchmarks/streaming.py [--quick] [--out DIR] [--work DIR] [--particles N] [--per-stack M]
       [--rounds R] [--no-backproject]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import code_state, evict, loadavg  # noqa: E402

SET_VERSION = 1
LIMIT_MB = 3000.0  # the acceptance: peak RSS under 3 GB


# --------------------------------------------------------------------------------------------------
# page cache
# --------------------------------------------------------------------------------------------------
def resident_mb(paths) -> float | None:
    """MB of the files resident in the page cache (``fincore``), or None where ``fincore`` is missing."""
    exe = shutil.which("fincore")
    if exe is None or not paths:
        return None
    try:
        out = subprocess.run([exe, "-b", "-n", "-o", "RES", *map(str, paths)], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        return sum(int(x) for x in out.split()) / 2**20
    except (subprocess.SubprocessError, ValueError, OSError):
        return None


def read_whole(paths, block: int = 8 << 20) -> tuple[float, int]:
    """Read the files sequentially in ``block``-byte reads into one buffer; ``(seconds, bytes)``."""
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return time.perf_counter() - t0, total


def package_state() -> dict:
    """The commit the runs' code is at, and the package files with uncommitted changes (the working tree is
    shared: each run imports jaxcryo afresh)."""
    c = code_state()  # porcelain lines are 'XY path': the path from the fourth character
    return {"commit": c["commit"], "uncommitted_package_files": [ln[3:] for ln in c["uncommitted"]]}


def say(*a) -> None:
    print(*a, flush=True)


# --------------------------------------------------------------------------------------------------
# the data set, a stack at a time
# --------------------------------------------------------------------------------------------------
def generate(work: Path, n: int, per_stack: int, box: int, pixel_size: float = 3.0, snr: float = 0.1,
             seed: int = 0, log=say) -> dict:
    """Write (or reuse) ``work/particles.star`` + ``work/stacks/particles_XXX.mrcs``; returns ``set.json``'s
    content. Only one stack's images are in memory at a time."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from _common import host_peak_rss_mb
    from jaxcryo.data import phantom, random_ctf_params
    from jaxcryo.forward import CTFParams, ParticleMetadata, Projector, Trilinear, volume_to_fourier
    from jaxcryo.io import stack_shape, write_stack, write_star
    from jaxcryo.rotations import random_rotations

    work.mkdir(parents=True, exist_ok=True)
    n_stacks = -(-n // per_stack)
    names = [f"stacks/particles_{i:03d}.mrcs" for i in range(n_stacks)]
    counts = [min(per_stack, n - i * per_stack) for i in range(n_stacks)]
    want = {"version": SET_VERSION, "n_particles": n, "per_stack": per_stack, "box": box, "pixel_size": pixel_size,
            "snr": snr, "seed": seed, "stacks": names, "counts": counts, "star": "particles.star"}
    manifest = work / "set.json"
    if manifest.exists():
        have = json.loads(manifest.read_text())
        ok = {k: have.get(k) for k in want} == want and (work / want["star"]).exists()
        if ok:
            try:
                ok = all(stack_shape(work / s) == (c, box, box) for s, c in zip(names, counts))
            except Exception:  # noqa: BLE001 - a broken stack: regenerate
                ok = False
        if ok:
            log(f"reusing the data set in {work} ({n} particles, {n_stacks} stacks)")
            have["reused"] = True
            return have
    log(f"generating {n} particles (box {box}) in {n_stacks} stacks under {work} ...")
    t0 = time.perf_counter()
    (work / "stacks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    rots = np.asarray(random_rotations(jax.random.PRNGKey(seed), n), np.float64)
    shifts = rng.uniform(-2 * pixel_size, 2 * pixel_size, (n, 2))
    ctf = random_ctf_params(rng, n)
    files = np.empty(n, dtype=object)
    index = np.empty(n, np.int64)
    proj = Projector(n=box, pixel_size=pixel_size, operator=Trilinear(), mask_radius=box)  # images: every frequency
    vf = volume_to_fourier(jnp.asarray(phantom(box)))
    batch = 500

    ctf_fields = [np.broadcast_to(np.asarray(f, np.float64), (n,)) for f in ctf]

    @jax.jit
    def images(rot, sh, c):
        return proj.images(vf, rot, sh, CTFParams(*c))

    sigma = None
    for k, (name, count) in enumerate(zip(names, counts)):
        lo = k * per_stack
        clean = np.empty((count, box, box), np.float32)
        for s in range(0, count, batch):
            idx = lo + np.arange(s, min(s + batch, count))
            pad = np.concatenate([idx, np.full(batch - len(idx), idx[-1])])
            c = [np.asarray(f[pad], np.float32) for f in ctf_fields]
            out = images(np.asarray(rots[pad], np.float32), np.asarray(shifts[pad], np.float32), c)
            clean[s:s + len(idx)] = np.asarray(out)[: len(idx)]
        if sigma is None:  # noise level from the first stack's signal
            sigma = float(np.sqrt(np.mean(np.var(clean, axis=(1, 2))) / snr))
        noise = np.random.default_rng([seed, 1, k]).standard_normal(clean.shape, dtype=np.float32)
        clean += sigma * noise
        del noise
        path = work / name
        write_stack(path, clean, pixel_size)
        del clean
        evict([path])  # written and synced: leave the page cache as the runs will find it
        files[lo:lo + count] = str(path.resolve())
        index[lo:lo + count] = np.arange(count)
        log(f"  {name}: {count} images ({time.perf_counter() - t0:.0f} s)")
    md = ParticleMetadata(rotations=rots, shifts=shifts, ctf=ctf, image_files=files, image_indices=index,
                          pixel_size=pixel_size, box=box, source="streaming")
    write_star(work / "particles.star", md)
    write_star(work / "warmup.star", md.subset(np.arange(min(n, 2048))))
    out = dict(want, noise_sigma=sigma, generate_s=time.perf_counter() - t0, generate_peak_rss_mb=host_peak_rss_mb(),
               bytes=sum((work / s).stat().st_size for s in names))
    manifest.write_text(json.dumps(out, indent=1))
    out["reused"] = False
    return out


# --------------------------------------------------------------------------------------------------
# the command's process: jaxcryo.cli.main with the cache policy and the read/wait counters
# --------------------------------------------------------------------------------------------------
def child(spec: dict, cli_args: list) -> int:
    """Run ``jaxcryo <cli_args>`` in this process. ``spec``: ``cold`` (drop the stacks after the NaN scan and
    when the epoch starts), ``stacks`` (paths), ``stats`` (JSON path for the counters)."""
    import importlib
    import threading

    from jaxcryo.cli import main

    # the modules whose names the counters replace (where ``fit`` and ``reconstruct`` look them up)
    F, R, S = (importlib.import_module(f"jaxcryo.{m}") for m in ("solvers._fit", "solvers._reconstruct",
                                                                 "data._sources"))

    cold, stacks = bool(spec["cold"]), list(spec["stacks"])
    st = {"scan_s": None, "read_s": 0.0, "reads": 0, "wait_s": 0.0, "batches": 0, "evicted_at": [],
          "fit_calls": 0, "fit_s": []}
    lock = threading.Lock()
    t_start = time.perf_counter()

    def drop(why):
        if cold:
            evict(stacks)
            st["evicted_at"].append([why, time.perf_counter() - t_start])

    scan0 = S.ParticleDataset.find_bad_images

    def scan(self, *a, **k):
        t0 = time.perf_counter()
        r = scan0(self, *a, **k)
        st["scan_s"] = time.perf_counter() - t0
        drop("after the NaN scan")
        return r

    load0 = F.load_batch

    def load(*a, **k):
        t0 = time.perf_counter()
        r = load0(*a, **k)
        with lock:
            st["read_s"] += time.perf_counter() - t0
            st["reads"] += 1
        return r

    pf0 = F.prefetch_iter

    def pf(items, depth=1):
        it = pf0(items, depth)

        def gen():
            try:
                while True:
                    t0 = time.perf_counter()
                    try:
                        x = next(it)
                    except StopIteration:
                        return
                    st["wait_s"] += time.perf_counter() - t0
                    st["batches"] += 1
                    yield x
            finally:
                it.close()
        return gen()

    fit0 = R.fit

    def fit(*a, **k):
        if st["fit_calls"] == 0:
            drop("when the epoch starts")
        st["fit_calls"] += 1
        t0 = time.perf_counter()
        r = fit0(*a, **k)
        st["fit_s"].append(time.perf_counter() - t0)
        return r

    S.ParticleDataset.find_bad_images = scan
    F.load_batch = load
    F.prefetch_iter = pf
    R.fit = fit
    rc = main(cli_args)
    st["process_s"] = time.perf_counter() - t_start
    Path(spec["stats"]).write_text(json.dumps(st))
    return rc


def run_command(name: str, cli_args: list, stacks: list, cold: bool, work: Path, sample_s: float = 1.0) -> dict:
    """One ``jaxcryo`` command in a child process with the cache policy; peak RSS, RSS timeline, counters."""
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    stats = logs / f"{name}.stats.json"
    if stats.exists():
        stats.unlink()
    if cold:
        evict(stacks)
    else:
        read_whole(stacks)
    res_before = resident_mb(stacks)
    load_before = loadavg()
    spec = json.dumps({"cold": cold, "stacks": [str(s) for s in stacks], "stats": str(stats)})
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, __file__, "--child", spec, *map(str, cli_args)]
    t0 = time.perf_counter()
    with open(logs / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        timeline = []
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith(("VmRSS", "VmHWM"))}
                timeline.append([round(time.perf_counter() - t0, 2), kb.get("VmRSS", 0) / 1024])
            except (OSError, ValueError):
                pass
            time.sleep(sample_s)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    rc = proc.returncode
    out = {"name": name, "command": "jaxcryo " + " ".join(map(str, cli_args)), "cache": "cold" if cold else "warm",
           "returncode": rc, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
           "peak_rss_mb": ru.ru_maxrss / 1024.0, "peak_rss_sampled_mb": max((r for _, r in timeline), default=None),
           "rss_timeline": timeline, "resident_before_mb": res_before, "loadavg_before": load_before,
           "loadavg_after": loadavg(), "log": str(logs / f"{name}.log")}
    if rc != 0:
        out["error"] = (logs / f"{name}.log").read_text()[-2000:]
        return out
    if stats.exists():
        out.update(json.loads(stats.read_text()))
    run_dir = Path(cli_args[cli_args.index("--out") + 1])
    hist = json.loads((run_dir / "history.json").read_text())
    runj = json.loads((run_dir / "run.json").read_text())
    out["epoch_s"] = hist[0]["seconds"]
    out["images_per_s"] = hist[0]["images_per_s"]
    out["prefetch"] = runj["args"].get("prefetch")
    out["optimizer"] = runj["args"]["optimizer"]
    out["command_wall_s"] = runj.get("wall_seconds")
    out["prior_s"] = (runj.get("prior") or {}).get("seconds")
    return out


# --------------------------------------------------------------------------------------------------
def read_only_epoch(star: Path, batch: int, stacks: list, cold: bool) -> dict:
    """One epoch's batches (both halves, the epoch's random order) read by ``load_batch``, no compute."""
    import numpy as np

    from jaxcryo.data import ParticleDataset, epoch_batches, load_batch

    ds = ParticleDataset.from_file(star)
    h1, h2 = ds.split_halves(0)
    if cold:
        evict(stacks)
    else:
        read_whole(stacks)
    t0 = time.perf_counter()
    for i, half in enumerate((h1, h2)):
        for idx, mask in epoch_batches(half, batch, np.random.default_rng([0, 1 + i])):
            load_batch(ds, idx, mask)
    return {"cache": "cold" if cold else "warm", "seconds": time.perf_counter() - t0}


def summarise(runs: list) -> dict:
    import numpy as np

    out = {}
    for cache in ("cold", "warm"):
        for pf in (1, 0):
            rs = [r for r in runs if r.get("optimizer") == "psgd" and r["cache"] == cache and r.get("prefetch") == pf
                  and r["returncode"] == 0]
            if not rs:
                continue
            key = f"{cache}_prefetch_{'on' if pf else 'off'}"
            out[key] = {k: float(np.median([r[k] for r in rs])) for k in ("epoch_s", "wait_s", "read_s", "wall_s",
                                                                            "peak_rss_mb")}
            out[key]["epochs"] = [r["epoch_s"] for r in rs]
    return out


def plot(d: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    from jaxcryo.plotting import save_figure

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5))
    for r in d["runs"]:
        if r["returncode"] != 0 or not r["rss_timeline"]:
            continue
        t, m = zip(*r["rss_timeline"])
        ls = "-" if r["cache"] == "cold" else ":"
        a.plot(t, m, ls, lw=0.8, label=f"{r['name']} (peak {r['peak_rss_mb']:.0f} MB)")
    a.axhline(LIMIT_MB, color="r", lw=1, ls="--", label="3 GB (the acceptance limit)")
    s = d["settings"]
    a.set_ylim(0, LIMIT_MB * 1.15)
    a.set_xlabel("seconds since the command started")
    a.set_ylabel("RSS (MB), sampled")
    a.set_title(f"jaxcryo reconstruct, {s['n_particles']:,} particles, box {s['box']}, "
                f"{d['data_set']['bytes'] / 1e9:.2f} GB of stacks", fontsize=10)
    a.legend(fontsize=6, ncol=2, loc="upper right")
    summ = d["summary"]
    keys = [k for k, v in summ.items() if isinstance(v, dict)]
    x = list(range(len(keys)))
    b.bar(x, [summ[k]["epoch_s"] for k in keys], color="C0", alpha=0.6, label="epoch (median of the runs)")
    b.bar(x, [summ[k]["wait_s"] for k in keys], color="C3", label="of which the step loop waited for data")
    for i, k in enumerate(keys):
        b.plot([i] * len(summ[k]["epochs"]), summ[k]["epochs"], "k.", ms=6,
               label="single runs (machine shared: see the load)" if i == 0 else None)
        b.text(i, summ[k]["wait_s"] + 4, f"{summ[k]['wait_s']:.1f} s", ha="center", fontsize=8, color="C3")
    for ro in d["disk"]["read_only_epoch"]:
        b.axhline(ro["seconds"], color="C2", lw=1, ls="--" if ro["cache"] == "cold" else ":",
                  label=f"reading one epoch's batches alone, {ro['cache']}: {ro['seconds']:.1f} s")
    b.set_xticks(x, [k.replace("_prefetch_", "\nprefetch ") for k in keys], fontsize=8)
    b.set_ylabel("seconds")
    raw = d["disk"]["raw_read"]
    b.set_title(f"psgd, one epoch of both halves\nraw sequential read {raw['cold_mb_s']:.0f} MB/s cold, "
                f"{raw['warm_mb_s']:.0f} MB/s warm; load {d['loadavg_start']:.1f}-{d['loadavg_end']:.1f} on "
                f"{d['machine']['cores']} cores", fontsize=9)
    b.legend(fontsize=7, loc="center right")
    save_figure(fig, path)


def main(argv=None) -> int:
    from _common import machine_info, parse_args, use_agg, write_json

    def add(p):
        p.add_argument("--work", type=Path, default=None,
                       help="folder for the data set and the runs (default /tmp/jaxcryo-streaming; --quick: a "
                            "temporary folder, removed)")
        p.add_argument("--particles", type=int, default=None, help="default 200000 (--quick: 2000)")
        p.add_argument("--per-stack", type=int, default=None, help="images per .mrcs (default 10000; --quick 500)")
        p.add_argument("--box", type=int, default=None, help="default 64 (--quick: 32)")
        p.add_argument("--rounds", type=int, default=None, help="rounds of psgd on/off, cold and warm (default 2)")
        p.add_argument("--no-backproject", dest="backproject", action="store_false")
        p.add_argument("--plot-only", action="store_true", help="redraw OUT/streaming.png from OUT/streaming.json")

    args = parse_args(__doc__.splitlines()[0], argv, add)
    q = args.quick
    n = args.particles or (2000 if q else 200_000)
    per = args.per_stack or (500 if q else 10_000)
    box = args.box or (32 if q else 64)
    rounds = args.rounds or (1 if q else 2)
    use_agg()
    if args.plot_only:
        plot(json.loads((args.out / "streaming.json").read_text()), args.out / "streaming.png")
        return 0
    tmp = None
    if args.work is None and q:
        tmp = tempfile.TemporaryDirectory(prefix="jaxcryo-streaming-")
        work = Path(tmp.name)
    else:
        work = Path(args.work or "/tmp/jaxcryo-streaming")
    try:
        d = measure(work, n, per, box, rounds, args.backproject, q)
    finally:
        if tmp is not None:
            tmp.cleanup()
    d["machine"] = machine_info()
    write_json(args.out / "streaming.json", d)
    plot(d, args.out / "streaming.png")
    print(f"data set: {n} particles, box {box}, {d['data_set']['bytes'] / 1e9:.2f} GB; raw read "
          f"{d['disk']['raw_read']['cold_mb_s']:.0f} MB/s cold, {d['disk']['raw_read']['warm_mb_s']:.0f} MB/s warm")
    for r in d["runs"]:
        print(f"{r['name']:24s} rc {r['returncode']}  peak RSS {r['peak_rss_mb']:7.0f} MB  wall {r['wall_s']:6.1f} s"
              + (f"  epoch {r['epoch_s']:6.1f} s  waited {r['wait_s']:6.1f} s  read {r['read_s']:6.1f} s"
                 if r["returncode"] == 0 and r.get("wait_s") is not None and r.get("optimizer") == "psgd" else ""))
    if d["max_peak_rss_mb"] is not None:
        print(f"max peak RSS {d['max_peak_rss_mb']:.0f} MB (limit {LIMIT_MB:.0f} MB): "
              f"{'under' if d['rss_under_limit'] else 'OVER'}")
    return 0 if all(r["returncode"] == 0 for r in d["runs"]) else 1


def measure(work: Path, n: int, per: int, box: int, rounds: int, backproject: bool, quick: bool) -> dict:
    load_start, code_start = loadavg(), package_state()
    ds = generate(work, n, per, box)
    star, warm_star = work / ds["star"], work / "warmup.star"
    stacks = sorted(str(work / s) for s in ds["stacks"])
    runs_dir = work / "runs"
    if runs_dir.exists():
        shutil.rmtree(runs_dir)
    runs_dir.mkdir()

    # the disk alone
    evict(stacks)
    res_evicted = resident_mb(stacks)
    t_cold, nbytes = read_whole(stacks)
    res_read = resident_mb(stacks)
    t_warm, _ = read_whole(stacks)
    disk = {"raw_read": {"bytes": nbytes, "cold_s": t_cold, "warm_s": t_warm, "cold_mb_s": nbytes / 2**20 / t_cold,
                         "warm_mb_s": nbytes / 2**20 / t_warm, "block_bytes": 8 << 20,
                         "resident_after_evict_mb": res_evicted, "resident_after_read_mb": res_read}}
    batch = 256
    disk["read_only_epoch"] = [read_only_epoch(star, batch, stacks, cold) for cold in (True, False)]

    psgd = ["reconstruct", None, "--optimizer", "psgd", "--epochs", "1", "--prior", "tikhonov", "--quiet", "--out"]
    bp = ["reconstruct", None, "--quiet", "--out"]

    def cli(base, particles, out, *extra):
        a = list(base)
        a[1] = particles
        return a + [out, *extra]

    # compile once (untimed): the step shapes do not depend on the number of particles (--quick: no warm-up,
    # the first run compiles)
    warmups = [] if quick else [run_command("warmup_psgd", cli(psgd, warm_star, runs_dir / "warmup_psgd"), stacks, False, work)]
    if backproject and not quick:
        warmups.append(run_command("warmup_backproject", cli(bp, warm_star, runs_dir / "warmup_bp"), stacks, False,
                                   work))
    runs = []
    for r in range(rounds):
        order = (1, 0) if r % 2 == 0 else (0, 1)
        for cache in ("cold", "warm"):
            for pf in order:
                name = f"psgd_{cache}_prefetch{pf}_r{r + 1}"
                runs.append(run_command(name, cli(psgd, star, runs_dir / name, "--prefetch", str(pf)), stacks,
                                        cache == "cold", work))
                say(f"{name}: rc {runs[-1]['returncode']}, epoch {runs[-1].get('epoch_s')}, "
                    f"peak RSS {runs[-1]['peak_rss_mb']:.0f} MB")
    if backproject:
        for cache in ("cold",) if quick else ("cold", "warm"):
            name = f"backproject_{cache}"
            runs.append(run_command(name, cli(bp, star, runs_dir / name), stacks, cache == "cold", work))
            say(f"{name}: rc {runs[-1]['returncode']}, wall {runs[-1]['wall_s']:.1f} s, "
                f"peak RSS {runs[-1]['peak_rss_mb']:.0f} MB")
    summ = summarise(runs)
    ro = {r["cache"]: r["seconds"] for r in disk["read_only_epoch"]}
    for cache in ("cold", "warm"):
        off = summ.get(f"{cache}_prefetch_off")
        on = summ.get(f"{cache}_prefetch_on")
        if off and on:
            summ[f"{cache}_prefetch_saved_s"] = off["epoch_s"] - on["epoch_s"]
            summ[f"{cache}_read_share_of_epoch_off"] = ro[cache] / off["epoch_s"]
    ok = [r for r in runs if r["returncode"] == 0]
    peak = max((r["peak_rss_mb"] for r in ok), default=None)
    return {
        "settings": {"quick": quick, "n_particles": n, "per_stack": per, "box": box, "batch": batch,
                     "rounds": rounds, "psgd_command": "jaxcryo " + " ".join(map(str, psgd)) + " DIR --prefetch 0|1",
                     "backproject_command": "jaxcryo " + " ".join(map(str, bp)) + " DIR" if backproject else None,
                     "cold": "posix_fadvise(DONTNEED) on every stack before the command, after its NaN scan and "
                             "when the epoch starts",
                     "warm": "every stack read whole just before the command",
                     "work": str(work)},
        "data_set": ds, "disk": disk, "warmups": warmups, "runs": runs, "summary": summ,
        "max_peak_rss_mb": peak, "rss_limit_mb": LIMIT_MB, "rss_under_limit": peak is not None and peak < LIMIT_MB,
        "loadavg_start": load_start, "loadavg_end": loadavg(), "code_start": code_start, "code_end": package_state(),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        if shutil.which("uptime") else None,
    }


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child(json.loads(sys.argv[2]), sys.argv[3:]))
    sys.exit(main())
