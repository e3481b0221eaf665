"""Print the markdown tables of benchmarks/README.md from the JSON the benchmark scripts wrote.

Usage: python benchmarks/make_tables.py [RESULTS_DIR ...]   (default: benchmarks/results benchmarks/results/gpu_h100)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(x, nd=1):
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def sgd_vs_psgd(path: Path) -> None:
    d = json.loads(path.read_text())
    m = d["machine"]
    print(f"\n`{path}`: {m['cpu']}, {m['cores']} cores, {m['device']}, JAX {m['jax']}, {m.get('date', '')}; "
          f"{d['settings']['interp']} slices, epoch cap {d['settings']['epochs_cap']}\n")
    print("| box | batch (regime) | SGD best of sweep | PSGD K=1 | PSGD K=4 | PSGD exact | Adam | CG | Wiener | "
          "SGD/PSGD-K1 epochs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in d["summary"]:
        def cell(k):
            e, s = r.get(f"{k}_epochs"), r.get(f"{k}_seconds")
            fin = r.get(f"{k}_final_fsc_opt_min")
            if e is None:
                return f"never (min FSC {fmt(fin, 2)})" if fin is not None else "—"
            return f"{e} ep / {fmt(s)} s"

        ratio = r.get("ratio_sgd_over_psgd_k1_epochs")
        rs = "—" if ratio is None else (("≥ " if r.get("ratio_is_lower_bound") else "") + f"{ratio:.2f}")
        print(f"| {r['box']} | {r['batch']} ({r['regime']}) | {cell('sgd')} [{r['sgd_best_of_sweep']}] | "
              f"{cell('psgd_k1')} | {cell('psgd_k4')} | {cell('psgd_exact')} | {cell('adam')} | {cell('cg')} | "
              f"{cell('wiener')} | {rs} |")
    print("\nFinal FSC-0.5 resolution to the ground truth (Å) at the epoch cap:\n")
    print("| box | batch | SGD | PSGD K=1 | PSGD K=4 | PSGD exact | Adam | CG | Wiener |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in d["summary"]:
        vals = [fmt(r.get(f"{k}_final_res05_gt"), 2) for k in
                ("sgd", "psgd_k1", "psgd_k4", "psgd_exact", "adam", "cg", "wiener")]
        print(f"| {r['box']} | {r['batch']} | " + " | ".join(vals) + " |")


def conditioning(path: Path) -> None:
    d = json.loads(path.read_text())
    m = d["machine"]
    print(f"\n`{path}`: {m['cpu']}, {m['cores']} cores, {m['device']}, JAX {m['jax']}, {m.get('date', '')}\n")
    print("| box | κ(H) no CTF | κ(D⁻¹H) no CTF | κ(H) CTF | κ(D⁻¹H) CTF | predicted |")
    print("| --- | --- | --- | --- | --- | --- |")
    a, b = d["kappa"]["no_ctf"], d["kappa"]["ctf"]
    for i, box in enumerate(a["box"]):
        print(f"| {box} | {fmt(a['kappa_H'][i])} | {fmt(a['kappa_DinvH'][i])} | {fmt(b['kappa_H'][i])} | "
              f"{fmt(b['kappa_DinvH'][i])} | {fmt(a['kappa_predicted'][i])} |")
    h = d["hutchinson"]
    e = h["error_vs_epoch"]
    pick = [i for i in (0, 9, 99) if i < len(e)]
    print(f"\nHutchinson running mean (box {h['box']}, batch {h['batch']}, {h['interp']}, K=1): relative error "
          + ", ".join(f"{e[i]:.3f} after {i + 1} epoch{'s' if i else ''}" for i in pick)
          + "; one batch vs K probes: " + ", ".join(f"K={k}: {v:.3f}" for k, v in h["error_vs_probes"].items()))


def slice_accuracy(path: Path) -> None:
    """Relative slice error against the exact DFT at shells N/8, N/4, 3N/8, N/2 and overall, per operator,
    for each volume at its largest box, with value+gradient time when measured."""
    d = json.loads(path.read_text())
    m = d["machine"]
    tim = {t["operator"]: t for t in d.get("timing", [])}
    tb = next(iter(tim.values()), None)
    print(f"\n`{path}`: {m['cpu']}, {m['cores']} cores, {m['device']}, JAX {m['jax']}, {m.get('date', '')}; "
          f"{d['settings']['images']} random rotations, operators in complex64\n")
    big = {}
    for c in d["cases"]:
        if c["box"] >= big.get(c["volume"], {"box": 0})["box"]:
            big[c["volume"]] = c
    cases = list(big.values())
    head = " | ".join(f"{c['volume']} (box {c['box']}): overall / N/8 / N/4 / 3N/8 / N/2" for c in cases)
    ext = f" | value+grad (box {tb['box']}, batch {tb['batch']}) |" if tb else " |"
    print(f"| operator | {head}{ext}")
    print("| --- | " + " | ".join("---" for _ in cases) + (" | --- |" if tb else " |"))
    e = lambda x: "—" if x is None else (f"{x:.0e}" if x < 1e-3 else f"{x:.3f}")  # noqa: E731
    for i, r in enumerate(cases[0]["results"]):
        cells = []
        for c in cases:
            rr = c["results"][i]
            a = rr["at"]
            cells.append(" / ".join(e(v) for v in (rr["overall"], a["N/8"], a["N/4"], a["3N/8"], a["N/2"])))
        t = tim.get(r["operator"])
        tcell = (f" | {t['gradient_s'] * 1e3:.0f} ms |" if t else " | — |") if tb else " |"
        print(f"| {r['operator']} | " + " | ".join(cells) + tcell)
    rec = d.get("reconstruction")
    if rec:
        print(f"\nLeast-squares optimum (CG, λ = {rec['lam']:g}, {rec['maxiter']} iterations) of each operator's "
              f"model "
              f"on {rec['n_particles']} noise-free images of the {rec['volume']} (box {rec['box']}, CTF, made by "
              f"NUFFT), relative error of the map to the truth:\n")
        print("| operator | overall | N/8 | N/4 | 3N/8 | N/2 − 1 | N/2 |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rec["results"]:
            a = r["at"]
            print(f"| {r['operator']} | " + " | ".join(e(v) for v in (r["overall"], a["N/8"], a["N/4"], a["3N/8"],
                                                                      a["N/2-1"], a["N/2"])) + " |")


def main(argv) -> int:
    dirs = [Path(a) for a in argv] or [Path("benchmarks/results"), Path("benchmarks/results/gpu_h100")]
    for d in dirs:
        if (d / "sgd_vs_psgd.json").exists():
            sgd_vs_psgd(d / "sgd_vs_psgd.json")
        if (d / "conditioning.json").exists():
            conditioning(d / "conditioning.json")
        if (d / "slice_accuracy.json").exists():
            slice_accuracy(d / "slice_accuracy.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
