"""Robustness matrix (issue 19): refinement and ab initio on sets that jaxcryo was not tuned on, over an SNR
ladder, from two simulators, with the known-pose map (and RELION's ``relion_reconstruct``) as the yardstick.

Usage::

    python benchmarks/robustness.py --generators aspire --snr 0.5 0.1 0.05 --seeds 0 --tasks local global
    python benchmarks/robustness.py --generators aspire jaxcryo --snr 0.5 0.1 0.05 0.02 --seeds 0 1 2 \\
        --tasks local global abinitio --box 64 --particles 5000 --volumes asym ribosome
    python benchmarks/robustness.py ... --variant mask --refine-args="--solvent-mask --particle-diameter 150"   # a tried fix
    python benchmarks/robustness.py --quick --out DIR --work DIR2     # CI: jaxcryo set, box 32, known + local
    python benchmarks/robustness.py --table benchmarks/results/robustness.json   # README table from the JSON
    python benchmarks/robustness.py --report     # the READMEs' summaries and full table from results/robustness.json
    python benchmarks/robustness.py --box 128 --pixel-size 1.5 --particles 10000 --snr 0.1 --deadline 500  # GPU
    python benchmarks/robustness.py --generators jaxcryo --volumes ribosome --snr 0.1 \\
        --tasks local relion_local --relion-timeout 1500     # RELION 3.1 auto-refine beside jaxcryo
    python benchmarks/robustness.py ... --tasks abinitio relion_sgd --relion-sgd-iter 20 80 20   # RELION's SGD

Each (generator, volume, box, particles, SNR, seed) set is made once under ``--work`` (default
``benchmarks/work/robustness/``, ignored by git) and reused. Rows are merged into ``--out/robustness.json`` by
their key (set, task, variant), so runs can be added one at a time; ``robustness.png`` plots the median
angular error and the FSC-0.5 shell (against the known-pose shell) over the SNR.

Sets (``--pixel-size``, default 3 Å/px; box 128 at 1.5 Å/px keeps box 64's 192 Å extent; uniform poses or, with
``--poses preferred``, ``jaxcryo.rotations.preferred_orientations`` for both generators (60% within a von
Mises-Fisher cone about two views; set.json records the fraction within 25° of them); CTF 300 kV / Cs 2.7 mm with defocus 1-2.5 µm):

* ``aspire`` (needs a Python with ASPIRE: ``--aspire-python``, ``$JAXCRYO_ASPIRE_PYTHON`` or
  ``/work/aspire-venv/bin/python``; skipped with a reason otherwise): ``benchmarks/_aspire_sets.py simulate``,
  ``RadialCTFFilter`` at 9 defoci, amplitude contrast 0.1, Gaussian offsets σ = ``--shift-sigma`` px clipped to
  ±5 px, ``WhiteNoiseAdder.from_snr(snr)``, written by ASPIRE's STAR export. Its truth is flipped to RELION's CTF
  sign (ASPIRE's is the opposite, ``shared/CONVENTIONS.md``).
* ``jaxcryo``: ``jaxcryo simulate --volume`` of the same map (RELION's sign; defocus uniform, amplitude contrast
  0.07, shifts uniform ±σ·√3 px, the same standard deviation), at the SNR *converted to jaxcryo's definition*.

SNR: ``--snr`` values are in ASPIRE's definition: the mean squared pixel of the clean images inside the disc of
radius box/2, over the noise variance. ``jaxcryo simulate --snr`` means the mean over images of the variance of
the whole clean image, over the noise variance. The harness measures the ratio r = jaxcryo / ASPIRE on clean
images of each jaxcryo set (``jaxcryo simulate --snr inf``, same seed), simulates at ``snr * r`` and checks the
ASPIRE-definition SNR of the result (``snr_aspire_measured``); ASPIRE sets report both definitions too.

Volumes: ``asym`` = ASPIRE's ``AsymmetricVolume(L=box, C=1, K=64, seed=seed)``, ``phantom`` = jaxcryo's built-in
map (``jaxcryo`` generator only; ``--quick``), ``ribosome`` = ``shared/data/aspire/clean70SRibosome_vol.npy`` resampled to the box.

Tasks, each run through the ``jaxcryo`` command line (so the harness does not depend on the engine's
internals): ``known`` (``jaxcryo reconstruct`` with the true poses, always run first; plus ``relion_reconstruct
--ctf`` when installed, ``--no-relion`` skips it), ``local`` (``refine --local-only`` from poses rotated 5° about
random axes and shifts moved 1.5 px = 4.5 Å), ``global`` (``refine`` from no poses with the truth low-passed to
30 Å as the reference), ``abinitio`` (``abinitio --max-shift 6`` from no poses, then ``refine --local-only`` from
its map), ``oracle`` (no refinement: the noise floor of per-image poses, :mod:`_oracle`: maximum-likelihood
poses searched around the true poses against the true map; 200 images), ``oracle_global`` (the floor of a
refinement without poses: a global search at 7.5° against the true map, then local searches, 100 images; it counts
the images whose likelihood peaks at a wrong view), and RELION 3.1's auto-refine on the same
inputs (:mod:`_relion`, the flags of ``refine.py``'s runs of the same names): ``relion_local`` (``mpirun
-np 3 relion_refine_mpi --auto_refine --split_random_halves --ctf --ini_high 30`` from
``particles_perturbed.star`` and ``reference_30A.mrc``, local searches: healpix order 4, ``--sigma_ang 3``,
offsets +-3 px; particle diameter 0.8 of the box, ``--j 1``, ``--oversampling 1``) and ``relion_global`` (the
same from ``particles_noposes.star``, global search: healpix order 2, offsets +-6 px in 2 px steps), and
``relion_sgd``, the counterpart of ``abinitio``: RELION's SGD initial model (``relion_refine --sgd --denovo_3dref
--K 1``, no MPI, from ``particles_noposes.star``; RELION 3.1's SGD defaults, ``--relion-sgd-iter`` 50 200 50,
the map written every ``--relion-sgd-write-iter`` 20 iterations) in ``SET/relion_sgd/sgd``, then
``relion_global``'s auto-refine from its last map in ``SET/relion_sgd/refine_from_itNNN``, evaluated as
``abinitio`` (map aligned to the truth, rotation and hand); ``--relion-timeout`` bounds each of its stages, a
stopped SGD's last map is still refined, and without a refinement to evaluate the SGD's map is. RELION runs
in ``SET/relion_local|relion_global|relion_sgd`` (one folder for all variants: its flags do not change with
``--refine-args``) and is evaluated at its final map and ``run_data.star``, or, stopped by ``--relion-timeout S``
(default 1500) or the deadline, at the half maps and ``run_itNNN_data.star`` of its last finished iteration
(``returncode: "timeout"``, ``converged: false``, ``iterations``: the iterations done); the next run of the task
continues it (``--continue``; its wall and CPU seconds are the sums of the segments) and a converged one is only
evaluated again (delete the folder to start again). Without ``relion_refine_mpi`` or ``mpirun`` on the PATH the
RELION tasks are skipped (listed in ``skipped``; ``relion_sgd`` also without ``relion_refine``); in the table and
the plot their rows stand beside jaxcryo's (dotted lines). Per row: median/mean angular error after the best
global rotation and hand (``jaxcryo.cli.refine.pose_errors``; for ``abinitio`` and ``relion_sgd`` the map is
aligned to the truth first, ``jaxcryo.poses.truth_metrics``, and ``mirrored`` says its hand), median shift error
(px; when no global rotation was needed), FSC-0.5 shell to the truth against the known-pose shell, iterations
(RELION: and whether it converged), ``run.json``'s warnings, wall and CPU seconds (user + system of the
command's process tree, every MPI rank included; the machine may be shared, see ``load_average``).

``--deadline S`` bounds the whole run to S seconds (a device lease): each command is stopped at the deadline
(its row gets ``returncode: "timeout"``) and a task that would start with under ``MIN_TASK_SECONDS`` left is
skipped (listed in ``skipped``); ``--task-timeout S`` bounds each task alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, use_agg, write_json  # noqa: E402
from peers import DEFAULT_ASPIRE_PYTHON, DEFAULT_VOLUME as RIBOSOME  # noqa: E402
from refine import fsc05_shell, jaxcryo_cmd, timed  # noqa: E402
from _relion import (MISSING as RELION_MISSING, MISSING_SGD as RELION_SGD_MISSING, RELION_RUNS,  # noqa: E402
                     SGD_ITERATIONS, SGD_WRITE_ITER, half_map_resolution, relion_executables, relion_result,
                     relion_sgd_executables, relion_version, run_relion_folder, run_sgd_folder)
from jaxcryo.cli.refine import pose_errors  # noqa: E402
from jaxcryo.data._simulate import perturbed_metadata, without_poses  # noqa: E402
from jaxcryo.data._sources import ParticleDataset, read_particles  # noqa: E402
from jaxcryo.io.mrc import read_map, write_map  # noqa: E402
from jaxcryo.io.star import write_star  # noqa: E402
from jaxcryo.ndimage import fft3c, frequency_edge, ifft3c, radius_grid  # noqa: E402
from jaxcryo.rotations import matrix_to_euler, preferred_orientations  # noqa: E402
from jaxcryo.plotting import save_figure  # noqa: E402

BENCH = Path(__file__).resolve().parent
HELPER = BENCH / "_aspire_sets.py"
PIXEL_SIZE = 3.0
SHIFT_SIGMA = 1.5
POSES = ("uniform", "preferred")
#: The views of ``--poses preferred`` (``jaxcryo.rotations.preferred_orientations``' default, both generators).
PREFERRED_VIEWS = ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0))
PERTURB_DEG, PERTURB_PX = 5.0, 1.5
REFERENCE_RESOLUTION = 30.0
#: Under ``--deadline``, a task is not started with fewer seconds than this left.
MIN_TASK_SECONDS = 20.0
TASKS = ("local", "global", "abinitio", "oracle", "oracle_global") + RELION_RUNS + ("relion_sgd",)
#: jaxcryo's task that each RELION task stands beside (table and docs).
RELION_COUNTERPART = {"relion_local": "local", "relion_global": "global", "relion_sgd": "abinitio"}
#: ``--relion-timeout``'s default (seconds for each RELION task).
RELION_TIMEOUT = 1500.0
SNR_DEFINITION = ("ASPIRE: mean squared clean pixel inside the disc of radius box/2 / noise variance "
                  "(WhiteNoiseAdder.from_snr)")


# --------------------------------------------------------------------------------------------------
# Sets
# --------------------------------------------------------------------------------------------------
def find_aspire(explicit: str | None) -> str | None:
    """A Python interpreter that imports ASPIRE, or ``None``."""
    for c in (explicit, os.environ.get("JAXCRYO_ASPIRE_PYTHON"), str(DEFAULT_ASPIRE_PYTHON)):
        if c and Path(c).exists():
            r = subprocess.run([c, "-c", "import aspire"], capture_output=True)
            if r.returncode == 0:
                return c
    return None


def seconds_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (a ``time.monotonic()`` value; never below 1), or ``None`` without one."""
    return None if deadline is None else max(deadline - time.monotonic(), 1.0)


def stop_time(deadline: float | None, timeout: float | None) -> float | None:
    """The earlier of ``deadline`` and ``timeout`` seconds from now (``time.monotonic()``; ``None``: no bound)."""
    stops = [x for x in (deadline, None if timeout is None else time.monotonic() + timeout) if x is not None]
    return min(stops) if stops else None


def pixel_size_of(key: dict) -> float:
    """The pixel size (Å) of a set's key or a row (rows made before ``--pixel-size`` existed: 3 Å)."""
    return float(key.get("pixel_size") or PIXEL_SIZE)


def shift_sigma_of(key: dict) -> float:
    """The offsets' standard deviation (px) of a set's key or a row (rows made before it was a key: 1.5)."""
    return float(key.get("shift_sigma") or SHIFT_SIGMA)


def poses_of(key: dict) -> str:
    """The pose distribution of a set's key or a row (rows made before it was a key: uniform)."""
    return str(key.get("poses") or "uniform")


def volume_label(r: dict) -> str:
    """A row's volume with the set's pose distribution and offsets where they are not the defaults."""
    sigma = shift_sigma_of(r)
    return (r["volume"] + ("" if poses_of(r) == "uniform" else f", {poses_of(r)}")
            + ("" if sigma == SHIFT_SIGMA else f", σ {sigma:g} px"))


def view_fraction(rotations: np.ndarray, views=PREFERRED_VIEWS, degrees: float = 25.0) -> float:
    """The fraction of viewing directions (third rows of RELION's matrices) within ``degrees`` of any of
    ``views``: about 0.09 for uniform poses and two views, about 0.35 for the preferred distribution."""
    v = np.asarray(views, float)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    cos = np.asarray(rotations)[:, 2, :] @ v.T
    return float(np.mean(np.max(cos, axis=1) >= np.cos(np.radians(degrees))))


def _helper(py: str, args: list, log: Path, deadline: float | None = None) -> dict:
    # in the set's folder: ASPIRE writes its own log file (aspire.err.log) into the working directory
    r = subprocess.run([py, str(HELPER), *map(str, args)], capture_output=True, text=True, cwd=log.parent,
                       timeout=seconds_left(deadline))
    log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"{HELPER.name} {args[0]} failed, see {log}")
    return json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[7:])


def lowpassed(vol: np.ndarray, resolution: float, pixel_size: float) -> np.ndarray:
    """``vol`` low-pass filtered at ``resolution`` Å (raised-cosine edge of 2 shells)."""
    n = vol.shape[0]
    edge = frequency_edge(radius_grid(n, 3), n * pixel_size / resolution, 2.0)
    return np.asarray(np.real(ifft3c(fft3c(np.asarray(vol, np.float32)) * np.asarray(edge))), np.float32)


def _stack(star: Path) -> np.ndarray:
    import mrcfile

    md = read_particles(star)
    files = sorted(set(md.image_files))
    assert len(files) == 1, files
    with mrcfile.open(star.parent / files[0], permissive=True) as m:
        return np.asarray(m.data, np.float32)[np.asarray(md.image_indices)]


def aspire_snr(clean: np.ndarray, noise_var: float) -> float:
    """ASPIRE's SNR definition: mean squared clean pixel inside the disc of radius box/2, over the noise variance."""
    box = clean.shape[-1]
    g = np.arange(box) - box // 2
    disc = np.hypot(g[:, None], g[None, :]) < box // 2
    return float(np.mean(clean[:, disc] ** 2)) / noise_var


def _derived_files(d: Path, star: Path, truth: np.ndarray, seed: int, px: float) -> None:
    write_map(d / "truth.mrc", truth, px)
    write_map(d / "reference_30A.mrc", lowpassed(truth, REFERENCE_RESOLUTION, px), px)
    md = read_particles(star)
    write_star(d / "particles_perturbed.star", perturbed_metadata(md, PERTURB_DEG, PERTURB_PX, seed))
    write_star(d / "particles_noposes.star", without_poses(md))


def make_set(key: dict, work: Path, aspire_py: str | None, deadline: float | None = None) -> dict:
    """The set of ``key`` (made once, then read from ``DIR/set.json``; ``key["pixel_size"]`` defaults to 3 Å,
    ``shift_sigma`` to 1.5 px, ``poses`` to uniform)."""
    d = work / set_name(key)
    if (d / "set.json").exists():
        return json.loads((d / "set.json").read_text())
    d.mkdir(parents=True, exist_ok=True)
    gen, vol, box, n, snr, seed = (key[k] for k in ("generator", "volume", "box", "particles", "snr", "seed"))
    px, shift_sigma, poses = pixel_size_of(key), shift_sigma_of(key), poses_of(key)
    pose_args: list = []
    if poses == "preferred" and gen == "aspire":
        # the same distribution as jaxcryo simulate --poses preferred, handed to ASPIRE as Euler angles:
        # ASPIRE's Simulation(angles=) takes RELION's rot/tilt/psi (radians) and writes them unchanged
        np.save(d / "angles.npy", np.radians(np.stack(matrix_to_euler(preferred_orientations(seed, n)), -1)))
        pose_args = ["--angles", d / "angles.npy"]
    elif poses == "preferred":
        pose_args = ["--poses", "preferred"]
    t0 = time.perf_counter()
    if gen == "aspire":
        if aspire_py is None:
            raise RuntimeError("ASPIRE not available")
        v = "asym" if vol == "asym" else str(RIBOSOME)
        info = _helper(aspire_py, ["simulate", "--volume", v, "--box", box, "--particles", n, "--snr", snr,
                                   "--seed", seed, "--shift-sigma", shift_sigma, "--pixel-size", px,
                                   "--out", d, *pose_args], d / "aspire.log", deadline)
        star = d / "particles.star"
        truth = np.load(d / "truth_relion.npy")
    else:
        src = d / "volume.mrc"
        if vol == "asym" and aspire_py is not None:
            _helper(aspire_py, ["volume", "--box", box, "--seed", seed, "--pixel-size", px, "--out", d / "volume.npy"],
                    d / "aspire.log", deadline)
            write_map(src, np.load(d / "volume.npy"), px)
            vname = f"AsymmetricVolume(L={box}, C=1, K=64, seed={seed})"
        elif vol == "ribosome":
            write_map(src, np.asarray(np.load(RIBOSOME), np.float32), px * box / np.load(RIBOSOME).shape[0])
            vname = str(RIBOSOME)
        elif vol == "phantom":
            src, vname = None, "jaxcryo.phantom"
        else:
            raise RuntimeError("ASPIRE not available (the asym volume needs it)")
        common = ["simulate", "--box", box, "--n-particles", n, "--seed", seed, "--pixel-size", px,
                  "--max-shift", shift_sigma * np.sqrt(3) * px, "--quiet", *pose_args] + (["--volume", src] if src
                                                                                           else [])
        r = timed(jaxcryo_cmd() + common + ["--snr", "inf", "--out", d / "clean"], d / "simulate_clean.log",
                  timeout=seconds_left(deadline))
        if r["returncode"] != 0:
            raise RuntimeError(f"jaxcryo simulate failed, see {r['log']}")
        clean = _stack(d / "clean" / "particles.star")
        ratio = float(np.mean(np.var(clean, axis=(1, 2)))) / aspire_snr(clean, 1.0)
        r = timed(jaxcryo_cmd() + common + ["--snr", snr * ratio, "--out", d], d / "simulate.log",
                  timeout=seconds_left(deadline))
        if r["returncode"] != 0:
            raise RuntimeError(f"jaxcryo simulate failed, see {r['log']}")
        star = d / "particles.star"
        noise_var = float(np.var(_stack(star) - clean))
        truth, _ = read_map(d / "ground_truth.mrc")
        shutil.rmtree(d / "clean")
        info = {"generator": "jaxcryo", "simulator": "jaxcryo simulate", "volume": vname, "box": box,
                "particles": n, "pixel_size": px, "seed": seed, "snr_aspire": snr,
                "snr_jaxcryo": snr * ratio, "jaxcryo_over_aspire": ratio,
                "snr_aspire_measured": aspire_snr(clean, noise_var),
                "snr_jaxcryo_measured": float(np.mean(np.var(clean, axis=(1, 2)))) / noise_var,
                "shifts": {"distribution": "uniform", "half_width_px": shift_sigma * np.sqrt(3)},
                "truth": "ground_truth.mrc (RELION's CTF sign)"}
    _derived_files(d, star, truth, seed, px)
    rots = np.asarray(read_particles(star).rotations)
    info["poses"] = {"distribution": poses, "fraction_within_25deg_of_views": view_fraction(rots),
                     **({"views": PREFERRED_VIEWS, "generator": "jaxcryo.rotations.preferred_orientations(seed, n)"}
                        if poses == "preferred" else {})}
    info.update(dir=str(d), star=str(star), snr_definition=SNR_DEFINITION, make_seconds=time.perf_counter() - t0)
    (d / "set.json").write_text(json.dumps(info, indent=1))
    return info


def set_name(key: dict) -> str:
    px = pixel_size_of(key)
    sigma = shift_sigma_of(key)
    return (f"{key['generator']}_{key['volume']}_b{key['box']}_n{key['particles']}_snr{key['snr']:g}_s{key['seed']}"
            + ("" if px == PIXEL_SIZE else f"_px{px:g}") + ("" if sigma == SHIFT_SIGMA else f"_sig{sigma:g}")
            + ("" if poses_of(key) == "uniform" else f"_{poses_of(key)}"))


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------
def _load_average() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return None


def _run_json(out: Path) -> dict:
    f = out / "run.json"
    return json.loads(f.read_text()) if f.exists() else {}


def task_known(d: Path, truth, relion: bool, deadline: float | None = None) -> dict:
    r = timed(jaxcryo_cmd() + ["reconstruct", d / "particles.star", "--out", d / "known", "--quiet"],
              d / "known.log", timeout=seconds_left(deadline))
    row = {**r, "load_average": _load_average()}
    if r["returncode"] == 0:
        vol, _ = read_map(d / "known" / "map.mrc")
        row["fsc05_truth_shell"], row["fsc_truth"] = fsc05_shell(vol, truth)
    exe = shutil.which("relion_reconstruct")
    if relion and exe:
        rr = timed([exe, "--i", "particles.star", "--o", "relion_known.mrc", "--ctf"], d / "relion_known.log",
                   cwd=d, timeout=seconds_left(deadline))
        row["relion"] = {**rr}
        if rr["returncode"] == 0:
            rv, _ = read_map(d / "relion_known.mrc")
            row["relion"]["fsc05_truth_shell"] = fsc05_shell(rv, truth)[0]
    elif relion:
        row["relion"] = {"available": False, "reason": "relion_reconstruct not on the PATH"}
    return row


def pose_map_metrics(vol, est, truth, true_md) -> dict:
    """The errors of a refinement's poses ``est`` (metadata) against ``true_md`` (after the best global rotation
    and hand, :func:`jaxcryo.cli.refine.pose_errors`) and the FSC of its map ``vol`` to ``truth``: the fields of a
    row, for jaxcryo's runs and RELION's alike."""
    e = pose_errors(est, true_md)
    shell, f = fsc05_shell(vol, truth)
    return {"median_angular_error_deg": e["median_deg"], "mean_angular_error_deg": e["mean_deg"],
            "mirrored": e["mirrored"], "median_shift_error_px": e["shift_error_median_px"],
            "fsc05_truth_shell": shell, "fsc_truth": f}


def _refine_row(out: Path, r: dict, truth, true_md) -> dict:
    row = {**r, "load_average": _load_average()}
    if r["returncode"] != 0:
        return row
    vol, px = read_map(out / "map.mrc")
    hist = json.loads((out / "history.json").read_text())
    rj = _run_json(out)
    row["posthoc_warnings"] = _posthoc_warnings(out, vol, hist, px)
    row.update(pose_map_metrics(vol, read_particles(out / "particles.star"), truth, true_md),
               iterations=len(hist), half_map_resolution=rj.get("summary", {}).get("resolution_0143"),
               warnings=rj.get("warnings", []),
               history=[{k: v for k, v in h.items() if k in ("iteration", "resolution", "step_deg",
                                                               "mean_pose_change_deg", "fsc05_truth_shell",
                                                               "seconds")} for h in hist])
    return row


def _posthoc_warnings(out: Path, vol, hist, px: float) -> list | None:
    """The warnings ``jaxcryo.poses._diagnostics`` gives for a finished run (also for runs of a jaxcryo that
    did not write them to run.json yet) whose map has pixel size ``px``; ``None`` when that module is absent."""
    try:
        from jaxcryo.poses._diagnostics import run_warnings
    except ImportError:
        return None
    ref, _ = read_map(out.parent / "reference_30A.mrc") if "abinitio" not in out.name else (None, None)
    return run_warnings(vol, ref, hist, px, REFERENCE_RESOLUTION)


def task_refine(d: Path, name: str, star: str, local: bool, extra: list, truth, true_md, variant: str,
                deadline: float | None = None) -> dict:
    out = d / f"{name}__{variant}"
    cmd = jaxcryo_cmd() + ["refine", d / star, "--reference", d / "reference_30A.mrc", "--out", out, "--quiet",
                           "--truth", d / "truth.mrc"] + (["--local-only"] if local else []) + extra
    return _refine_row(out, timed(cmd, d / f"{name}__{variant}.log", timeout=seconds_left(deadline)), truth,
                       true_md)


#: How ``abinitio``'s map is refined: ``global`` (default): ``refine`` from no poses with the ab initio map as
#: the reference (low-passed to 30 Å, so each half set's poses beyond it are found independently); ``local``:
#: ``refine --local-only`` from ab initio's poses, which were all assigned against one map, so the two half
#: maps share that map's features up to its frequency limit (12 Å): at SNR 0.02 a wrong ab initio map refined
#: locally reported 12.6 Å with no warning, globally 22.3 Å with the stall warning (benchmarks/README.md).
ABINITIO_REFINE = ("global", "local")


def task_abinitio(d: Path, extra: list, ab_extra: list, truth, true_md, variant: str,
                  deadline: float | None = None, refine_mode: str = "global") -> dict:
    ab = d / f"abinitio__{variant}"
    a = timed(jaxcryo_cmd() + ["abinitio", d / "particles_noposes.star", "--out", ab, "--quiet", "--max-shift", "6"]
              + ab_extra, d / f"abinitio__{variant}.log", timeout=seconds_left(deadline))
    if a["returncode"] != 0:
        return {**a, "stage": "abinitio"}
    out = d / f"abinitio_refine__{variant}"
    start = ([ab / "particles.star", "--local-only"] if refine_mode == "local" else [d / "particles_noposes.star"])
    r = timed(jaxcryo_cmd() + ["refine", start[0], "--reference", ab / "map.mrc", "--out", out, "--quiet"]
              + start[1:] + extra, d / f"abinitio_refine__{variant}.log", timeout=seconds_left(deadline))
    row = _refine_row(out, r, truth, true_md)
    row["abinitio_refine"] = refine_mode
    row.update(command=a["command"] + " ; " + r["command"], wall_seconds=a["wall_seconds"] + r["wall_seconds"],
               cpu_seconds=a["cpu_seconds"] + r["cpu_seconds"], abinitio_wall_seconds=a["wall_seconds"])
    if r["returncode"] == 0:
        vol, px = read_map(out / "map.mrc")
        row.update(aligned_metrics(vol, read_particles(out / "particles.star").rotations, truth, true_md, px))
    return row


def aligned_metrics(vol, rotations, truth, true_md, pixel_size: float) -> dict:
    """The row's fields for a map in its own frame and hand (ab initio, RELION's SGD): the FSC to ``truth`` after
    aligning the map to it and the pose errors after the best global rotation and hand
    (:func:`jaxcryo.poses.truth_metrics`); they replace :func:`pose_map_metrics`'s (its shift error stays: given
    only when no global rotation was needed)."""
    from jaxcryo.poses import truth_metrics

    m = truth_metrics(vol, rotations, truth, true_md.rotations, pixel_size)
    return {"fsc05_truth_shell": m["fsc05_shell"], "fsc_truth": m["fsc"], "mirrored": m["mirrored"],
            "median_angular_error_deg": m["pose_error_median_deg"],
            "mean_angular_error_deg": m["pose_error_mean_deg"]}


def runnable_tasks(tasks: list) -> tuple[list, list]:
    """``tasks`` less the RELION tasks when ``relion_refine_mpi`` or ``mpirun`` is missing (``relion_sgd``: also
    ``relion_refine``), and the ``skipped`` entries that say why."""
    missing = {**({t: RELION_MISSING for t in RELION_RUNS} if relion_executables() is None else {}),
               **({"relion_sgd": RELION_SGD_MISSING} if relion_sgd_executables() is None else {})}
    return ([t for t in tasks if t not in missing],
            [{"task": t, "reason": missing[t]} for t in tasks if t in missing])


def task_relion(d: Path, name: str, key: dict, truth, true_md, timeout: float | None,
                executables: tuple[str, str]) -> dict:
    """RELION 3.1 auto-refine (:mod:`_relion`, the flags of ``refine.py``'s run of the same name) in
    ``d/name``, stopped after ``timeout`` seconds; evaluated as :func:`_refine_row` evaluates jaxcryo's runs, at
    its final map and ``run_data.star`` or, unconverged, at its last finished iteration. A folder that holds a
    converged run is evaluated again without running; a stopped one is continued (``--continue``)."""
    e = run_relion_folder(d, name, key["box"], pixel_size_of(key), timeout, executables)
    segs = e["segments"]
    row = {"command": " ; ".join(s["command"] for s in segs), "returncode": segs[-1]["returncode"] if segs else None,
           "wall_seconds": e["wall_seconds"], "cpu_seconds": e["cpu_seconds"],
           "log": segs[-1]["log"] if segs else None, "load_average": _load_average(),
           "relion_version": relion_version(executables[1]), "segments": segs,
           "stopped_by_timeout": e["stopped_by_timeout"]}
    vol, data, info = relion_result(d / name, first_iteration=1)  # iteration 0: the input poses
    row.update(info)
    row.setdefault("iterations", 0)
    if vol is not None:
        row.update(pose_map_metrics(vol, read_particles(data), truth, true_md),
                   half_map_resolution=half_map_resolution(d / name))
    return row


def _cpu_sum(*entries) -> float | None:
    cpu = [e["cpu_seconds"] for e in entries]
    return None if any(c is None for c in cpu) else float(sum(cpu))


def task_relion_sgd(d: Path, key: dict, truth, true_md, stop: float | None, timeout: float | None,
                    executables: tuple[str, str, str], iterations: tuple[int, int, int] = SGD_ITERATIONS,
                    write_iter: int = SGD_WRITE_ITER) -> dict:
    """RELION 3.1's SGD initial model, then auto-refine from its map (:mod:`_relion`): the counterpart of
    :func:`task_abinitio`. Stage 1, ``relion_refine --sgd --denovo_3dref`` from ``particles_noposes.star`` in
    ``d/relion_sgd/sgd`` (:func:`_relion.run_sgd_folder`); stage 2, ``relion_global``'s global-search
    auto-refine with the last map the SGD wrote as ``--ref``, in ``d/relion_sgd/refine_from_itNNN``
    (:func:`_relion.run_relion_folder`). Each stage is stopped after ``timeout`` seconds or at ``stop`` (a
    ``time.monotonic()`` value), whichever comes first, and continued (``--continue``) by the next run of the
    task. A stopped SGD that wrote an iteration still hands that map to stage 2; the refinement is skipped
    when the SGD wrote none or failed, or under ``MIN_TASK_SECONDS`` are left before ``stop``.

    Evaluated as :func:`task_abinitio` (the map is in its own frame and hand: :func:`pose_map_metrics`, then
    :func:`aligned_metrics`) at the refinement's result (:func:`_relion.relion_result`) or, without one, at the
    SGD's last map and data STAR. ``returncode`` is ``"timeout"`` when either stage's last segment was stopped,
    else the first non-zero one; ``iterations``/``converged`` are the refinement's, ``sgd_iterations`` (of
    ``sgd_iterations_planned``) the SGD's; wall and CPU seconds are the sums over both stages' segments, with
    each stage's under ``stages``."""
    mpirun, mpi_exe, exe = executables
    box, px = key["box"], pixel_size_of(key)
    sgd = run_sgd_folder(d, box, px, seconds_left(stop_time(stop, timeout)), exe, iterations, write_iter)
    sgd_rc = sgd["segments"][-1]["returncode"] if sgd["segments"] else None
    stages: dict = {"sgd": {**{k: sgd[k] for k in ("name", "segments", "wall_seconds", "cpu_seconds",
                                                     "stopped_by_timeout", "iterations", "iterations_planned",
                                                     "finished")},
                            "returncode": sgd_rc, "map": None if sgd["map"] is None else sgd["map"].name}}
    ran = [sgd]
    refine_dir = None
    left = seconds_left(stop)
    if sgd["map"] is None:
        stages["refine"] = {"skipped": "the SGD wrote no map (iteration 1 or later)"}
    elif sgd_rc not in (0, "timeout"):
        stages["refine"] = {"skipped": f"the SGD failed (returncode {sgd_rc})"}
    elif left is not None and left < MIN_TASK_SECONDS:
        stages["refine"] = {"skipped": f"deadline: {left:.0f} s left"}
    else:
        folder = Path("relion_sgd") / f"refine_from_it{sgd['iterations']:03d}"
        ref = sgd["map"].relative_to(d)
        e = run_relion_folder(d, "relion_sgd", box, px, seconds_left(stop_time(stop, timeout)),
                              (mpirun, mpi_exe), ref=ref, folder=folder)
        refine_dir = d / folder
        ran.append(e)
        stages["refine"] = {**{k: e[k] for k in ("name", "segments", "wall_seconds", "cpu_seconds",
                                                 "stopped_by_timeout")},
                            "ref": str(ref), "returncode": e["segments"][-1]["returncode"] if e["segments"] else None}
    rcs = [st["returncode"] for st in stages.values() if "returncode" in st]
    segs = [s for e in ran for s in e["segments"]]
    row = {"command": " ; ".join(s["command"] for s in segs),
           "returncode": "timeout" if "timeout" in rcs else next((rc for rc in rcs if rc != 0), 0),
           "wall_seconds": float(sum(e["wall_seconds"] for e in ran)), "cpu_seconds": _cpu_sum(*ran),
           "sgd_wall_seconds": sgd["wall_seconds"], "sgd_cpu_seconds": sgd["cpu_seconds"],
           "log": segs[-1]["log"] if segs else None, "load_average": _load_average(),
           "relion_version": relion_version(mpi_exe), "stages": stages,
           "stopped_by_timeout": any(e["stopped_by_timeout"] for e in ran),
           "sgd_iterations": sgd["iterations"], "sgd_iterations_planned": sgd["iterations_planned"],
           "sgd_finished": sgd["finished"], "iterations": 0, "converged": False}
    vol = data = None
    if refine_dir is not None:
        stages["refine"]["iterations"] = 0
        vol, data, info = relion_result(refine_dir, first_iteration=1)  # iteration 0: the SGD map, no poses
        stages["refine"].update(info)
        row.update(info, refine_wall_seconds=stages["refine"]["wall_seconds"],
                   refine_cpu_seconds=stages["refine"]["cpu_seconds"])
        if vol is not None:
            row["half_map_resolution"] = half_map_resolution(refine_dir)
    if vol is None and sgd["map"] is not None:  # no refinement to evaluate: the SGD's last map and poses
        vol, _ = read_map(sgd["map"])
        data = sgd["data"]
        row["evaluated"] = f"the SGD's {sgd['map'].name} and {sgd['data'].name}"
    if vol is not None:
        est = read_particles(data)
        row.update(pose_map_metrics(vol, est, truth, true_md))
        row.update(aligned_metrics(vol, est.rotations, truth, true_md, px))
    return row


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------
ROW_KEYS = ("generator", "volume", "box", "pixel_size", "shift_sigma", "poses", "particles", "snr", "seed", "task",
            "variant")
#: The set's fields that older rows lack, and how to read them.
_KEY_DEFAULTS = {"pixel_size": pixel_size_of, "shift_sigma": shift_sigma_of, "poses": poses_of}


def _row_key(r: dict) -> tuple:
    return tuple(_KEY_DEFAULTS[k](r) if k in _KEY_DEFAULTS else r.get(k) for k in ROW_KEYS)


def task_oracle(d: Path, truth) -> dict:
    """The noise floor of per-image poses on this set (:mod:`_oracle`: maximum-likelihood poses searched
    around the true poses against the true map)."""
    from _oracle import oracle_errors

    t0, c0 = time.perf_counter(), time.process_time()
    o = oracle_errors(ParticleDataset.from_file(d / "particles.star"), truth)
    return {**o, "median_angular_error_deg": o["oracle_median_angular_error_deg"],
            "mean_angular_error_deg": o["oracle_mean_angular_error_deg"],
            "median_shift_error_px": o["oracle_median_shift_error_px"],
            "wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def task_oracle_global(d: Path, truth) -> dict:
    """The floor of a refinement without starting poses (:func:`_oracle.oracle_global_errors`: a global search
    against the true map, then local ones; 100 images): its median error includes the images whose likelihood
    peaks at a wrong view."""
    from _oracle import oracle_global_errors

    t0, c0 = time.perf_counter(), time.process_time()
    o = oracle_global_errors(ParticleDataset.from_file(d / "particles.star"), truth)
    return {**o, "median_angular_error_deg": o["oracle_global_median_angular_error_deg"],
            "mean_angular_error_deg": o["oracle_global_mean_angular_error_deg"],
            "median_shift_error_px": o["oracle_global_median_shift_error_px"],
            "wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def merge_rows(old: list, new: list) -> list:
    key = _row_key
    rows = {key(r): r for r in old}
    rows.update({key(r): r for r in new})
    return sorted(rows.values(), key=lambda r: tuple(map(str, _row_key(r))))


def save(res_file: Path, rows: list, skipped: list) -> dict:
    """Merge ``rows`` into ``res_file`` as it is now (another run may have added rows meanwhile) and write it."""
    cur = json.loads(res_file.read_text()) if res_file.exists() else {"rows": []}
    result = {"machine": machine_info(), "rows": merge_rows(cur["rows"], rows), "skipped": skipped}
    write_json(res_file, result)
    return result


def _fmt(x, f="{:.2f}"):
    return "-" if x is None else f.format(x)


def _table_order(r: dict) -> tuple:
    """A row's place in the table: by set, a RELION task right after jaxcryo's task of the same name."""
    k = [str(x) for x in _row_key(r)]
    t = k[ROW_KEYS.index("task")]
    relion = t.startswith("relion_")
    k[ROW_KEYS.index("task")] = RELION_COUNTERPART.get(t, t[len("relion_"):]) if relion else t
    return (*k[:ROW_KEYS.index("variant")], relion, k[ROW_KEYS.index("variant")])


def _iterations(r: dict) -> str:
    """The iterations of a row, and whether a time limit stopped it or it did not converge."""
    it = r.get("iterations", "-")
    if "sgd_iterations" in r:  # relion_sgd: the SGD's iterations, then the refinement's
        it = f"SGD {r['sgd_iterations']} + {it}"
    if r.get("returncode") == "timeout":
        return f"{it} (timeout)"
    return f"{it} (not converged)" if r.get("converged") is False else str(it)


def table(rows: list) -> str:
    """The README's Markdown table (RELION's rows beside jaxcryo's of the same task)."""
    lines = ["| generator | volume | SNR (ASPIRE) | SNR (jaxcryo) | seed | task | variant | median err (°) | "
             "shift err (px) | FSC-0.5 shell / known | RELION known | iter. | wall s | CPU s | warnings (posthoc) | "
             "box (Å/px) |",
             "|" + "---|" * 16]
    for r in sorted(rows, key=_table_order):
        known = r.get("known_pose_shell")
        rel = (r.get("relion") or {}).get("fsc05_truth_shell") if r["task"] == "known" else None
        relt = (r.get("relion") or {}).get("wall_seconds") if r["task"] == "known" else None
        lines.append(
            f"| {r['generator']} | {volume_label(r)} | {r['snr']:g} | {_fmt(r.get('snr_jaxcryo'), '{:.3g}')} | "
            f"{r['seed']} | {r['task']} | {r['variant']} | {_fmt(r.get('median_angular_error_deg'))} | "
            f"{_fmt(r.get('median_shift_error_px'))} | {r.get('fsc05_truth_shell', 'failed')} / {known} | "
            f"{'-' if rel is None else f'{rel} ({relt:.0f} s)'} | {_iterations(r)} | "
            f"{_fmt(r.get('wall_seconds'), '{:.0f}')} | {_fmt(r.get('cpu_seconds'), '{:.0f}')} | "
            f"{_fmt(None if r.get('posthoc_warnings') is None else len(r['posthoc_warnings']), '{}')} | "
            f"{r['box']} ({pixel_size_of(r):g}) |")
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    """Median angular error (left) and FSC-0.5 shell minus the known-pose shell (right) against the SNR: one
    line per (generator, volume, box, particles, task, variant) tried at two SNRs or more, through the median
    over seeds, with the seeds' range as error bars; the oracle's noise floor (no shell) on the left only.
    Variants other than today's engine (``default``) are drawn thin and grey-ish (the before/after record)."""
    use_agg()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    ax = fig.subplots(1, 2)
    groups: dict = {}
    for r in rows:
        if r["task"] != "known" and ("fsc05_truth_shell" in r or r["task"] == "oracle"):
            groups.setdefault((r["generator"], volume_label(r), r["box"], r["particles"], r["task"], r["variant"]),
                              []).append(r)
    for (g, v, box, n, t, var), rs in sorted(groups.items()):
        snrs = sorted({r["snr"] for r in rs})
        if len(snrs) < 2:  # a variant tried at one SNR: in the table, not the plot
            continue
        lab = f"{g}/{v} b{box} n{n} {t}" + ("" if var == "default" else f" [{var}]")
        marker = "o" if g == "aspire" else "s"
        ls = ":" if t.startswith("relion_") or t == "oracle" else "-" if g == "aspire" else "--"
        kw = dict(marker=marker, ls=ls, label=lab, capsize=2, ms=4,
                  **({} if var == "default" else {"alpha": 0.45, "lw": 0.8}),
                  **({"color": "k"} if t == "oracle" and g == "aspire" else
                     {"color": "0.45"} if t == "oracle" else {}))
        for i, (key, ylab) in enumerate((("median_angular_error_deg", None), ("shell_gap", None))):
            if key == "shell_gap" and t == "oracle":
                continue
            ys = []
            for snr in snrs:
                vals = [(r.get("median_angular_error_deg") if key != "shell_gap" else
                         r["fsc05_truth_shell"] - r["known_pose_shell"]) for r in rs if r["snr"] == snr]
                vals = [x for x in vals if x is not None]
                ys.append((np.median(vals), min(vals), max(vals)) if vals else (np.nan, np.nan, np.nan))
            y = np.array(ys, float)
            ax[i].errorbar(snrs, y[:, 0], yerr=[y[:, 0] - y[:, 1], y[:, 2] - y[:, 0]], **kw)
    ax[0].set(xscale="log", yscale="log", xlabel="SNR (ASPIRE's definition)",
              ylabel="median angular error (deg; median over seeds, bars: range)")
    ax[1].axhline(-1, color="k", lw=0.8, ls=":")
    ax[1].set(xscale="log", xlabel="SNR (ASPIRE's definition)", ylabel="FSC-0.5 shell - known-pose shell")
    from matplotlib.ticker import NullFormatter

    all_snrs = sorted({r["snr"] for r in rows if r["task"] != "known"})
    for a in ax:
        a.set_xticks(all_snrs)
        a.xaxis.set_major_formatter(_plain_formatter())
        a.xaxis.set_minor_formatter(NullFormatter())
    if ax[0].get_legend_handles_labels()[0]:  # nothing to draw with a single SNR (e.g. --quick)
        ax[0].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    save_figure(fig, path)


def _plain_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _: f"{x:g}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generators", nargs="+", default=["aspire"], choices=("aspire", "jaxcryo"))
    p.add_argument("--volumes", nargs="+", default=["asym"], choices=("asym", "ribosome", "phantom"),
                   help="phantom: jaxcryo's built-in map (jaxcryo generator only)")
    p.add_argument("--snr", nargs="+", type=float, default=[0.5, 0.1, 0.05], help="ASPIRE's definition")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--tasks", nargs="*", default=["local", "global"], choices=TASKS,
                   help="tasks after the known-pose baseline (always run; none: the baseline alone)")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--particles", type=int, default=5000)
    p.add_argument("--pixel-size", type=float, default=PIXEL_SIZE,
                   help="Å/px of the sets (and of the 30 Å reference's low-pass); in the set's name when not 3")
    p.add_argument("--shift-sigma", type=float, default=SHIFT_SIGMA, help="offset standard deviation (px)")
    p.add_argument("--poses", choices=POSES, default="uniform",
                   help="pose distribution (preferred: jaxcryo.rotations.preferred_orientations, 60%% about two "
                        "views, for both generators)")
    p.add_argument("--variant", default="default", help="label of these rows (e.g. a tried fix)")
    p.add_argument("--refine-args", default="",
                   help="extra arguments for every jaxcryo refine, one string (write --refine-args=\"--whiten\")")
    p.add_argument("--abinitio-args", default="", help="extra arguments for jaxcryo abinitio (one string)")
    p.add_argument("--abinitio-refine", choices=ABINITIO_REFINE, default="global",
                   help="refine the ab initio map by a global search from it (default) or locally from its poses")
    p.add_argument("--aspire-python", default=None)
    p.add_argument("--no-relion", action="store_true", help="skip relion_reconstruct")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole run: commands are stopped then, later tasks skipped")
    p.add_argument("--task-timeout", type=float, default=None, help="seconds for each task (its commands)")
    p.add_argument("--relion-timeout", type=float, default=RELION_TIMEOUT,
                   help="seconds for each RELION task (%(default)g; relion_sgd: each of its two stages): a stopped "
                        "run is evaluated at its last finished iteration, and continued by the next run of the task")
    p.add_argument("--relion-sgd-iter", type=int, nargs=3, default=list(SGD_ITERATIONS),
                   metavar=("INITIAL", "IN_BETWEEN", "FINAL"),
                   help="relion_sgd: RELION's SGD iterations (default: RELION 3.1's, %(default)s)")
    p.add_argument("--relion-sgd-write-iter", type=int, default=SGD_WRITE_ITER,
                   help="relion_sgd: the SGD writes its map every so many iterations (%(default)s; a stopped SGD "
                        "is evaluated and continued from the last one written)")
    p.add_argument("--quick", action="store_true",
                   help="CI: jaxcryo set of the phantom, box 32, 300 particles, SNR 0.5, known + local (2 iterations)")
    p.add_argument("--out", type=Path, default=BENCH / "results")
    p.add_argument("--work", type=Path, default=BENCH / "work" / "robustness")
    p.add_argument("--table", type=Path, default=None, help="print the Markdown table of this JSON and stop")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="merge the rows of these robustness.json files into --out's and stop")
    p.add_argument("--report", action="store_true",
                   help="rewrite the summaries and the full table in README.md and benchmarks/README.md from "
                        "--out's robustness.json, and stop")
    a = p.parse_args(argv)
    if a.report:
        import _robustness_report as rep

        rows = json.loads((a.out / "robustness.json").read_text())["rows"]
        rep.fill(BENCH.parent / "README.md", "README_SUMMARY", rep.readme_summary(rows, volume_label))
        rep.fill(BENCH / "README.md", "SUMMARY", rep.summary_table(rows, volume_label))
        rep.fill(BENCH / "README.md", "FULLTABLE", table(rows))
        return 0
    if a.table is not None:
        print(table(json.loads(a.table.read_text())["rows"]))
        return 0
    if a.merge is not None:
        rows = [r for f in a.merge for r in json.loads(f.read_text())["rows"]]
        for r in rows:  # the warnings of today's diagnostics, also for rows run before them
            if not r.get("log"):  # the oracle's rows: no command, no log
                continue
            out = Path(str(r["log"])).with_suffix("")
            if r["task"] != "known" and (out / "map.mrc").exists() and (out / "history.json").exists():
                vol, px = read_map(out / "map.mrc")
                r["posthoc_warnings"] = _posthoc_warnings(out, vol, json.loads((out / "history.json").read_text()),
                                                          px)
        a.out.mkdir(parents=True, exist_ok=True)
        plot(save(a.out / "robustness.json", rows, [])["rows"], a.out / "robustness.png")
        return 0
    deadline = None if a.deadline is None else time.monotonic() + a.deadline
    extra = shlex.split(a.refine_args)
    if a.quick:
        a.generators, a.volumes, a.box, a.particles, a.snr, a.seeds = ["jaxcryo"], ["phantom"], 32, 300, [0.5], [0]
        a.pixel_size = PIXEL_SIZE
        a.tasks, a.no_relion = ["local"], True
        extra = ["--iterations", "2", "--batch-size", "100"] + extra
    aspire_py = None if a.quick else find_aspire(a.aspire_python)
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    res_file = a.out / "robustness.json"
    old = json.loads(res_file.read_text()) if res_file.exists() else {"rows": [], "skipped": []}
    rows = []
    a.tasks, skipped = runnable_tasks(a.tasks)
    for s in skipped:
        print(f"{s['task']}: skipped ({s['reason']})")
    relion_exes, sgd_exes = relion_executables(), relion_sgd_executables()
    for gen in a.generators:
        if gen == "aspire" and aspire_py is None:
            skipped.append({"generator": "aspire", "reason": "no Python with ASPIRE (--aspire-python, "
                            "$JAXCRYO_ASPIRE_PYTHON, /work/aspire-venv/bin/python)"})
            print("aspire: skipped (no Python with ASPIRE)")
            continue
        for vol in a.volumes:
            if (vol == "phantom" and gen == "aspire") or (vol == "asym" and aspire_py is None):
                skipped.append({"generator": gen, "volume": vol, "reason": "the phantom is jaxcryo's only; asym "
                                "needs ASPIRE"})
                continue
            for snr in a.snr:
                for seed in a.seeds:
                    key = {"generator": gen, "volume": vol, "box": a.box, "pixel_size": a.pixel_size,
                           "shift_sigma": a.shift_sigma, "poses": a.poses, "particles": a.particles, "snr": snr,
                           "seed": seed}
                    s = make_set(key, a.work, aspire_py, deadline)
                    d = Path(s["dir"])
                    truth, _ = read_map(d / "truth.mrc")
                    true_md = read_particles(Path(s["star"]))
                    base = {**key, "snr_definition": SNR_DEFINITION, "snr_jaxcryo": s.get("snr_jaxcryo_measured"),
                            "snr_aspire_measured": s.get("snr_aspire_measured"), "set": s}
                    prev_known = next((r for r in old["rows"] if r["task"] == "known" and
                                       _row_key(r) == _row_key({**key, "task": "known", "variant": "default"})),
                                      None)
                    known = prev_known or {**base, "task": "known", "variant": "default",
                                           **task_known(d, truth, not a.no_relion, deadline)}
                    known["known_pose_shell"] = known.get("fsc05_truth_shell")
                    rows.append(known)
                    print(f"{set_name(key)}: known-pose shell {known.get('fsc05_truth_shell')}", flush=True)
                    for t in a.tasks:
                        left = seconds_left(deadline)
                        if left is not None and left < MIN_TASK_SECONDS:
                            skipped.append({**key, "task": t, "reason": f"deadline: {left:.0f} s left"})
                            print(f"  {t}: skipped ({left:.0f} s left before the deadline)", flush=True)
                            continue
                        stop = stop_time(deadline, a.task_timeout)
                        if t == "oracle":
                            r = task_oracle(d, truth)
                        elif t == "oracle_global":
                            r = task_oracle_global(d, truth)
                        elif t == "relion_sgd":
                            assert sgd_exes is not None  # runnable_tasks dropped it otherwise
                            r = task_relion_sgd(d, key, truth, true_md, stop, a.relion_timeout, sgd_exes,
                                                tuple(a.relion_sgd_iter), a.relion_sgd_write_iter)
                        elif t in RELION_RUNS:
                            assert relion_exes is not None  # runnable_tasks dropped the RELION tasks otherwise
                            r = task_relion(d, t, key, truth, true_md,
                                            seconds_left(stop_time(stop, a.relion_timeout)), relion_exes)
                        elif t == "abinitio":
                            r = task_abinitio(d, extra, shlex.split(a.abinitio_args), truth, true_md, a.variant,
                                              stop, a.abinitio_refine)
                        else:
                            star = "particles_perturbed.star" if t == "local" else "particles_noposes.star"
                            r = task_refine(d, t, star, t == "local", extra, truth, true_md, a.variant, stop)
                        row = {**base, "task": t, "variant": a.variant,
                               "refine_args": None if t in RELION_COUNTERPART else extra,
                               "known_pose_shell": known.get("fsc05_truth_shell"), **r}
                        rows.append(row)
                        print(f"  {t} [{a.variant}]: median {_fmt(row.get('median_angular_error_deg'))} deg, "
                              f"shell {row.get('fsc05_truth_shell', 'failed')} (known {row['known_pose_shell']}), "
                              f"{row.get('iterations', '-')} it., {row['wall_seconds']:.0f} s wall, "
                              f"{row['cpu_seconds']:.0f} s CPU, warnings {row.get('warnings')}", flush=True)
                        save(res_file, rows, skipped)
    result = save(res_file, rows, skipped)
    plot(result["rows"], a.out / "robustness.png")
    print(f"wrote {res_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
