"""The summaries of ``robustness.json`` (issue 19) and the marked blocks of the READMEs they fill.

``python benchmarks/robustness.py --report`` rewrites, from ``benchmarks/results/robustness.json``:

* ``README.md`` ``<!-- README_SUMMARY -->``: one line per (generator, set, SNR) at box 64, ranges over seeds;
* ``benchmarks/README.md`` ``<!-- SUMMARY -->``: one line per set (today's engine, variant ``default``);
* ``benchmarks/README.md`` ``<!-- FULLTABLE -->``: every row (``robustness.table``).

Everything between a block's markers is replaced; the text around them (the acceptance list, the analysis) is
written by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

#: The set of a summary's rows: what tells two sets apart (the seed is a column of its own).
_SET = ("generator", "box", "particles", "snr", "seed")
TASK_COLUMNS = ("local", "global", "abinitio")
RELION_COLUMNS = ("relion_local", "relion_global")


def _range(values: list, fmt: str = "{}", joiner: str = "–") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else fmt.format(lo) + joiner + fmt.format(hi)


def _default_rows(rows: list, volume_label) -> dict:
    """``{(set..., volume label): {task: row}}`` of today's engine (variant ``default``)."""
    sets: dict = {}
    for r in rows:
        if r.get("variant", "default") != "default":
            continue
        k = (*(r[x] for x in _SET), volume_label(r))
        sets.setdefault(k, {})[r["task"]] = r
    return sets


def _cell(r: dict | None, relion: bool = False) -> str:
    if r is None or r.get("median_angular_error_deg") is None:
        return "-" if r is None else f"failed ({r.get('returncode', '?')})"
    head = f"{r['median_angular_error_deg']:.2f}°, {r.get('fsc05_truth_shell', 'failed')}"
    if not relion:
        return f"{head} ({r['cpu_seconds']:.0f} CPU s)"
    stopped = r.get("returncode") == "timeout" or r.get("converged") is False
    return (f"{head} ({r.get('iterations', '?')} it{', stopped' if stopped else ''}, {r['wall_seconds']:.0f} s, "
            f"{r['cpu_seconds']:.0f} CPU s)")


def summary_table(rows: list, volume_label) -> str:
    """One line per set: the known-pose shell, the oracle's floor, each task's median error, shell and CPU time."""
    lines = ["| set (box, particles) | SNR (ASPIRE) / jaxcryo | seed | known shell | oracle | local | global | "
             "ab initio + refine | RELION local | RELION global |", "|" + "---|" * 10]
    sets = _default_rows(rows, volume_label)

    def order(k):
        gen, box, n, snr, seed, vol = k
        return (gen, vol, -snr, -box, seed)

    for k in sorted(sets, key=order):
        gen, box, n, snr, seed, vol = k
        t = sets[k]
        known = t.get("known")
        if known is None:
            continue
        name = f"{gen} b{box}" + ("" if n == 5000 else f", {n}") + ("" if vol == "asym" else f" ({vol})")
        sj = known.get("snr_jaxcryo")
        oracle = t.get("oracle")
        lines.append(
            f"| {name} | {snr:g} / {'-' if sj is None else f'{sj:.3g}'} | {seed} | "
            f"{known.get('fsc05_truth_shell', '-')} | "
            f"{'-' if oracle is None else '{:.2f}°'.format(oracle['median_angular_error_deg'])} | "
            + " | ".join(_cell(t.get(c)) for c in TASK_COLUMNS) + " | "
            + " | ".join(_cell(t.get(c), relion=True) for c in RELION_COLUMNS) + " |")
    return "\n".join(lines)


def readme_summary(rows: list, volume_label, box: int = 64, particles: int = 5000) -> str:
    """One line per (generator, volume, SNR) at ``box``/``particles``: ranges over the seeds of the median
    error and of the shell minus the known-pose shell; a task run on fewer seeds than the set names its seeds."""
    groups: dict = {}
    for k, t in _default_rows(rows, volume_label).items():
        gen, b, n, snr, seed, vol = k
        if b == box and n == particles and "known" in t:
            groups.setdefault((gen, vol, snr), {})[seed] = t
    lines = ["| set, SNR | seeds | known-pose shell | oracle | local refine | global refine from 30 Å | "
             "ab initio + refine |", "|" + "---|" * 7]
    for (gen, vol, snr) in sorted(groups, key=lambda g: (g[0], g[1], -g[2])):
        by_seed = groups[(gen, vol, snr)]
        seeds = sorted(by_seed)
        known = [by_seed[s]["known"].get("fsc05_truth_shell") for s in seeds]
        oracle = [by_seed[s]["oracle"]["median_angular_error_deg"] for s in seeds if "oracle" in by_seed[s]]
        cells = []
        for task in TASK_COLUMNS:
            have = [s for s in seeds if by_seed[s].get(task, {}).get("median_angular_error_deg") is not None]
            if not have:
                cells.append("-")
                continue
            err = [by_seed[s][task]["median_angular_error_deg"] for s in have]
            gap = [by_seed[s][task].get("fsc05_truth_shell", 0) - by_seed[s]["known"]["fsc05_truth_shell"]
                   for s in have]
            cell = f"{_range(err, '{:.2f}')}°, {_range(gap, '{:d}', ' to ')}"
            cells.append(cell + ("" if have == seeds else f" (seed{'s' if len(have) > 1 else ''} "
                                 f"{', '.join(map(str, have))})"))
        name = f"{gen} {snr:g}" if vol == "asym" else f"{gen} ({vol}) {snr:g}"
        lines.append(f"| {name} | {', '.join(map(str, seeds))} | {_range(known)} | "
                     f"{_range(oracle, '{:.2f}')}{'°' if oracle else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fill(path: Path, name: str, text: str) -> None:
    """Replace what lies between ``<!-- name -->`` and ``<!-- /name -->`` in ``path`` by ``text``."""
    s = path.read_text()
    pat = re.compile(rf"(<!-- {name} -->\n).*?(\n<!-- /{name} -->)", re.S)
    if not pat.search(s):
        raise SystemExit(f"{path}: no <!-- {name} --> ... <!-- /{name} --> block")
    path.write_text(pat.sub(lambda m: m.group(1) + text + m.group(2), s, count=1))
