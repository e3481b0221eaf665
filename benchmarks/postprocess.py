"""``jaxcryo mask`` and ``jaxcryo postprocess`` side by side with RELION 3.1's ``relion_mask_create`` and
``relion_postprocess`` (issue 18).

Half maps from three runs, all simulated with ``jaxcryo simulate`` (phantom, CTF, SNR 0.1):

* ``reconstruct_box64``: ``jaxcryo reconstruct`` at box 64, 3 Å/px (maps near 10 Å, so the B-factor is fitted
  from 20 Å: ``--fit-from 20`` / ``--autob_lowres 20``);
* ``reconstruct_box128``: ``jaxcryo reconstruct`` at box 128, 1.5 Å/px (fit from RELION's default 10 Å);
* ``refine_box64``: ``jaxcryo refine --local-only`` at box 64 from poses perturbed by 3° and 1 px, against the
  ground truth low-passed to 30 Å (fit from 20 Å).

For each, the mask is made from the half-map average by ``relion_mask_create`` (low-pass 15 Å, the threshold of
:func:`jaxcryo.ndimage.auto_threshold`, extension 3 px, soft edge 3 px: RELION's GUI defaults) and by
``jaxcryo mask`` with the same settings (Dice on the voxels above 0.5); RELION's mask goes to both
``relion_postprocess --mask M --auto_bfac --low_pass -1`` and ``jaxcryo postprocess --mask M``.

Acceptance (issue 18): corrected FSC-0.143 resolution within one Fourier shell of RELION's, B-factor within
15%, masked FSC within 0.03 at every shell up to the 0.143 resolution, mask Dice >= 0.95.

Usage::

    python benchmarks/postprocess.py --out benchmarks/results     # ~12 min on 2 busy CPU cores
    python benchmarks/postprocess.py --quick --out DIR             # CI: box 32, reconstruct only

RELION is skipped (recorded as such) when ``relion_postprocess`` is not on the PATH. Writes
``DIR/postprocess.json`` and ``DIR/postprocess.png``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, parse_args, run_timed, use_agg, write_json  # noqa: E402

import jaxcryo as jc  # noqa: E402
from jaxcryo.plotting import save_figure  # noqa: E402
from jaxcryo.ndimage import auto_threshold, first_shell_below, low_pass  # noqa: E402

#: Mask settings given to both programs (RELION's mask-creation GUI defaults).
MASK = {"lowpass": 15.0, "extend": 3.0, "soft_edge": 3.0}
#: Extra seeds of the phase randomisation, both programs (the main comparison uses each one's default, 0).
SEEDS = (1, 2, 3, 4, 5)
GOALS = {"shells": 1.0, "bfactor_rel": 0.15, "masked_fsc": 0.03, "dice": 0.95}


def jaxcryo_cmd() -> list[str]:
    return [sys.executable, "-m", "jaxcryo"]


def run(cmd, log: Path) -> dict:
    r = run_timed(cmd, log=log, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    if r["returncode"] != 0:
        tail = Path(log).read_text()[-2000:]
        raise RuntimeError(f"command failed ({r['returncode']}): {r['command']}\n{tail}")
    return r


def make_case(d: Path, name: str, box: int, px: float, n: int, refine: bool) -> dict:
    """Simulate a set, then ``jaxcryo reconstruct`` (or ``refine --local-only``); returns the half-map paths."""
    import json

    d.mkdir(parents=True, exist_ok=True)
    sim = d / "sim"
    record = d / "steps.json"  # the steps' timings, kept when a later run reuses the data (--work)
    steps = json.loads(record.read_text()) if record.exists() else {}
    if not (sim / "particles.star").exists():
        steps["simulate"] = run(jaxcryo_cmd() + ["simulate", "--out", sim, "--box", box, "--pixel-size", px,
                                                 "--n-particles", n, "--snr", 0.1, "--perturb-angle", 3,
                                                 "--perturb-shift", 1, "--quiet", "--seed", 1], d / "simulate.log")
    out = d / ("refine" if refine else "reconstruct")
    if not (out / "half2.mrc").exists():
        if refine:
            truth, tpx = jc.read_map(sim / "ground_truth.mrc")
            jc.write_map(d / "reference_30A.mrc", low_pass(truth, tpx, 30.0), tpx)
            steps["refine"] = run(jaxcryo_cmd() + ["refine", sim / "particles_perturbed.star", "--reference",
                                                   d / "reference_30A.mrc", "--out", out, "--local-only",
                                                   "--iterations", 3, "--quiet"], d / "refine.log")
        else:
            steps["reconstruct"] = run(jaxcryo_cmd() + ["reconstruct", sim / "particles.star", "--out", out,
                                                        "--quiet"], d / "reconstruct.log")
    steps = {k: {kk: v[kk] for kk in ("command", "wall_s", "cpu_s")} for k, v in steps.items()}
    write_json(record, steps)
    wanted = ("simulate", "refine" if refine else "reconstruct")
    return {"name": name, "box": box, "pixel_size": px, "particles": n, "half1": out / "half1.mrc",
            "half2": out / "half2.mrc", "steps": {k: v for k, v in steps.items() if k in wanted}}


def read_relion_star(path: Path) -> dict:
    """``relion_postprocess``'s STAR: the general block and the FSC table (columns by label)."""
    text = path.read_text()
    general = {}
    for line in text.split("data_fsc")[0].splitlines():
        if line.startswith("_rln"):
            k, v = line.split()[:2]
            general[k[4:]] = v
    block = text.split("data_fsc")[1].split("data_guinier")[0]
    labels = [ln.split()[0][4:] for ln in block.splitlines() if ln.startswith("_rln")]
    rows = [ln.split() for ln in block.splitlines() if ln.strip() and ln.split()[0].lstrip("-").isdigit()]
    table = {lab: np.array([float(r[i]) for r in rows]) for i, lab in enumerate(labels)}
    return {"general": general, "fsc": table}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def compare(case: dict, d: Path, fit_from: float, relion: bool, seeds=SEEDS) -> dict:
    h1, px = jc.read_map(case["half1"])
    h2, _ = jc.read_map(case["half2"])
    n = h1.shape[0]
    avg = d / "average.mrc"
    jc.write_map(avg, 0.5 * (h1 + h2), px)
    threshold = auto_threshold(low_pass(0.5 * (h1 + h2), px, MASK["lowpass"]))
    rec = {**case, "fit_from": fit_from, "threshold": threshold, "mask_settings": MASK}
    rec["jaxcryo_mask"] = run(jaxcryo_cmd() + ["mask", avg, "--out", d / "jaxcryo_mask.mrc", "--lowpass",
                                               MASK["lowpass"], "--threshold", repr(threshold), "--extend",
                                               MASK["extend"], "--soft-edge", MASK["soft_edge"]], d / "mask.log")
    mask_path = d / "jaxcryo_mask.mrc"
    if relion:
        rec["relion_mask"] = run(["relion_mask_create", "--i", avg, "--o", d / "relion_mask.mrc", "--lowpass",
                                  MASK["lowpass"], "--ini_threshold", repr(threshold), "--extend_inimask",
                                  MASK["extend"], "--width_soft_edge", MASK["soft_edge"], "--angpix", px],
                                 d / "relion_mask.log")
        mask_path = d / "relion_mask.mrc"
        mj, _ = jc.read_map(d / "jaxcryo_mask.mrc")
        mr, _ = jc.read_map(mask_path)
        rec["mask_dice"] = dice(mj, mr)
        rec["mask_max_abs_difference"] = float(np.abs(mj - mr).max())
        rec["mask_fraction_above_half"] = float((mr > 0.5).mean())
    jout = d / "jaxcryo_postprocess"
    rec["jaxcryo_postprocess"] = run(jaxcryo_cmd() + ["postprocess", case["half1"], case["half2"], "--mask",
                                                      mask_path, "--fit-from", fit_from, "--out", jout],
                                     d / "postprocess.log")
    import json

    ours = json.loads((jout / "postprocess.json").read_text())
    keys = ("resolution_0143", "resolution_05", "bfactor", "fit_from", "fit_to", "intercept", "randomise_shell",
            "unmasked_fallback", "frequency", "fsc_unmasked", "fsc_masked", "fsc_randomised", "fsc_corrected")
    rec["jaxcryo"] = {k: ours[k] for k in keys}
    corr = np.array(ours["fsc_corrected"], float)
    rec["jaxcryo"]["shell_0143"] = first_shell_below(corr, 0.143) - 1  # last shell at or above, as RELION
    rec["jaxcryo"]["shell_0143_interpolated"] = n * px / ours["resolution_0143"]
    if not relion:
        return rec
    rout = d / "relion_postprocess"
    rout.mkdir(exist_ok=True)
    rec["relion_postprocess"] = run(["relion_postprocess", "--i", case["half1"], "--i2", case["half2"], "--mask",
                                     mask_path, "--auto_bfac", "--autob_lowres", fit_from, "--low_pass", -1,
                                     "--angpix", px, "--o", rout / "postprocess"], d / "relion_postprocess.log")
    star = read_relion_star(rout / "postprocess.star")
    g, t = star["general"], star["fsc"]
    theirs = {"resolution_0143": float(g["FinalResolution"]), "bfactor": float(g["BfactorUsedForSharpening"]),
              "randomise_from": float(g["RandomiseFrom"]), "intercept": float(g["FittedInterceptGuinierPlot"]),
              "fsc_unmasked": t["FourierShellCorrelationUnmaskedMaps"].tolist(),
              "fsc_masked": t["FourierShellCorrelationMaskedMaps"].tolist(),
              "fsc_randomised": t["CorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"].tolist(),
              "fsc_corrected": t["FourierShellCorrelationCorrected"].tolist()}
    theirs["shell_0143"] = int(round(n * px / theirs["resolution_0143"]))
    # RELION 3.1 reports the unmasked FSC as the corrected one when that reaches further (no flag in its STAR)
    theirs["unmasked_fallback"] = bool(np.array_equal(t["FourierShellCorrelationCorrected"],
                                                      t["FourierShellCorrelationUnmaskedMaps"]))
    rec["relion"] = theirs
    ours_masked = np.array(ours["fsc_masked"], float)
    last = max(rec["jaxcryo"]["shell_0143"], theirs["shell_0143"])
    diff = np.abs(ours_masked - np.array(theirs["fsc_masked"]))[1:last + 1]
    jmap, _ = jc.read_map(jout / "postprocess.mrc")
    rmap, _ = jc.read_map(rout / "postprocess.mrc")
    rec["comparison"] = {
        "shell_difference": abs(rec["jaxcryo"]["shell_0143"] - theirs["shell_0143"]),
        "shell_difference_interpolated": abs(rec["jaxcryo"]["shell_0143_interpolated"] - theirs["shell_0143"]),
        "bfactor_relative_difference": abs(ours["bfactor"] - theirs["bfactor"]) / abs(theirs["bfactor"]),
        "masked_fsc_max_abs_difference": float(diff.max()),
        "masked_fsc_shells_compared": last,
        "unmasked_fsc_max_abs_difference": float(np.abs(np.array(ours["fsc_unmasked"])
                                                        - np.array(theirs["fsc_unmasked"]))[1:].max()),
        "postprocessed_map_correlation": float(np.corrcoef(jmap.ravel(), rmap.ravel())[0, 1]),
    }
    # the phase randomisation is random: the B-factor's spread over seeds, for both programs
    m, _ = jc.read_map(mask_path)
    spread = {"seeds": list(seeds), "jaxcryo_bfactor": [], "relion_bfactor": [], "jaxcryo_resolution": [],
              "relion_resolution": []}
    for seed in seeds:
        r = jc.postprocess(h1, h2, pixel_size=px, mask=m, fit_from=fit_from, seed=seed)
        spread["jaxcryo_bfactor"].append(r.bfactor)
        spread["jaxcryo_resolution"].append(r.resolution_0143)
        so = rout / f"seed{seed}"
        run(["relion_postprocess", "--i", case["half1"], "--i2", case["half2"], "--mask", mask_path, "--auto_bfac",
             "--autob_lowres", fit_from, "--low_pass", -1, "--angpix", px, "--random_seed", seed, "--o", so],
            d / f"relion_postprocess_seed{seed}.log")
        g = read_relion_star(so.with_suffix(".star"))["general"]
        spread["relion_bfactor"].append(float(g["BfactorUsedForSharpening"]))
        spread["relion_resolution"].append(float(g["FinalResolution"]))
    if seeds:
        rec["seed_spread"] = spread
    c = rec["comparison"]
    c["pass"] = {"resolution_within_one_shell": c["shell_difference"] <= GOALS["shells"],
                 "bfactor_within_15pc": c["bfactor_relative_difference"] <= GOALS["bfactor_rel"],
                 "masked_fsc_within_003": c["masked_fsc_max_abs_difference"] <= GOALS["masked_fsc"],
                 "mask_dice_095": rec["mask_dice"] >= GOALS["dice"]}
    return rec


def print_table(out: dict) -> None:
    """The markdown tables of benchmarks/README.md."""

    def yn(x):
        return "yes" if x else "no"

    print("| half maps | box, Å/px | fit from | corrected FSC-0.143: jaxcryo / RELION (Å; shells) | B-factor: "
          "jaxcryo / RELION (Å²; difference) | masked FSC max difference to 0.143 | mask Dice | unmasked FSC "
          "used instead: jaxcryo / RELION | all goals |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in out["results"]:
        j = r["jaxcryo"]
        if "relion" not in r:
            print(f"| {r['name']} | {r['box']}, {r['pixel_size']} | {r['fit_from']:g} Å | {j['resolution_0143']:.2f} "
                  f"/ — | {j['bfactor']:.0f} / — | — | — | — | RELION absent |")
            continue
        t, c = r["relion"], r["comparison"]
        print(f"| {r['name']} | {r['box']}, {r['pixel_size']} | {r['fit_from']:g} Å | {j['resolution_0143']:.2f} / "
              f"{t['resolution_0143']:.2f} (shell {j['shell_0143']} / {t['shell_0143']}) | {j['bfactor']:.0f} / "
              f"{t['bfactor']:.0f} ({100 * c['bfactor_relative_difference']:.1f}%) | "
              f"{c['masked_fsc_max_abs_difference']:.3f} (shells 1–{c['masked_fsc_shells_compared']}) | "
              f"{r['mask_dice']:.3f} | {yn(j['unmasked_fallback'])} / {yn(t['unmasked_fallback'])} | "
              f"{'yes' if all(c['pass'].values()) else 'NO'} |")
    print()
    print("| half maps | B-factor over phase-randomisation seeds 1–5: jaxcryo | RELION |")
    print("| --- | --- | --- |")
    for r in out["results"]:
        sp = r.get("seed_spread")
        if sp:
            print(f"| {r['name']} | " + " | ".join(", ".join(f"{b:.0f}" for b in sp[k])
                                                 for k in ("jaxcryo_bfactor", "relion_bfactor")) + " |")


def plot(records: list, path: Path) -> None:
    use_agg()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(5.2 * len(records), 4.0), squeeze=False)
    colours = {"fsc_corrected": "k", "fsc_unmasked": "tab:green", "fsc_masked": "tab:blue",
               "fsc_randomised": "tab:red"}
    for ax, r in zip(axes[0], records):
        f = np.array(r["jaxcryo"]["frequency"], float)
        for key, col in colours.items():
            ax.plot(f, r["jaxcryo"][key], color=col, lw=1.6, label=f"jaxcryo {key[4:]}")
            if "relion" in r:
                ax.plot(f, r["relion"][key], color=col, lw=1.0, ls="--", label=f"RELION {key[4:]}")
        ax.axhline(0.143, color="gray", lw=0.7, ls=":")
        title = f"{r['name']}: {r['jaxcryo']['resolution_0143']:.2f} Å, B {r['jaxcryo']['bfactor']:.0f}"
        if "relion" in r:
            title += f"\nRELION {r['relion']['resolution_0143']:.2f} Å, B {r['relion']['bfactor']:.0f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("frequency (1/Å)")
        ax.set_ylim(-0.4, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("FSC")
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle("postprocess: jaxcryo (solid) vs RELION 3.1 (dashed), same mask", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    def extra(p):
        p.add_argument("--work", type=Path, default=None, help="folder for the data and runs (default: temporary)")
        p.add_argument("--no-relion", action="store_true", help="skip RELION even when installed")
        p.add_argument("--table", type=Path, default=None, help="only print the README table of this JSON")

    args = parse_args(__doc__.splitlines()[0], add_arguments=extra)
    if args.table is not None:
        import json

        print_table(json.loads(args.table.read_text()))
        return 0
    relion = (not args.no_relion and all(shutil.which(b) for b in ("relion_postprocess", "relion_mask_create")))
    why = None if relion else ("--no-relion" if args.no_relion else "relion_postprocess / relion_mask_create "
                               "not on the PATH (Debian: apt-get install relion, 3.1)")
    work = args.work or Path(tempfile.mkdtemp(prefix="jaxcryo_postprocess_"))
    if args.quick:
        cases = [("reconstruct_box32", 32, 3.0, 600, False, 20.0)]
    else:
        cases = [("reconstruct_box64", 64, 3.0, 3000, False, 20.0),
                 ("reconstruct_box128", 128, 1.5, 3000, False, 10.0),
                 ("refine_box64", 64, 3.0, 3000, True, 20.0)]
    records = []
    for name, box, px, n, refine, fit_from in cases:
        data = work / f"box{box}"  # refine_box64 refines the reconstruct_box64 set (perturbed poses)
        case = make_case(data, name, box, px, n, refine)
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        rec = compare(case, d, fit_from, relion, seeds=() if args.quick else SEEDS)
        records.append(rec)
        c = rec.get("comparison")
        print(f"{name}: jaxcryo {rec['jaxcryo']['resolution_0143']:.2f} Å B {rec['jaxcryo']['bfactor']:.1f}"
              + (f" | RELION {rec['relion']['resolution_0143']:.2f} Å B {rec['relion']['bfactor']:.1f} | "
                 f"shells {c['shell_difference']}, B {100 * c['bfactor_relative_difference']:.1f}%, "
                 f"masked FSC {c['masked_fsc_max_abs_difference']:.3f}, Dice {rec['mask_dice']:.3f}" if c else ""),
              flush=True)
    out = {"machine": machine_info(), "settings": {"quick": args.quick, "mask": MASK, "goals": GOALS},
           "relion": {"available": relion, "reason": why}, "results": records}
    if relion:
        import subprocess

        v = subprocess.run(["relion_postprocess", "--version"], capture_output=True, text=True)
        out["relion"]["version"] = " ".join((v.stdout or v.stderr).split()[:3])
        out["all_pass"] = all(all(r["comparison"]["pass"].values()) for r in records)
    write_json(args.out / "postprocess.json", out)
    plot(records, args.out / "postprocess.png")
    print(f"wrote {args.out / 'postprocess.json'} and postprocess.png")
    print_table(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
