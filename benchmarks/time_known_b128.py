"""Idle-machine timing (8th session; paths of that machine: edit before reuse): jaxcryo reconstruct (this commit and the commit before the FFT change) vs
relion_reconstruct --ctf on a box-128, 20,000-particle jaxcryo-simulated set (1.5 A/px, SNR 0.07)."""
import json, os, resource, subprocess, sys, time
star = "/work/prof/b128/particles.star"
def run(cmd, env=None, cwd=None):
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN); t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, capture_output=True)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
rows = []
py = "/work/venv/bin/python"
for rep in range(2):
    for name, path in (("jaxcryo_before_fft", "/work/qmain"), ("jaxcryo", "/work/main")):
        env = dict(os.environ, PYTHONPATH=path)
        w, c = run([py, "-m", "jaxcryo", "reconstruct", star, "--out", f"/work/prof/t_{name}", "--quiet"], env=env)
        rows.append({"program": name, "rep": rep, "wall_s": w, "cpu_s": c})
    w, c = run(["relion_reconstruct", "--i", "particles.star", "--o", "/work/prof/t_relion.mrc", "--ctf"], cwd="/work/prof/b128")
    rows.append({"program": "relion_reconstruct", "rep": rep, "wall_s": w, "cpu_s": c})
    print(rows[-3:], flush=True)
load = os.getloadavg()
print(json.dumps({"rows": rows, "load_average_after": load}, indent=1))
