"""Shared helpers for the benchmark scripts: arguments (``--quick``/``--out``), machine description, the
code's state and the load average, peak-memory readings, timing of jitted calls and of whole commands, the
shared maps (``../shared/data``), FSC thresholds, and atomic JSON writing. Library pieces (maps, FSC,
figures: :func:`jaxcryo.plotting.save_figure`) are imported from ``jaxcryo``, not copied here."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
#: The data shared between sessions (``../shared/data`` beside the checkout).
SHARED_DATA = REPO.parent / "shared" / "data"
#: The maps: ASPIRE's ribosome (65^3, signal to its Nyquist; declared 3 A/px at 64 px) and RELION's
#: beta-galactosidase test reference (100^3 at 3.54 A, but low-pass filtered by RELION to about 45 A: no signal
#: beyond shell 8 of 100, so it cannot show high-resolution behaviour against the truth).
MAPS = {"ribosome": SHARED_DATA / "aspire" / "clean70SRibosome_vol.npy",
        "betagal": SHARED_DATA / "relion" / "ref_model_betagal_100.mrc"}
RIBOSOME_PIXEL_SIZE_AT_64 = 3.0


def parse_args(description: str, argv: Sequence[str] | None = None,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """``--quick`` (CI-sized run) and ``--out DIR`` (default ``benchmarks/results``), plus script options."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small, fast settings (CI smoke run)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default %(default)s)")
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args(argv)
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def load_map(name: str, box: int, dtype=np.float32) -> tuple[np.ndarray, float]:
    """The shared map ``name`` (a key of :data:`MAPS`) resampled to ``box`` by Fourier cropping or zero-padding
    (real-space values kept; :func:`jaxcryo.ndimage.resample_real`) in ``dtype``, and its pixel size at ``box``.
    Padding beyond the map's size adds no signal: the outer shells then carry noise only."""
    from jaxcryo.io import read_map
    from jaxcryo.ndimage import resample_real

    path = MAPS[name]
    if path.suffix == ".npy":
        vol = np.load(path)
        px0 = RIBOSOME_PIXEL_SIZE_AT_64 * 64 / vol.shape[-1]
    else:
        vol, px0 = read_map(path)
    n0 = vol.shape[-1]
    vol = np.asarray(resample_real(np.asarray(vol, dtype), box, 3), dtype)
    return vol, float(px0) * n0 / box


def jaxcryo_command() -> list[str]:
    """The ``jaxcryo`` console script of this Python, or its launcher ``python -m jaxcryo_main`` where the script
    is not installed (the launcher's process settings, e.g. huge pages, apply either way)."""
    exe = Path(sys.executable).parent / "jaxcryo"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "jaxcryo_main"]


def loadavg() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _git(*a) -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def code_state(short: bool = True) -> dict:
    """The commit of the checkout (``short``: abbreviated) and the files under ``jaxcryo/`` with uncommitted
    changes, as ``{"commit", "uncommitted"}`` (``git status --porcelain`` lines; ``[]`` if none)."""
    head = _git("rev-parse", *(["--short"] if short else []), "HEAD")
    dirty = _git("status", "--porcelain", "--", "jaxcryo")
    return {"commit": head.strip() if head else None,
            "uncommitted": [ln for ln in dirty.splitlines() if ln.strip()] if dirty else []}


def first_below(curve, threshold: float) -> int | None:
    """The first shell ``s >= 1`` whose FSC is below ``threshold``, or None if none
    (:func:`jaxcryo.ndimage.first_shell_below`, which reports ``len(curve)`` for none)."""
    from jaxcryo.ndimage import first_shell_below

    s = first_shell_below(curve, threshold)
    return s if s < len(curve) else None


def evict(paths) -> None:
    """Drop the pages of ``paths`` (one path or several) from the page cache (``posix_fadvise(DONTNEED)``;
    it drops clean pages only, so each file is synced first): the next read comes from the disk."""
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, cores (visible to this process), Python/JAX versions and the default JAX device."""
    import jax

    dev = jax.devices()[0]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "cores": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", None),
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "n_devices": jax.device_count(),
        "date": __import__("time").strftime("%Y-%m-%d"),
    }
    try:
        import jaxcryo

        info["jaxcryo"] = getattr(jaxcryo, "__version__", None)
    except ImportError:  # pragma: no cover
        pass
    return info


def host_peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB; Linux reports ru_maxrss in KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def device_peak_mb() -> float | None:
    """Peak device memory in use (MB) from ``memory_stats()`` where the backend reports it (GPU), else None."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends may raise or return None
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def time_calls(fn: Callable[[], object], reps: int, min_seconds: float = 0.0) -> tuple[float, float]:
    """``(first_call_s, median_later_s)``: the first call (compile + run) and the median of ``reps``
    later calls (at least ``reps``; more while under ``min_seconds`` in total), each ``block_until_ready``."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(1, reps) or (time.perf_counter() - start < min_seconds and len(times) < 100):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def _jsonable(o):
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o):
    """Non-finite floats -> None, so the file is strict JSON."""
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o


def write_json(path, obj) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(obj), f, indent=1, default=_jsonable, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def use_agg() -> None:
    """Headless Matplotlib backend."""
    import matplotlib

    matplotlib.use("Agg")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its live descendants, each with its reaped children
    (``/proc/PID/stat``; 0 where there is no ``/proc``)."""
    procs = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (OSError, IndexError):
            continue  # gone meanwhile
        # fields 4 (ppid) and 14-17 (utime, stime, cutime, cstime) of proc(5)
        procs[int(stat.parent.name)] = (int(f[1]), sum(int(x) for x in f[11:15]))
    tree, todo = set(), [pid]
    while todo:
        q = todo.pop()
        if q in procs and q not in tree:
            tree.add(q)
            todo += [c for c, (pp, _) in procs.items() if pp == q]
    return sum(procs[q][1] for q in tree) / os.sysconf("SC_CLK_TCK")


def run_timed(cmd: Sequence[str], cwd=None, env: dict | None = None, log=None, timeout: float | None = None) -> dict:
    """Run ``cmd`` as a subprocess and time it end to end.

    Returns ``wall_s`` (the whole command, start-up included), ``cpu_s`` (user + system CPU seconds of the
    child and its descendants, which a busy machine does not inflate the way it inflates wall time),
    ``loadavg_before`` (1-minute load average when it started), ``returncode`` and ``command``. Output goes
    to ``log`` (a path) or is discarded. With a ``timeout`` the command runs in its own process group, which is
    stopped as a whole when the time is up (SIGTERM, then SIGKILL after 30 s: every MPI rank goes) and the
    returncode is ``"timeout"``; its ``cpu_s`` then also counts the descendants that the stop leaves unreaped by
    their parent (MPI ranks whose ``mpirun`` went first), read from ``/proc`` just before the stop.
    """
    import signal
    import subprocess

    load = loadavg()
    tree_cpu = 0.0
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = open(log, "w") if log is not None else subprocess.DEVNULL
    t0 = time.perf_counter()
    try:
        p = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=timeout is not None)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree_cpu = tree_cpu_seconds(p.pid)
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            rc = "timeout"
    finally:
        wall = time.perf_counter() - t0
        if log is not None:
            out.close()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = max((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), tree_cpu)
    return {"command": " ".join(map(str, cmd)), "wall_s": wall, "cpu_s": cpu, "loadavg_before": load,
            "returncode": rc}


def timed(cmd, log: Path, env=None, timeout=None, cwd=None) -> dict:
    """:func:`run_timed` with its output in ``log``, under the field names of the refinement benchmarks
    (``refine.py``, ``robustness.py``, ``_relion.py``): wall seconds, and the CPU seconds of it and its children
    (user + system; a fairer measure than the wall time when other work shares the machine); a timeout stops its
    whole process group (every MPI rank), returncode ``"timeout"``."""
    r = run_timed(cmd, cwd=cwd, env=env, log=log, timeout=timeout)
    return {"command": r["command"], "returncode": r["returncode"], "wall_seconds": r["wall_s"],
            "cpu_seconds": r["cpu_s"], "log": str(log)}
