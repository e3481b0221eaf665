"""RELION 3.1 auto-refine for the benchmarks (``refine.py --relion`` and ``robustness.py --tasks relion_local
relion_global``): the command lines, a run in segments (one a time limit stopped is continued from its last
finished iteration the next time, ``--continue``), and what to evaluate (the final map and ``run_data.star`` of
a converged run, else the average of the last finished iteration's half maps and its ``run_itNNN_data.star``).

The runs, in a set's folder that holds ``reference_30A.mrc`` (the reference, low-passed to 30 Å) and the
particles: ``relion_local`` from ``particles_perturbed.star`` (local searches around the given poses: healpix
order 4, ``--sigma_ang 3``, offsets +-3 px in 1 px steps) and ``relion_global`` from ``particles_noposes.star``
(global search: healpix order 2, offsets +-6 px in 2 px steps). Both: ``mpirun -np 3 relion_refine_mpi
--auto_refine --split_random_halves --ini_high 30 --ctf --flatten_solvent --zero_mask --j 1 --pad 2
--low_resol_join_halves 40 --oversampling 1``, particle diameter 0.8 of the box.
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
MISSING = "relion_refine_mpi or mpirun not on the PATH (Debian: apt-get install relion openmpi-bin)"
#: Open MPI refuses to start as root without these (containers).
ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def relion_executables() -> tuple[str, str] | None:
    """``(mpirun, relion_refine_mpi)`` on the PATH, or ``None`` when either is missing."""
    exe, mpirun = shutil.which("relion_refine_mpi"), shutil.which("mpirun")
    return None if exe is None or mpirun is None else (mpirun, exe)


def relion_version(exe: str) -> str:
    """The first line of ``relion_refine --version`` (``"?"`` when it says nothing)."""
    v = subprocess.run([shutil.which("relion_refine") or exe, "--version"], capture_output=True, text=True)
    return (v.stdout.strip().splitlines() or ["?"])[0]


def mpi_prefix(mpirun: str, exe: str) -> list:
    """``mpirun ... -np 3 relion_refine_mpi``: a leader and two workers, one per random half."""
    return [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "3", exe]


def relion_command(mpi: list, name: str, box: int, pixel_size: float) -> list:
    """The auto-refine command of run ``name`` (a key of :data:`RELION_SEARCH`) for a set of ``box`` px at
    ``pixel_size`` Å/px, run in the set's folder (its paths are relative to it; output ``name/run``)."""
    star, extra = RELION_SEARCH[name]
    return mpi + ["--o", Path(name) / "run", "--auto_refine", "--split_random_halves", "--i", star,
                  "--ref", "reference_30A.mrc", "--ini_high", "30",
                  "--particle_diameter", str(0.8 * box * pixel_size), "--ctf", "--flatten_solvent",
                  "--zero_mask", "--j", "1", "--pad", "2",
                  "--low_resol_join_halves", "40", "--oversampling", "1"] + extra


def continue_command(mpi: list, name: str, optimiser: Path, iteration: int) -> list:
    """The command that continues run ``name`` from its iteration ``iteration`` (``optimiser``: that
    iteration's ``_optimiser.star``); output ``name/run_ct<iteration>``, run in the set's folder."""
    return mpi + ["--continue", Path(name) / optimiser.name, "--o", Path(name) / f"run_ct{iteration}", "--j", "1"]


def relion_outputs(o: Path) -> dict:
    """RELION's files in ``o``: the last finished iteration (``*_itNNN_*``, also those of ``--continue`` runs,
    named ``run_ctNN_itNNN_*``) and the final (converged) map and data."""
    its = {}
    for f in o.glob("run*_it[0-9][0-9][0-9]_optimiser.star"):
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


def run_relion_folder(d: Path, name: str, box: int, pixel_size: float, timeout: float | None,
                      executables: tuple[str, str], env: dict | None = None) -> dict:
    """Run ``name`` (:data:`RELION_RUNS`) in ``d/name`` unless it has converged there: a fresh auto-refine, or
    the continuation of the run a time limit (``timeout`` seconds) stopped. Each run is a segment
    (``d/name/segments.json``: command, returncode, wall and CPU seconds, log); the entry sums them."""
    mpi = mpi_prefix(*executables)
    env = dict(os.environ if env is None else env, **ROOT_ENV)
    o = d / name
    o.mkdir(exist_ok=True)
    seg_file = o / "segments.json"
    segments = json.loads(seg_file.read_text()) if seg_file.exists() else []
    out = relion_outputs(o)
    if out["final_map"] is None:
        if out["optimiser"] is not None:  # continue a run stopped by the time limit
            cmd = continue_command(mpi, name, out["optimiser"], out["last_iteration"])
        else:
            cmd = relion_command(mpi, name, box, pixel_size)
        # RELION resolves the stack names in the STAR relative to its working directory: the set's folder
        r = timed(cmd, o / f"segment{len(segments) + 1}.log", env, timeout=timeout, cwd=d)
        segments.append(r)
        seg_file.write_text(json.dumps(segments, indent=1))
    return {"name": name, "command": segments[0]["command"] if segments else None,
            "segments": segments, "wall_seconds": float(sum(s["wall_seconds"] for s in segments)),
            "cpu_seconds": (float(sum(s["cpu_seconds"] for s in segments))
                            if all("cpu_seconds" in s for s in segments) else None),
            "stopped_by_timeout": any(s["returncode"] == "timeout" for s in segments)}
