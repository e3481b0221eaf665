"""RELION 3.1 auto-refine for the benchmarks (``refine.py --relion`` and ``robustness.py --tasks relion_local
relion_global relion_sgd``): the command lines, a run in segments (one a time limit stopped is continued from its
last finished iteration the next time, ``--continue``), and what to evaluate (the final map and ``run_data.star``
of a converged run, else the average of the last finished iteration's half maps and its ``run_itNNN_data.star``).

The runs, in a set's folder that holds ``reference_30A.mrc`` (the reference, low-passed to 30 Å) and the
particles: ``relion_local`` from ``particles_perturbed.star`` (local searches around the given poses: healpix
order 4, ``--sigma_ang 3``, offsets +-3 px in 1 px steps) and ``relion_global`` from ``particles_noposes.star``
(global search: healpix order 2, offsets +-6 px in 2 px steps). Both: ``mpirun -np 3 relion_refine_mpi
--auto_refine --split_random_halves --ini_high 30 --ctf --flatten_solvent --zero_mask --j 1 --pad 2
--low_resol_join_halves 40 --oversampling 1``, particle diameter 0.8 of the box.

``relion_sgd`` (robustness.py only) is RELION 3.1's initial model by stochastic gradient descent, then
auto-refine: ``relion_refine --sgd --denovo_3dref --K 1`` (no MPI) from ``particles_noposes.star`` in
``relion_sgd/sgd`` with RELION 3.1.3's SGD defaults made explicit (:func:`sgd_command`), continued
like the auto-refine runs when a time limit stopped it; then ``relion_global``'s auto-refine (global search) with
the last map the SGD wrote as ``--ref``, in ``relion_sgd/refine_from_itNNN`` (one folder per SGD map, so a
refinement is only ever continued from the reference it started from).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from _common import timed
from jaxcryo.io import read_map

RELION_RUNS = ("relion_local", "relion_global")
#: Each run's particles (in the set's folder) and its search flags.
RELION_SEARCH = {
    "relion_local": ("particles_perturbed.star",
                     ["--offset_range", "3", "--offset_step", "1", "--healpix_order", "4",
                      "--auto_local_healpix_order", "4", "--sigma_ang", "3"]),
    # the global search samples translations as jaxcryo's does (+-6 px in 2 px steps; auto-refine halves the
    # step as it refines): with 1 px steps (113 translations) RELION's first iteration alone took an estimated
    # 1.5 h on the 2-core CPU
    "relion_global": ("particles_noposes.star", ["--offset_range", "6", "--healpix_order", "2", "--offset_step", "2"]),
}
# the SGD map's frame and hand are arbitrary: its auto-refine searches globally, as relion_global does
RELION_SEARCH["relion_sgd"] = RELION_SEARCH["relion_global"]
MISSING = "relion_refine_mpi or mpirun not on the PATH (Debian: apt-get install relion openmpi-bin)"
MISSING_SGD = "relion_refine, relion_refine_mpi or mpirun not on the PATH (Debian: apt-get install relion openmpi-bin)"
#: RELION 3.1's SGD iterations (initial, in between, final; its defaults) and how often the SGD writes its files.
SGD_ITERATIONS = (50, 200, 50)
SGD_WRITE_ITER = 20
#: Open MPI refuses to start as root without these (containers).
ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def relion_executables() -> tuple[str, str] | None:
    """``(mpirun, relion_refine_mpi)`` on the PATH, or ``None`` when either is missing."""
    exe, mpirun = shutil.which("relion_refine_mpi"), shutil.which("mpirun")
    return None if exe is None or mpirun is None else (mpirun, exe)


def relion_sgd_executables() -> tuple[str, str, str] | None:
    """``(mpirun, relion_refine_mpi, relion_refine)`` on the PATH (``relion_sgd``: the SGD runs without MPI, the
    auto-refine with it), or ``None`` when one is missing."""
    mpi, serial = relion_executables(), shutil.which("relion_refine")
    return None if mpi is None or serial is None else (*mpi, serial)


def relion_version(exe: str) -> str:
    """The first line of ``relion_refine --version`` (``"?"`` when it says nothing)."""
    v = subprocess.run([shutil.which("relion_refine") or exe, "--version"], capture_output=True, text=True)
    return (v.stdout.strip().splitlines() or ["?"])[0]


def mpi_prefix(mpirun: str, exe: str) -> list:
    """``mpirun ... -np 3 relion_refine_mpi``: a leader and two workers, one per random half."""
    return [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "3", exe]


def particle_diameter(box: int, pixel_size: float) -> str:
    """The ``--particle_diameter`` (Å) of every RELION run here: 0.8 of the box."""
    return str(0.8 * box * pixel_size)


def relion_command(mpi: list, name: str, box: int, pixel_size: float, ref: str | Path = "reference_30A.mrc",
                   folder: str | Path | None = None) -> list:
    """The auto-refine command of run ``name`` (a key of :data:`RELION_SEARCH`) for a set of ``box`` px at
    ``pixel_size`` Å/px from the map ``ref``, run in the set's folder (its paths are relative to it; output
    ``folder/run``, ``folder`` defaulting to ``name``)."""
    star, extra = RELION_SEARCH[name]
    return mpi + ["--o", Path(folder or name) / "run", "--auto_refine", "--split_random_halves", "--i", star,
                  "--ref", ref, "--ini_high", "30",
                  "--particle_diameter", particle_diameter(box, pixel_size), "--ctf", "--flatten_solvent",
                  "--zero_mask", "--j", "1", "--pad", "2",
                  "--low_resol_join_halves", "40", "--oversampling", "1"] + extra


def sgd_command(exe: str, box: int, pixel_size: float, iterations: tuple[int, int, int] = SGD_ITERATIONS,
                write_iter: int = SGD_WRITE_ITER, folder: str | Path = "relion_sgd/sgd") -> list:
    """RELION 3.1's SGD initial model (``relion_refine`` ``exe``, no MPI) from ``particles_noposes.star``, output
    ``folder/run``, run in the set's folder, with RELION 3.1.3's SGD defaults made explicit (``iterations``:
    initial, in between and final, default 50, 200, 50; resolution 35 -> 15 Å, mini-batches 100 -> 500; the noise
    variance not inflated, ``--sgd_sigma2fudge_halflife -1``), healpix order 1 with oversampling 1, offsets
    +-6 px in 2 px steps, ``--pad 1``, one class; ``write_iter``: write the files every so many iterations (and
    the last; RELION's default is every iteration). Checked against ``relion_refine`` 3.1.3: it accepts these flags
    and writes ``run_itNNN_{class001.mrc,data.star,optimiser.star}`` at iteration 0, every ``write_iter``-th and
    the last."""
    ini, between, fin = iterations
    return [exe, "--sgd", "--denovo_3dref", "--K", "1", "--i", "particles_noposes.star", "--o", Path(folder) / "run",
            "--ctf", "--particle_diameter", particle_diameter(box, pixel_size), "--sym", "C1", "--zero_mask",
            "--flatten_solvent", "--pad", "1", "--j", "1",
            "--sgd_ini_iter", str(ini), "--sgd_inbetween_iter", str(between), "--sgd_fin_iter", str(fin),
            "--sgd_write_iter", str(write_iter), "--sgd_ini_resol", "35", "--sgd_fin_resol", "15",
            "--sgd_ini_subset", "100", "--sgd_fin_subset", "500", "--sgd_sigma2fudge_halflife", "-1",
            "--oversampling", "1", "--healpix_order", "1", "--offset_range", "6", "--offset_step", "2"]


def continue_command(mpi: list, name: str | Path, optimiser: Path, iteration: int) -> list:
    """The command that continues the run in folder ``name`` from its iteration ``iteration`` (``optimiser``:
    that iteration's ``_optimiser.star``); output ``name/run_ct<iteration>``, run in the set's folder."""
    return mpi + ["--continue", Path(name) / optimiser.name, "--o", Path(name) / f"run_ct{iteration}", "--j", "1"]


def relion_outputs(o: Path) -> dict:
    """RELION's files in ``o``: the last finished iteration (``*_itNNN_*``, also those of ``--continue`` runs,
    named ``run_ctNN_itNNN_*``) and the final (converged) map and data."""
    its = {}
    # a continuation writes its first iteration again (run_ctNN_itNN_*): of the same iteration, the newest file
    for f in sorted(o.glob("run*_it[0-9][0-9][0-9]_optimiser.star"), key=lambda f: (f.stat().st_mtime, f.name)):
        its[int(re.search(r"_it(\d{3})_optimiser", f.name).group(1))] = f  # type: ignore[union-attr]
    final = [f for f in o.glob("run*_class001.mrc") if "_it" not in f.name and "half" not in f.name]
    return {"last_iteration": max(its) if its else None, "optimiser": its[max(its)] if its else None,
            "final_map": final[0] if final else None,
            "final_data": final[0].with_name(final[0].name.replace("_class001.mrc", "_data.star")) if final else None}


def relion_result(o: Path, first_iteration: int = 0) -> tuple:
    """``(map, data STAR, info)`` of the RELION auto-refine folder ``o``: the final map and data if it
    converged, else the average of the two half maps of its last finished iteration and that iteration's
    ``_data.star``; ``info``: ``converged``, ``evaluated`` (which files) and ``iterations`` (the last finished
    iteration). ``(None, None, info)`` when no iteration from ``first_iteration`` on has finished."""
    out = relion_outputs(o)
    if out["final_map"] is not None:
        vol, _ = read_map(out["final_map"])
        return vol, out["final_data"], {"converged": True, "evaluated": out["final_map"].name,
                                        "iterations": out["last_iteration"]}
    if out["last_iteration"] is not None and out["last_iteration"] >= first_iteration:
        opt = out["optimiser"]
        h1, _ = read_map(opt.with_name(opt.name.replace("_optimiser.star", "_half1_class001.mrc")))
        h2, _ = read_map(opt.with_name(opt.name.replace("_optimiser.star", "_half2_class001.mrc")))
        data = opt.with_name(opt.name.replace("_optimiser.star", "_data.star"))
        return 0.5 * (h1 + h2), data, {"converged": False,
                                       "evaluated": f"{data.name} and the average of its two half maps",
                                       "iterations": out["last_iteration"]}
    return None, None, {"converged": False, "evaluated": None}


def half_map_resolution(o: Path) -> float | None:
    """RELION's own resolution estimate (``_rlnCurrentResolution``, Å) of the files :func:`relion_result`
    evaluates, or ``None``."""
    out = relion_outputs(o)
    if out["final_map"] is not None:
        model = out["final_map"].with_name(out["final_map"].name.replace("_class001.mrc", "_model.star"))
    elif out["optimiser"] is not None:
        model = out["optimiser"].with_name(out["optimiser"].name.replace("_optimiser.star", "_half1_model.star"))
    else:
        return None
    m = re.search(r"^_rlnCurrentResolution\s+(\S+)", model.read_text(), re.M) if model.exists() else None
    return float(m.group(1)) if m else None


def _segments(o: Path) -> list:
    """The segments run so far in folder ``o`` (``o/segments.json``)."""
    f = o / "segments.json"
    return json.loads(f.read_text()) if f.exists() else []


def _run_segment(d: Path, o: Path, segments: list, cmd: list, timeout: float | None, env: dict) -> None:
    """Run ``cmd`` in the set's folder ``d`` (RELION resolves the stack names in the STAR relative to its working
    directory) as the next segment of folder ``o``: its log ``o/segmentN.log``, appended to ``o/segments.json``."""
    segments.append(timed(cmd, o / f"segment{len(segments) + 1}.log", env, timeout=timeout, cwd=d))
    (o / "segments.json").write_text(json.dumps(segments, indent=1))


def _entry(name: str, segments: list) -> dict:
    """A folder's segments and their sums: wall and CPU seconds, whether a time limit stopped one."""
    return {"name": name, "command": segments[0]["command"] if segments else None,
            "segments": segments, "wall_seconds": float(sum(s["wall_seconds"] for s in segments)),
            "cpu_seconds": (float(sum(s["cpu_seconds"] for s in segments))
                            if all("cpu_seconds" in s for s in segments) else None),
            "stopped_by_timeout": any(s["returncode"] == "timeout" for s in segments)}


def run_relion_folder(d: Path, name: str, box: int, pixel_size: float, timeout: float | None,
                      executables: tuple[str, str], env: dict | None = None, ref: str | Path = "reference_30A.mrc",
                      folder: str | Path | None = None) -> dict:
    """Run ``name`` (a key of :data:`RELION_SEARCH`) from the map ``ref`` in ``d/folder`` (default ``d/name``)
    unless it has converged there: a fresh auto-refine, or the continuation of the run a time limit (``timeout``
    seconds) stopped. Each run is a segment (``segments.json``: command, returncode, wall and CPU seconds, log);
    the entry sums them."""
    mpi = mpi_prefix(*executables)
    env = dict(os.environ if env is None else env, **ROOT_ENV)
    folder = folder or name
    o = d / folder
    o.mkdir(parents=True, exist_ok=True)
    segments = _segments(o)
    out = relion_outputs(o)
    if out["final_map"] is None:
        if out["optimiser"] is not None:  # continue a run stopped by the time limit
            cmd = continue_command(mpi, folder, out["optimiser"], out["last_iteration"])
        else:
            cmd = relion_command(mpi, name, box, pixel_size, ref, folder)
        _run_segment(d, o, segments, cmd, timeout, env)
    return _entry(str(folder), segments)


def sgd_outputs(o: Path) -> dict:
    """The last iteration the SGD in ``o`` wrote (``run*_itNNN_*``, also those of ``--continue`` runs; iteration 0
    is its random start), its map (``_class001.mrc``), data STAR and optimiser STAR; ``None`` for none."""
    out = relion_outputs(o)
    opt = out["optimiser"]
    if opt is None:
        return {"last_iteration": None, "optimiser": None, "map": None, "data": None}
    return {"last_iteration": out["last_iteration"], "optimiser": opt,
            "map": opt.with_name(opt.name.replace("_optimiser.star", "_class001.mrc")),
            "data": opt.with_name(opt.name.replace("_optimiser.star", "_data.star"))}


def run_sgd_folder(d: Path, box: int, pixel_size: float, timeout: float | None, exe: str,
                   iterations: tuple[int, int, int] = SGD_ITERATIONS, write_iter: int = SGD_WRITE_ITER,
                   env: dict | None = None, folder: str | Path = "relion_sgd/sgd") -> dict:
    """Run RELION's SGD initial model (:func:`sgd_command`, ``relion_refine`` ``exe``) in ``d/folder`` unless it
    has done its ``sum(iterations)`` there: a fresh run, or the continuation (``--continue``) of the run a time
    limit (``timeout`` seconds) stopped after it wrote an iteration (:data:`SGD_WRITE_ITER`: every 20th by
    default). The entry: the segments and their sums (as :func:`run_relion_folder`'s), ``iterations`` (the last
    written), ``iterations_planned``, ``finished`` and ``map``/``data`` (the last written, ``None`` before
    iteration 1)."""
    env = dict(os.environ if env is None else env, **ROOT_ENV)
    o = d / folder
    o.mkdir(parents=True, exist_ok=True)
    segments = _segments(o)
    out = sgd_outputs(o)
    total = int(sum(iterations))
    if (out["last_iteration"] or 0) < total:
        if out["last_iteration"]:  # continue from the last iteration written (iteration 0 is the random start)
            cmd = continue_command([exe], folder, out["optimiser"], out["last_iteration"])
        else:
            cmd = sgd_command(exe, box, pixel_size, iterations, write_iter, folder)
        _run_segment(d, o, segments, cmd, timeout, env)
        out = sgd_outputs(o)
    it = out["last_iteration"] or 0
    return {**_entry(str(folder), segments), "iterations": it, "iterations_planned": total,
            "finished": it >= total, "map": out["map"] if it >= 1 else None, "data": out["data"] if it >= 1 else None}
