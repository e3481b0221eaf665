"""Known-pose timing at box 128 on an idle machine: ``jaxcryo reconstruct`` (through the console script, with
and without the launcher's huge pages, ``JAXCRYO_HUGEPAGES=0``) against ``relion_reconstruct --ctf`` on the
same STAR file; whole commands (start-up, compilation, I/O included), wall and CPU seconds, page faults and
peak memory of each, alternated over ``--reps`` rounds. The set:
``jaxcryo simulate --box 128 --n-particles 20000 --pixel-size 1.5 ...`` (benchmarks/README.md, "Box 128").
Writes ``--json`` (default results/known_b128_timing.json), keeping the rows of earlier sessions under
``earlier``.

    python benchmarks/time_known_b128.py --star /path/b128/particles.star --work /tmp/t128 [--reps 3]
"""
import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import jaxcryo_command

RESULTS = Path(__file__).parent / "results" / "known_b128_timing.json"


def run(cmd, env=None, cwd=None):
    """One command's wall, CPU and system seconds, minor page faults and peak resident memory (its own
    rusage, from ``wait4``); its stderr goes to a temporary file, shown if it fails."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err.read().decode()[-2000:]}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "system_s": ru.ru_stime,
            "minor_page_faults": ru.ru_minflt, "max_rss_mb": ru.ru_maxrss / 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--star", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=str(RESULTS))
    p.add_argument("--set-note", default="", help="what the set is (generator, SNR), recorded in the JSON")
    a = p.parse_args()
    star, work = Path(a.star).resolve(), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    programs = {"jaxcryo": (jaxcryo_command(), {}),
                "jaxcryo_no_hugepages": (jaxcryo_command(), {"JAXCRYO_HUGEPAGES": "0"})}
    relion = shutil.which("relion_reconstruct")
    rows = []
    for rep in range(a.reps):
        for name, (cmd, extra) in programs.items():
            env = dict(os.environ, **extra)
            m = run([*cmd, "reconstruct", str(star), "--out", str(work / name), "--quiet"], env=env)
            rows.append({"program": name, "rep": rep, **m})
            print(rows[-1], flush=True)
        if relion:
            m = run([relion, "--i", star.name, "--o", str((work / "relion.mrc").resolve()), "--ctf"], cwd=star.parent)
            rows.append({"program": "relion_reconstruct", "rep": rep, **m})
            print(rows[-1], flush=True)
    old = json.loads(Path(a.json).read_text()) if Path(a.json).exists() else {}
    earlier = old.pop("earlier", [])
    if old:
        earlier.append(old)
    out = {"description": f"Idle {os.cpu_count()}-core machine, {time.strftime('%Y-%m-%d')}: jaxcryo reconstruct "
                          "(console script; with the launcher's transparent huge pages and without, "
                          "JAXCRYO_HUGEPAGES=0) vs relion_reconstruct --ctf, box 128, 20,000 particles, 1.5 A/px, a "
                          "jaxcryo-simulated set; whole commands, compilation and I/O included; "
                          "benchmarks/time_known_b128.py",
           "star": str(star), "set": a.set_note, "rows": rows, "load_average_after": os.getloadavg()}
    if relion:
        best = {n: min(r["wall_s"] for r in rows if r["program"] == n) for n in {r["program"] for r in rows}}
        out["best_wall_s"] = best
        out["ratio_best_wall"] = {n: best[n] / best["relion_reconstruct"] for n in programs}
        def ratios(key):  # each program's value over RELION's in the same round
            get = lambda n, k: next(r[key] for r in rows if r["program"] == n and r["rep"] == k)  # noqa: E731
            return {n: [get(n, k) / get("relion_reconstruct", k) for k in range(a.reps)] for n in programs}
        out["ratio_wall_per_round"], out["ratio_cpu_per_round"] = ratios("wall_s"), ratios("cpu_s")
    out["earlier"] = earlier
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out.get(k) for k in ("best_wall_s", "ratio_best_wall")}, indent=1))


if __name__ == "__main__":
    main()
