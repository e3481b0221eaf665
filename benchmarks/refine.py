"""Refinement with unknown poses (issue 11): local and global refinement by ``jaxcryo refine`` against the
known-pose reconstruction of the same set, preconditioned against plain SGD volume updates, ab initio
(``jaxcryo abinitio`` from no poses and no reference, then ``jaxcryo refine``), and RELION's auto-refine on
the same data when it is installed and asked for (``--relion``).

Runs: ``local`` and ``global`` (today's default volume update: the one-pass Wiener filter, re-estimated each
iteration), ``local_psgd``, ``local_sgd`` and ``global_psgd`` (``--optimizer psgd|sgd``: the preconditioned
against the plain minibatch updates, each from zero on the same objective every iteration), ``local_soft``
(``--top-k 3``), ``abinitio_refine``.

The set (issue 11's acceptance): box 64, 5,000 particles at 3 Å/px from the built-in phantom, CTF with defocus
1-2.5 µm, in-plane shifts uniform in +-5 px, SNR 0.5 (signal/noise variance). Copies of its STAR: poses rotated
by 5° about random axes and shifts moved by 1.5 px (local refinement), and no poses (global). The
reference is the true map low-pass filtered to 30 Å. Metrics: median and mean angular error after the best
global alignment (:func:`jaxcryo.rotations.align_rotations`), median translation error, FSC-0.5 to the truth
(shell and Å), wall time of each command.

Usage::

    python benchmarks/refine.py --out DIR                # ~20 min on 2 CPU cores (jaxcryo only)
    python benchmarks/refine.py --out DIR --relion       # + RELION 3.1 auto-refine (mpirun -np 3), if installed
    python benchmarks/refine.py --quick --out DIR        # CI: box 32, 600 particles, 2 iterations, no ab initio
    python benchmarks/refine.py --out DIR --runs-only abinitio_refine   # re-run one run, keep the others
    python benchmarks/refine.py --out DIR --runs-only relion_global     # RELION alone (continues a run that a
                                                                          # --relion-timeout stopped)

Writes ``DIR/refine.json`` and ``DIR/refine.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax.numpy as jnp  # noqa: E402

from _common import jaxcryo_command as jaxcryo_cmd, machine_info, timed, write_json  # noqa: E402
from _relion import (MISSING as RELION_MISSING, RELION_RUNS, relion_executables, relion_result,  # noqa: E402
                     relion_version, run_relion_folder)
import jaxcryo as jc  # noqa: E402
from jaxcryo.cli.refine import pose_errors  # noqa: E402
from jaxcryo.data import perturbed_metadata, read_particles, without_poses  # noqa: E402
from jaxcryo.forward import fourier_to_volume, volume_to_fourier  # noqa: E402
from jaxcryo.io import read_map, write_map, write_star  # noqa: E402
from jaxcryo.leastsq import fourier_fsc  # noqa: E402
from jaxcryo.ndimage import first_shell_below  # noqa: E402
from jaxcryo.plotting import save_figure  # noqa: E402
from jaxcryo.poses import lowpass  # noqa: E402


def fsc05_shell(vol, truth) -> tuple[int, list]:
    """The FSC of ``vol`` to ``truth`` per shell and its first shell below 0.5 (``len`` of the curve if none)."""
    f = fourier_fsc(volume_to_fourier(jnp.asarray(vol)), volume_to_fourier(jnp.asarray(truth)))
    return first_shell_below(f, 0.5), [float(x) for x in f]


def make_set(d: Path, box: int, n: int, snr: float, seed: int) -> dict:
    px = 3.0
    sim = jc.simulate(n_particles=n, box=box, snr=snr, seed=seed, max_shift=5 * px, defocus_range=(10000.0, 25000.0))
    star = jc.write_dataset(d, sim.metadata, sim.images)
    write_map(d / "ground_truth.mrc", sim.volume, px)
    ref = np.asarray(fourier_to_volume(lowpass(volume_to_fourier(jnp.asarray(sim.volume)), 30.0, px)), np.float32)
    write_map(d / "reference_30A.mrc", ref, px)
    md = read_particles(star)
    write_star(d / "particles_perturbed.star", perturbed_metadata(md, 5.0, 1.5, seed))
    write_star(d / "particles_noposes.star", without_poses(md))
    return {"star": str(star), "box": box, "particles": n, "snr": snr, "pixel_size": px,
            "noise_sigma": sim.noise_sigma}


def pose_metrics(out: Path, true_md) -> dict:
    e = pose_errors(read_particles(out / "particles.star"), true_md)
    return {"median_angular_error_deg": e["median_deg"], "mean_angular_error_deg": e["mean_deg"],
            "mirrored": e["mirrored"], "median_shift_error_px": e["shift_error_median_px"]}


def run_jaxcryo(d: Path, name: str, star: str, extra: list, truth, true_md, env) -> dict:
    out = d / name
    cmd = jaxcryo_cmd() + ["refine", star, "--reference", d / "reference_30A.mrc", "--out", out, "--quiet",
                           "--truth", d / "ground_truth.mrc"] + extra
    r = timed(cmd, d / f"{name}.log", env)
    if r["returncode"] != 0:
        return {"name": name, **r}
    vol, _ = read_map(out / "map.mrc")
    shell, f = fsc05_shell(vol, truth)
    hist = json.loads((out / "history.json").read_text())
    return {"name": name, **r, **pose_metrics(out, true_md), "fsc05_truth_shell": shell, "fsc_truth": f,
            "iterations": len(hist),
            "history": [{k: v for k, v in h.items() if k != "half_map_fsc"} for h in hist],
            "volume_update_seconds": float(sum(h["seconds"] - h["pose_seconds"] for h in hist)),
            "iterations_to_final_resolution": next((h["iteration"] for h in hist
                                                    if h["resolution"] <= hist[-1]["resolution"] + 1e-9), None)}


def run_abinitio_then_refine(d: Path, extra: list, truth, true_md, env, quick: bool) -> dict:
    """``jaxcryo abinitio`` from no poses and no reference, then ``jaxcryo refine`` (global, from its map),
    FSC to the truth after aligning the map (rotation, hand, shift: :func:`jaxcryo.poses.truth_metrics`)."""
    from jaxcryo.poses import truth_metrics

    ab = d / "abinitio"
    a = timed(jaxcryo_cmd() + ["abinitio", d / "particles_noposes.star", "--out", ab, "--quiet", "--max-shift", "6"]
              , d / "abinitio.log", env)
    if a["returncode"] != 0:
        return {"name": "abinitio_refine", "abinitio": a, "returncode": a["returncode"], "log": a["log"]}
    out = d / "abinitio_refine"
    r = timed(jaxcryo_cmd() + ["refine", ab / "particles.star", "--reference", ab / "map.mrc", "--out", out,
                               "--quiet", "--local-only"] + extra, d / "abinitio_refine.log", env)
    if r["returncode"] != 0:
        return {"name": "abinitio_refine", "abinitio": a, **r}
    vol, px = read_map(out / "map.mrc")
    est = read_particles(out / "particles.star")
    m = truth_metrics(vol, est.rotations, truth, true_md.rotations, float(px))
    vol0, _ = read_map(ab / "map.mrc")
    m0 = truth_metrics(vol0, read_particles(ab / "particles.star").rotations, truth, true_md.rotations, float(px))
    hist = json.loads((out / "history.json").read_text())
    return {"name": "abinitio_refine", "command": a["command"] + " ; " + r["command"], "returncode": 0,
            "wall_seconds": a["wall_seconds"] + r["wall_seconds"], "abinitio_seconds": a["wall_seconds"],
            "median_angular_error_deg": m["pose_error_median_deg"], "mean_angular_error_deg": m["pose_error_mean_deg"],
            "median_shift_error_px": None, "mirrored": m["mirrored"], "fsc05_truth_shell": m["fsc05_shell"],
            "fsc_truth": m["fsc"], "iterations": len(hist),
            "history": [{k: v for k, v in h.items() if k != "half_map_fsc"} for h in hist],
            "volume_update_seconds": float(sum(h["seconds"] - h["pose_seconds"] for h in hist)),
            "abinitio_only": {"fsc05_shell": m0["fsc05_shell"], "pose_error_median_deg": m0["pose_error_median_deg"],
                              "mirrored": m0["mirrored"]}}


def _relion_evaluate(o: Path, truth, true_md) -> dict:
    """Metrics of a RELION auto-refine folder: the final map if it converged, else the average of the two
    half maps of the last finished iteration (its ``_data.star`` for the poses; :func:`_relion.relion_result`)."""
    vol, data, ev = relion_result(o)
    if vol is None:
        return ev
    shell, f = fsc05_shell(vol, truth)
    e = pose_errors(read_particles(data), true_md)
    return {**ev, "fsc05_truth_shell": shell, "fsc_truth": f,
            "median_angular_error_deg": e["median_deg"], "mean_angular_error_deg": e["mean_deg"],
            "mirrored": e["mirrored"], "median_shift_error_px": e["shift_error_median_px"]}


def run_relion(d: Path, truth, true_md, args, which=RELION_RUNS, prev=None) -> dict:
    """RELION 3.1 auto-refine on the local and the global set (:mod:`_relion`). A run stopped by
    ``--relion-timeout`` is continued from its last iteration (``--continue``) the next time, and its wall time is
    the sum of the segments (``DIR/relion_*/segments.json``); an unconverged run is evaluated at its last
    iteration."""
    exes = relion_executables()
    if exes is None:
        return {"available": False, "reason": RELION_MISSING}
    res = dict(prev or {}, available=True, version=relion_version(exes[1]))
    for name in RELION_RUNS:
        if name not in which:
            continue
        entry = run_relion_folder(d, name, args.box, 3.0, args.relion_timeout, exes)
        entry.update(_relion_evaluate(d / name, truth, true_md))
        res[name] = entry
    return res


def compare_with_relion(runs, relion, known) -> list:
    """jaxcryo's local and global refinements next to RELION's on the same set (those RELION ran)."""
    if not isinstance(relion, dict) or not relion.get("available"):
        return []
    out = []
    for task, theirs in (("local", "relion_local"), ("global", "relion_global")):
        ours = task if any(x["name"] == task for x in runs) else f"{task}_psgd"  # the default, else PSGD's
        r = next((x for x in runs if x["name"] == ours and "fsc05_truth_shell" in x), None)
        t = relion.get(theirs)
        if t is None or "fsc05_truth_shell" not in t:
            continue
        out.append({
            "task": task, "known_pose_shell": known["fsc05_truth_shell"],
            "jaxcryo": None if r is None else {
                "program": f"jaxcryo refine ({ours})", "median_deg": r["median_angular_error_deg"],
                "fsc05_shell": r["fsc05_truth_shell"], "wall_seconds": r["wall_seconds"],
                "cpu_seconds": r.get("cpu_seconds"), "state": f"converged, {r['iterations']} iterations"},
            "relion": {"program": f"RELION auto-refine ({theirs})", "median_deg": t.get("median_angular_error_deg"),
                       "fsc05_shell": t["fsc05_truth_shell"], "wall_seconds": t["wall_seconds"],
                       "cpu_seconds": t.get("cpu_seconds"),
                       "state": (f"converged, {t.get('iterations')} iterations" if t.get("converged") else
                                 f"not converged: stopped by the time limit after iteration {t.get('iterations')}")}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--particles", type=int, default=5000)
    p.add_argument("--snr", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--relion", action="store_true", help="also run RELION auto-refine (slow) when installed")
    p.add_argument("--relion-timeout", type=float, default=3600)
    p.add_argument("--skip-sgd", action="store_true", help="skip the plain-SGD volume-update comparison")
    p.add_argument("--skip-abinitio", action="store_true", help="skip ab initio then refine")
    p.add_argument("--skip-soft", action="store_true", help="skip soft assignment (--top-k 3)")
    p.add_argument("--runs-only", nargs="+", default=None, help="re-run only these of an existing DIR/refine.json")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    extra = []
    if args.quick:
        args.box, args.particles, args.snr = 32, 600, 4.0
        extra = ["--iterations", "2", "--batch-size", "100"]
    args.out.mkdir(parents=True, exist_ok=True)
    d = args.out / "refine_work"
    d.mkdir(exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    t0 = time.perf_counter()
    prev = None
    if args.runs_only and (args.out / "refine.json").exists() and (d / "particles.star").exists():
        prev = json.loads((args.out / "refine.json").read_text())  # reuse the set and the other runs
        setting = prev["setting"]
    else:
        setting = make_set(d, args.box, args.particles, args.snr, args.seed)
    truth, _ = read_map(d / "ground_truth.mrc")
    true_md = read_particles(setting["star"])
    want = set(args.runs_only or ["local", "local_psgd", "local_sgd", "local_soft", "global", "global_psgd",
                                  "abinitio_refine"])
    if args.skip_sgd:
        want.discard("local_sgd")
    if args.skip_soft:
        want.discard("local_soft")
    if args.skip_abinitio or (args.quick and not args.runs_only):  # quick (CI): tests/test_abinitio.py covers it
        want.discard("abinitio_refine")
    if args.quick and not args.runs_only:  # CI: tests/test_soft_assignment.py covers soft assignment; the default
        want -= {"local_soft", "local", "global"}  # update: tests/test_volume_update.py, tests/test_refine.py
    if prev is not None:
        known = prev["known_pose"]
    else:  # the known-pose reconstruction of the same set (the yardstick)
        r = timed(jaxcryo_cmd() + ["reconstruct", setting["star"], "--out", d / "known", "--quiet"], d / "known.log", env)
        vol, _ = read_map(d / "known" / "map.mrc")
        known = {**r, "fsc05_truth_shell": fsc05_shell(vol, truth)[0]}
    runs = [] if prev is None else [r for r in prev["runs"] if r["name"] not in want]
    if "local" in want:  # today's default volume update (one-pass Wiener, re-estimated each iteration)
        runs.append(run_jaxcryo(d, "local", str(d / "particles_perturbed.star"), ["--local-only"] + extra, truth,
                                true_md, env))
    if "local_psgd" in want:
        runs.append(run_jaxcryo(d, "local_psgd", str(d / "particles_perturbed.star"),
                                ["--local-only", "--optimizer", "psgd"] + extra, truth, true_md, env))
    if "local_sgd" in want:
        runs.append(run_jaxcryo(d, "local_sgd", str(d / "particles_perturbed.star"),
                                ["--local-only", "--optimizer", "sgd"] + extra, truth, true_md, env))
    if "local_soft" in want:  # soft assignment: each image over its 3 most likely poses
        runs.append(run_jaxcryo(d, "local_soft", str(d / "particles_perturbed.star"),
                                ["--local-only", "--top-k", "3"] + extra, truth, true_md, env))
    if "global" in want:
        runs.append(run_jaxcryo(d, "global", str(d / "particles_noposes.star"), extra, truth, true_md, env))
    if "global_psgd" in want:
        runs.append(run_jaxcryo(d, "global_psgd", str(d / "particles_noposes.star"), ["--optimizer", "psgd"] + extra,
                                truth, true_md, env))
    if "abinitio_refine" in want:
        runs.append(run_abinitio_then_refine(d, extra, truth, true_md, env, args.quick))
    order = ["local", "local_psgd", "local_sgd", "local_soft", "global", "global_psgd", "abinitio_refine"]
    runs.sort(key=lambda r: order.index(r["name"]))
    result = {"machine": machine_info(), "setting": setting, "known_pose": known, "runs": runs,
              "relion": (prev["relion"] if prev is not None else
                         {"available": None, "reason": "not requested (--relion)"})}
    relion_want = [n for n in RELION_RUNS if n in want or (args.relion and not args.runs_only)]
    if relion_want:
        result["relion"] = run_relion(d, truth, true_md, args, relion_want,
                                      prev["relion"] if prev is not None and prev["relion"].get("available") else None)
    goals = {}
    for r in runs:
        if "fsc05_truth_shell" in r:
            ab = r["name"] == "abinitio_refine"
            goal = None if ab else (1.5 if r["name"].startswith("local") else 3.0)
            goals[r["name"]] = {
                "median_angular_error_deg": r["median_angular_error_deg"], "goal_deg": goal,
                "met_angle": None if ab else r["median_angular_error_deg"] < goal,
                "fsc05_shell": r["fsc05_truth_shell"], "known_pose_shell": known["fsc05_truth_shell"],
                "shells_allowed": 2 if ab else 1,
                "met_fsc": r["fsc05_truth_shell"] >= known["fsc05_truth_shell"] - (2 if ab else 1),
                "wall_seconds": r["wall_seconds"]}
    names = {r["name"] for r in runs}
    pair = ("local", "global") if {"local", "global"} <= names else ("local_psgd", "global_psgd")
    loc_glob = [r["wall_seconds"] for r in runs if r["name"] in pair]
    result["goals"] = goals
    result["comparison"] = compare_with_relion(runs, result["relion"], known)
    result["local_plus_global_seconds"] = float(sum(loc_glob))
    result["total_seconds"] = time.perf_counter() - t0
    write_json(args.out / "refine.json", result)
    fig = Figure(figsize=(11, 4))
    ax = fig.subplots(1, 2)
    for r in runs:
        if "history" in r:
            it = [h["iteration"] for h in r["history"]]
            ax[0].plot(it, [h["resolution"] for h in r["history"]], marker="o", label=r["name"])
            ax[1].plot(r["fsc_truth"], label=r["name"])
    ax[0].set(xlabel="iteration", ylabel="half-map FSC 0.143 resolution (A)")
    ax[1].axhline(0.5, color="k", lw=0.8)
    ax[1].axvline(known["fsc05_truth_shell"], color="gray", ls=":", label="known-pose FSC-0.5 shell")
    ax[1].set(xlabel="shell", ylabel="FSC to the truth (final map)")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, args.out / "refine.png")
    print(f"known-pose FSC-0.5 shell {known['fsc05_truth_shell']} ({known['wall_seconds']:.0f} s)")
    for r in runs:
        if "fsc05_truth_shell" in r:
            print(f"{r['name']:<12} median {r['median_angular_error_deg']:.2f} deg, mean {r['mean_angular_error_deg']:.2f}, "
                  f"shift {r['median_shift_error_px']}, FSC-0.5 shell {r['fsc05_truth_shell']}, {r['iterations']} it., "
                  f"{r['wall_seconds']:.0f} s (volume updates {r['volume_update_seconds']:.0f} s)")
        else:
            print(f"{r['name']}: failed ({r['returncode']}), see {r['log']}")
    if result["comparison"]:
        print("side by side with RELION (same set; FSC-0.5 shell to the truth, known poses: "
              f"{known['fsc05_truth_shell']}):")
        print(f"  {'':<8} {'program':<36} {'median err':>10} {'shell':>6} {'wall s':>8} {'CPU s':>8}  state")
        for c in result["comparison"]:
            for who in ("jaxcryo", "relion"):
                e = c[who]
                if e is None:
                    print(f"  {c['task']:<8} {who:<36} {'-':>10}")
                    continue
                med = "-" if e["median_deg"] is None else f"{e['median_deg']:.2f} deg"
                cpu = "-" if e.get("cpu_seconds") is None else f"{e['cpu_seconds']:.0f}"
                print(f"  {c['task']:<8} {e['program']:<36} {med:>10} {str(e['fsc05_shell']):>6} "
                      f"{e['wall_seconds']:>8.0f} {cpu:>8}  {e['state']}")
    elif isinstance(result["relion"], dict) and result["relion"].get("available") is False:
        print(f"RELION: skipped ({result['relion']['reason']})")
    print(f"wrote {args.out / 'refine.json'} ({result['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
