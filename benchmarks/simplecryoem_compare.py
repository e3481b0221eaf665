"""jaxcryo's PSGD epoch against the paper's reference code (simplecryoem), side by side in one run.

One simulated data set (box 64, 2,000 images, CTF, shifts, SNR 0.5; ``jaxcryo.data._simulate``) is reconstructed
for a few epochs, in float64, with trilinear slices, batch 100 and the paper's objective (Tikhonov
alpha = 1e-8), by

* ``simplecryoem``: the paper's code (Toader et al.), ``simplecryoem.optimization.precon_sgd``, i.e.
  Algorithm 1: Hutchinson diagonal with one Rademacher probe per step, D_0 = 1, beta = 0.9, threshold
  1 / (voxels in the outermost shell), preconditioned Armijo backtracking (eta_0 = 10, c = 0.99, as in the
  paper's notebook ``1_Preconditioned_SGD.ipynb``), set up exactly as that notebook does (``Slice`` with the
  3D mask, ``Loss(alpha=1e-8)``, ``get_sgd_vol_ops``). Its code is GPL and is not vendored: it is imported
  from ``--simplecryoem PATH`` (a checkout; ``PATH/src`` is put on ``sys.path``) or ``$SIMPLECRYOEM_PATH``,
  in a subprocess run by ``--simplecryoem-python`` (or ``$SIMPLECRYOEM_PYTHON``; default this interpreter),
  since it needs ``pyem`` and its dependencies, best kept in their own virtual environment. The data go
  to it as an ``.npz`` in its conventions (standard-order FFTs, Euler angles (psi, tilt, rot) in radians,
  shifts in Å, 9 CTF parameters, volume axes (y, x, z)); the conversion is checked by projecting the truth
  with its forward model (correlation with the clean images, ``convention_check``). When simplecryoem is
  absent that side is skipped and said so.
* ``jaxcryo-psgd-paper``: ``jaxcryo.preconditioned_sgd(n_probes=1, init_value=1.0, linesearch=True,
  steps_per_epoch=...)`` with :func:`jaxcryo.solvers._fit` (float64), the paper's Algorithm 1 as jaxcryo offers it
  (its Armijo constant is c = 1e-4, and a shell floor on the diagonal).
* ``jaxcryo-psgd-paper-c0.99``: the same pieces (``hutchinson_diagonal``, ``scale_by_diagonal``,
  ``armijo_linesearch``) chained with the notebook's c = 0.99, so both codes do the same line-search work.
* ``jaxcryo-psgd-default``: jaxcryo's default PSGD (``jaxcryo.PSGD()``: harmonic step ``eta_0/(1+epoch)``,
  no line search), for context.

The epochs are interleaved: each round runs one epoch of every method back to back (simplecryoem's worker
waits between its epochs: its ``precon_sgd`` runs unchanged, in one call, and is paused at the ``Epoch k/N``
line it prints), so a change of load on a shared machine hits all methods alike. For each method: the
first epoch (compilation included; jaxcryo's own persistent compilation cache is not enabled here) apart,
and the steady-state epoch (median over the later epochs) as images/s, in wall time and in CPU time of
its process (less sensitive to other jobs on the machine); objective evaluations per step (line search);
the dtype of the volume after the steps (complex128 = float64 really used); the FSC-0.5 resolution to the
truth (a sanity check that all solve the problem, not a ranking). ``ratio``: jaxcryo's steady images/s
over simplecryoem's (``ratio_cpu_time``, ``ratio_per_round`` beside it). simplecryoem's epoch also ends
with one loss evaluation per batch for its printout; it is timed alone too (``loss_report_pass_s``) and
``images_per_s_without_report_pass`` leaves it out. With ``--profile`` (on in full mode) one jaxcryo
float64 step is broken down on one device-resident batch: forward, objective value, value-and-gradient,
the Hutchinson HVP, and the whole step.

Usage: python benchmarks/simplecryoem_compare.py [--quick] [--out DIR] [--simplecryoem PATH]
       [--simplecryoem-python PYTHON] [--n-particles 2000] [--box 64] [--batch 100] [--epochs 4]
Writes DIR/simplecryoem_compare.json and DIR/simplecryoem_compare.png.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ALPHA = 1e-8  # the paper's Tikhonov weight
ETA0 = 10.0  # the paper's initial Armijo step
C_PAPER = 0.99  # the Armijo constant of the paper's notebook
BETA = 0.9


# --------------------------------------------------------------------------------------------------
# The simplecryoem side (runs in a subprocess, possibly in another virtual environment; no jaxcryo here)
# --------------------------------------------------------------------------------------------------
def _simplecryoem_sys_path(path: str | None) -> None:
    if path:
        p = Path(path)
        sys.path.insert(0, str(p / "src") if (p / "src" / "simplecryoem").is_dir() else str(p))


PROTO = "@@ "  # prefix of the worker's protocol lines on its stdout


class _EpochGate:
    """Stands in for ``sys.stdout`` while ``precon_sgd`` runs: it swallows the function's printout and, at
    each ``"Epoch k/N"`` line it prints, calls ``on_epoch(k)`` (so epochs can be timed, and paused between,
    without changing the paper's code)."""

    def __init__(self, on_epoch):
        import re

        self.on_epoch, self.pat = on_epoch, re.compile(r"^Epoch (\d+)/(\d+)")

    def write(self, s):
        m = self.pat.match(s)
        if m:
            self.on_epoch(int(m.group(1)))
        return len(s)

    def flush(self):
        pass


def worker(data_path: str, sc_path: str | None, out_path: str) -> None:
    """Run simplecryoem's ``precon_sgd`` on the data in ``data_path``, one epoch per ``go`` line on stdin.

    Protocol (stdout lines prefixed ``@@ ``, JSON): ``unavailable`` (with ``reason``) and exit; ``ready`` after
    the setup; then, for each ``go``, one ``epoch`` event (``wall_s``, ``cpu_s``, ``evals``); after the last
    epoch, one more ``go`` for the ``done`` event (the loss pass is timed then, while nothing else runs).
    The final volume is saved to ``out_path`` (``.npz``).
    """
    import numpy as np

    proto = sys.stdout

    def send(**ev):
        proto.write(PROTO + json.dumps(ev) + "\n")
        proto.flush()

    _simplecryoem_sys_path(sc_path)
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    try:
        import simplecryoem
        from simplecryoem.forwardmodel import Slice
        from simplecryoem.fsc import calc_fsc
        from simplecryoem.optimization import GradV, Loss, get_sgd_vol_ops, precon_sgd
        from simplecryoem.utils import create_3d_mask, create_grid
    except Exception as e:  # noqa: BLE001 - absent or broken: report why
        send(event="unavailable", reason=f"cannot import simplecryoem: {type(e).__name__}: {e}")
        return
    info: dict = {"module": str(Path(simplecryoem.__file__).resolve().parent), "jax": jax.__version__,
                  "python": sys.executable}
    try:
        root = Path(simplecryoem.__file__).resolve().parents[2]
        info["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                        text=True).stdout.strip() or None
    except Exception:  # noqa: BLE001
        info["commit"] = None

    d = np.load(data_path)
    n, px, batch, n_epochs, c = int(d["n"]), float(d["px"]), int(d["batch"]), int(d["epochs"]), float(d["c"])
    N = d["imgs_f"].shape[0]
    # As simplecryoem.preprocess and the paper's notebook set it up.
    x_grid = create_grid(n, px)
    radius = (x_grid[1] / 2 - 1) * x_grid[0] if n % 2 == 0 else (x_grid[1] - 1) / 2 * x_grid[0]
    mask = create_3d_mask(x_grid, (0, 0, 0), radius)
    imgs_f = jnp.asarray(d["imgs_f"]) * mask[0].reshape(-1)  # the notebook's `imgs_f = imgs_f * mask2d`
    angles, shifts, ctf = d["angles"], d["shifts"], d["ctf"]
    sigma = np.ones(n * n)
    slice_obj = Slice(x_grid, mask=mask, interp_method="tri")
    loss_obj = Loss(slice_obj, alpha=ALPHA)
    grad_func, loss_func, hvp_func, _ = get_sgd_vol_ops(GradV(loss_obj), loss_obj, angles, shifts, ctf, imgs_f,
                                                       sigma)

    # Convention check: the truth through simplecryoem's forward model against the clean images.
    vt = jnp.asarray(d["truth_std"])
    idx = np.arange(min(N, 64))
    pred = np.asarray(slice_obj.slice_array(vt, angles[idx], shifts[idx], ctf[idx]))
    m2 = np.asarray(mask[0]).reshape(-1)
    pred, clean = pred * m2, d["clean_f"][idx] * m2
    info["convention_check"] = float(np.real(np.vdot(pred, clean)) / np.linalg.norm(pred) / np.linalg.norm(clean))

    ones = jnp.ones((n, n, n))
    _, _, shell_pts = calc_fsc(ones, ones, [1, n])
    thr = float(1 / jnp.max(shell_pts))  # the notebook's threshold alpha
    steps_per_epoch = int(np.ceil(N / batch))
    info.update(threshold=thr, c=c, eta0=ETA0, beta=BETA, n_particles=N, batch=batch, steps_per_epoch=steps_per_epoch)
    send(event="ready", **info)

    calls = {"n": 0}
    marks = {}

    def F(v, i):
        calls["n"] += 1
        return loss_func(v, i)

    def start_timer():
        marks.update(t=time.perf_counter(), cpu=time.process_time(), calls=calls["n"])

    def end_epoch(k):
        wall, cpu = time.perf_counter() - marks["t"], time.process_time() - marks["cpu"]
        # F calls of the epoch: each step's F(w0) and line-search trials, then one loss pass over all
        # batches for its printout (steps_per_epoch calls)
        send(event="epoch", epoch=k, wall_s=wall, cpu_s=cpu, evals=calls["n"] - marks["calls"])

    def on_epoch(k):
        if k > 1:
            end_epoch(k - 1)
        if sys.stdin.readline().strip() != "go":
            raise SystemExit(0)
        start_timer()

    sys.stdout = _EpochGate(on_epoch)
    try:
        v, losses, _, steps = precon_sgd(jax.random.PRNGKey(101), F, grad_func, hvp_func,
                                         jnp.zeros((n, n, n), jnp.complex128), ETA0, jnp.ones((n, n, n)),
                                         BETA * np.ones((n, n, n)), thr, n_epochs, batch_size=batch, N=N,
                                         adaptive_step_size=True, c=c, iter_display=1)
        v = jax.block_until_ready(v)
    finally:
        sys.stdout = proto
    end_epoch(n_epochs)
    if sys.stdin.readline().strip() != "go":  # not while the other methods run their last epoch
        raise SystemExit(0)
    # The loss pass at the end of each of its epochs, timed alone (to report the epoch without it too).
    idx_b = np.array_split(np.arange(N), steps_per_epoch)
    jax.block_until_ready(loss_func(v, idx_b[0]))
    t0 = time.perf_counter()
    for ib in idx_b:
        jax.block_until_ready(loss_func(v, ib))
    np.savez(out_path, volume_std=np.asarray(v))
    send(event="done", loss_report_pass_s=time.perf_counter() - t0, volume_dtype=str(v.dtype),
         losses=[float(x) for x in losses], step_sizes_last_epoch=[float(s) for s in steps[-steps_per_epoch:]])


class _Worker:
    """The simplecryoem worker subprocess, driven one epoch at a time."""

    def __init__(self, cmd, env, log_path: Path):
        self.log = open(log_path, "w")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                  env=env, bufsize=1)

    def event(self) -> dict | None:
        for line in self.p.stdout:
            if line.startswith(PROTO):
                return json.loads(line[len(PROTO):])
        return None  # exited

    def go(self) -> dict | None:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        return self.event()

    def close(self) -> int:
        try:
            self.p.stdin.close()
        except OSError:
            pass
        rc = self.p.wait(timeout=600)
        self.log.close()
        return rc


# --------------------------------------------------------------------------------------------------
# The main run (jaxcryo's venv)
# --------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--simplecryoem", default=os.environ.get("SIMPLECRYOEM_PATH"),
                   help="simplecryoem checkout (PATH/src/simplecryoem), default $SIMPLECRYOEM_PATH; "
                        "without it, only an importable simplecryoem is used")
    p.add_argument("--simplecryoem-python", default=os.environ.get("SIMPLECRYOEM_PYTHON", sys.executable),
                   help="interpreter for the simplecryoem side (its venv), default $SIMPLECRYOEM_PYTHON or this one")
    p.add_argument("--n-particles", type=int, default=None, help="default 2000 (quick: 300)")
    p.add_argument("--box", type=int, default=None, help="default 64 (quick: 32)")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--epochs", type=int, default=None, help="steady-state epochs after the first (default 4; quick 1)")
    p.add_argument("--snr", type=float, default=0.5)
    p.add_argument("--c", type=float, default=C_PAPER, help="simplecryoem's Armijo constant (notebook: 0.99)")
    p.add_argument("--profile", action="store_true", default=None, help="break one jaxcryo step down (full: on)")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--skip-simplecryoem", action="store_true", help="time jaxcryo only")
    p.add_argument("--worker", nargs=2, metavar=("DATA", "OUT"), help=argparse_suppress())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def start_simplecryoem(args, data_path: Path, tmp: Path):
    """Start the worker; return ``(worker, ready_event)`` or ``(None, {"reason": ...})``."""
    cmd = [args.simplecryoem_python, str(Path(__file__).resolve()), "--out", str(tmp), "--worker",
           str(data_path), str(tmp / "simplecryoem_volume.npz")]
    if args.simplecryoem:
        cmd += ["--simplecryoem", str(args.simplecryoem)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    try:
        w = _Worker(cmd, env, tmp / "simplecryoem.log")
    except OSError as e:
        return None, {"reason": f"cannot start {args.simplecryoem_python}: {e}"}
    ev = w.event()
    if ev is None or ev.get("event") != "ready":
        rc = w.close()
        reason = (ev or {}).get("reason") or f"worker exited (rc {rc}): {(tmp / 'simplecryoem.log').read_text()[-1500:]}"
        return None, {"reason": reason}
    return w, ev


def main(argv=None) -> None:
    from _common import parse_args

    args = parse_args(__doc__.splitlines()[0], argv, add_arguments)
    if args.worker:
        worker(args.worker[0], args.simplecryoem, args.worker[1])
        return

    import jax

    jax.config.update("jax_enable_x64", True)  # before anything is jitted
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxcryo as jc
    from _common import machine_info, save_figure, time_calls, use_agg, write_json
    from jaxcryo.solvers._diagonals import hutchinson_diagonal, scale_by_diagonal
    from jaxcryo.solvers._optim import ArmijoState, armijo_linesearch
    from jaxcryo.rotations._rotations import matrix_to_euler

    quick = args.quick
    box = args.box or (32 if quick else 64)
    n_part = args.n_particles or (300 if quick else 2000)
    epochs = args.epochs or (1 if quick else 4)
    batch = args.batch
    profile = (not quick) if args.profile is None else args.profile
    spe = int(np.ceil(n_part / batch))
    px = 3.0

    try:
        import jax_finufft  # noqa: F401

        sim_op = "nufft"
    except ImportError:
        sim_op = "trilinear"
    t0 = time.perf_counter()
    sim = jc.simulate(n_particles=n_part, box=box, snr=args.snr, pixel_size=px, seed=0, operator=sim_op)
    t_sim = time.perf_counter() - t0
    md = sim.metadata
    ds = jc.ArrayDataset(md, sim.images)
    truth_f = np.asarray(jc.volume_to_fourier(sim.volume.astype(np.float64)))
    out_load = os.getloadavg()[0]
    print(f"simulated {n_part} images, box {box} ({sim_op}) in {t_sim:.1f} s", flush=True)

    def resolution(vol_f) -> float:
        return float(jc.fsc(np.asarray(vol_f), truth_f, pixel_size=px, fourier=True).resolution_05)

    results: list[dict] = []
    out = {
        "machine": machine_info(),
        "settings": {"quick": quick, "box": box, "n_particles": n_part, "batch": batch, "epochs_steady": epochs,
                     "steps_per_epoch": spe, "snr": args.snr, "pixel_size": px, "alpha": ALPHA,
                     "simulated_with": sim_op, "interp": "trilinear", "dtype": "float64",
                     "simplecryoem_c": args.c, "eta0": ETA0, "init": "zeros", "loadavg_1min_start": out_load},
        "results": results,
    }

    # ---- jaxcryo's optimisers ----------------------------------------------------------------------------
    proj = jc.Projector(n=box, pixel_size=px, operator="trilinear")

    def paper_c(cval):
        return optax.chain(
            scale_by_diagonal(hutchinson_diagonal(0, 1, "paper", BETA, 1, 1.0), None, 0.5),
            armijo_linesearch(ETA0, c=cval, reset_every=spe))

    t0 = time.perf_counter()
    problem = jc.Problem(ds, proj, np.arange(n_part), ALPHA, batch, 0)
    strat = jc.PSGD()
    plan = strat.prepare(problem)  # initial step: Hutchinson estimate + power iteration (not in the epochs)
    t_prep_default = time.perf_counter() - t0
    variants = {
        "jaxcryo-psgd-paper": (jc.preconditioned_sgd(n_probes=1, init_value=1.0, linesearch=True,
                                                     steps_per_epoch=spe, init_learning_rate=ETA0), 0.0),
        "jaxcryo-psgd-paper-c0.99": (paper_c(C_PAPER), 0.0),
        "jaxcryo-psgd-default": (strat.transformation(problem, plan), t_prep_default),
    }
    runs = {name: {"opt": opt, "prepare_s": tp, "step": jc.make_step(opt, proj, ALPHA, dtype=jnp.float64),
                   "state": None, "wall": [], "cpu": []} for name, (opt, tp) in variants.items()}

    def armijo_evals(state) -> float | None:
        found = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, ArmijoState))
                 if isinstance(s, ArmijoState)]
        if not found:
            return None
        s = found[0]
        return float(s.n_evals) / max(int(s.count), 1)

    def jaxcryo_epoch(name: str) -> None:
        r = runs[name]
        e = 0 if r["state"] is None else r["state"].epoch
        c0 = time.process_time()
        res = jc.fit(ds, r["opt"], proj, epochs=e + 1, batch_size=batch, lam=ALPHA, dtype=jnp.float64, seed=0,
                     state=r["state"], step_fn=r["step"])
        r["cpu"].append(time.process_time() - c0)
        r["wall"].append(n_part / res.history[-1]["images_per_s"])
        r["state"], r["result"] = res.state, res

    # ---- simplecryoem worker ------------------------------------------------------------------------
    sc: dict = {"available": False}
    w = None
    tmpdir = tempfile.TemporaryDirectory()
    tmp = Path(tmpdir.name)
    if args.skip_simplecryoem:
        sc["reason"] = "--skip-simplecryoem"
    else:
        rot, tilt, psi = matrix_to_euler(md.rotations)
        c = md.ctf
        ctf9 = np.stack([c.defocus_u, c.defocus_v, c.astig_angle, c.phase_shift, c.voltage, c.amp_contrast,
                         c.cs, np.zeros(n_part), np.full(n_part, 2 * px)], -1).astype(np.float64)

        def std_fft2(im):  # their images: fft2(ifftshift(img)), flattened
            return np.fft.fft2(np.fft.ifftshift(np.asarray(im, np.float64), axes=(-2, -1))).reshape(len(im), -1)

        data = tmp / "data.npz"
        np.savez(data, imgs_f=std_fft2(sim.images), clean_f=std_fft2(sim.clean[:64]),
                 angles=np.deg2rad(np.stack([psi, tilt, rot], -1)), shifts=np.asarray(md.shifts, np.float64),
                 ctf=ctf9, n=box, px=px, batch=batch, epochs=1 + epochs, c=args.c,
                 truth_std=np.fft.ifftshift(truth_f).transpose(1, 2, 0))
        w, ev = start_simplecryoem(args, data, tmp)
        if w is None:
            sc["reason"] = ev["reason"]
            print(f"simplecryoem skipped: {sc['reason']}", flush=True)
        else:
            ev.pop("event")
            sc.update(available=True, **ev)
            sc.update(wall=[], cpu=[], evals=[])
            print(f"simplecryoem ready ({sc['module']}); convention check {sc['convention_check']:.4f}", flush=True)

    # ---- the epochs, interleaved: each round runs one epoch of every method ----------------------------
    loads = []
    for ep in range(1 + epochs):
        if w is not None:
            ev = w.go()
            if ev is None or ev.get("event") != "epoch":
                sc.update(available=False, reason=f"worker died in epoch {ep + 1}: "
                          + (tmp / "simplecryoem.log").read_text()[-1500:])
                w.close()
                w = None
            else:
                sc["wall"].append(ev["wall_s"])
                sc["cpu"].append(ev["cpu_s"])
                sc["evals"].append(ev["evals"])
                print(f"epoch {ep + 1}: simplecryoem {ev['wall_s']:.2f} s ({ev['cpu_s']:.2f} CPU-s)", flush=True)
        for name in runs:
            jaxcryo_epoch(name)
            print(f"epoch {ep + 1}: {name} {runs[name]['wall'][-1]:.2f} s ({runs[name]['cpu'][-1]:.2f} CPU-s)",
                  flush=True)
        loads.append(os.getloadavg()[0])
    out["settings"]["loadavg_1min_per_round"] = loads

    if w is not None:
        ev = w.go()
        rc = w.close()
        if ev is None or ev.get("event") != "done":
            sc.update(available=False, reason=f"worker failed at the end (rc {rc})")
        else:
            ev.pop("event")
            sc.update(ev)
            v_std = np.load(tmp / "simplecryoem_volume.npz")["volume_std"]
            sc["resolution_05"] = resolution(np.fft.fftshift(v_std.transpose(2, 0, 1)))
    tmpdir.cleanup()

    def summary(method, wall, cpu) -> dict:
        later_w, later_c = wall[1:], cpu[1:]
        # median over the steady epochs: robust to a load spike on a shared machine
        return {"method": method, "first_epoch_s": wall[0], "first_epoch_cpu_s": cpu[0],
                "epoch_s": float(np.median(later_w)), "epoch_s_mean": float(np.mean(later_w)),
                "epoch_s_each": later_w, "images_per_s": n_part / float(np.median(later_w)),
                "epoch_cpu_s": float(np.median(later_c)), "epoch_cpu_s_each": later_c,
                "images_per_cpu_s": n_part / float(np.median(later_c)), "epochs_for_resolution": 1 + epochs}

    if sc.get("available"):
        rec = summary("simplecryoem-precon_sgd", sc["wall"], sc["cpu"])
        ev_steps = [(e - spe) / spe for e in sc["evals"]]  # minus the loss pass of its printout
        rec.update(evals_per_step=float(np.mean(ev_steps)), volume_dtype=sc["volume_dtype"],
                   resolution_05=sc["resolution_05"],
                   images_per_s_without_report_pass=n_part / (rec["epoch_s"] - sc["loss_report_pass_s"]))
        results.append(rec)
        print(f"simplecryoem: {rec['images_per_s']:.1f} images/s (epoch {rec['epoch_s']:.1f} s, first "
              f"{rec['first_epoch_s']:.1f} s; {rec['images_per_cpu_s']:.1f} images/CPU-s), "
              f"{rec['evals_per_step']:.2f} evaluations/step, {rec['volume_dtype']}", flush=True)
    out["simplecryoem"] = {k: v for k, v in sc.items() if k not in ("losses",)}
    for name, r in runs.items():
        rec = summary(name, r["wall"], r["cpu"])
        ls = armijo_evals(r["state"].opt_state)
        vol = r["result"].volume_f
        # the step evaluates the objective with its gradient once, plus the line search's evaluations
        rec.update(prepare_s=r["prepare_s"], evals_per_step=None if ls is None else 1 + ls,
                   volume_dtype=str(vol.dtype), resolution_05=resolution(vol))
        results.append(rec)
        print(f"{name}: {rec['images_per_s']:.1f} images/s (epoch {rec['epoch_s']:.2f} s, first "
              f"{rec['first_epoch_s']:.1f} s; {rec['images_per_cpu_s']:.1f} images/CPU-s), {rec['volume_dtype']}, "
              f"FSC-0.5 {rec['resolution_05']:.2f} Å", flush=True)

    sc_rec = next((r for r in results if r["method"] == "simplecryoem-precon_sgd"), None)
    sc_rate = sc_rec["images_per_s"] if sc_rec else None
    sc_cpu = sc_rec["images_per_cpu_s"] if sc_rec else None
    out["ratio"] = {r["method"]: (r["images_per_s"] / sc_rate if sc_rate else None)
                    for r in results if r["method"].startswith("jaxcryo")}
    # per round (one epoch of every method back to back): simplecryoem's epoch time over jaxcryo's
    out["ratio_per_round"] = {r["method"]: ([a / b for a, b in zip(sc_rec["epoch_s_each"], r["epoch_s_each"])]
                                            if sc_rec else None)
                              for r in results if r["method"].startswith("jaxcryo")}
    out["ratio_cpu_time"] = {r["method"]: (r["images_per_cpu_s"] / sc_cpu if sc_cpu else None)
                             for r in results if r["method"].startswith("jaxcryo")}
    out["goal"] = {"ratio_at_least": 5.0,
                   "measure": "steady-state images/s of jaxcryo-psgd-paper over simplecryoem's, same run",
                   "met": None if sc_rate is None else bool(out["ratio"]["jaxcryo-psgd-paper"] >= 5.0)}

    # ---- profile of one jaxcryo float64 step -----------------------------------------------------------
    if profile:
        raw = jax.device_put(jc.load_batch(ds, np.arange(batch)))
        key = jax.random.PRNGKey(1)
        v0 = (jax.random.normal(key, (box,) * 3) + 1j * jax.random.normal(jax.random.split(key)[0], (box,) * 3))
        v0 = v0.astype(jnp.complex128) * 1e-3
        from jaxcryo.solvers._diagonals import hutchinson_samples

        @jax.jit
        def f_val(v, raw):
            return jc.objective(jc.to_batch(raw, jnp.float64), proj, ALPHA)(v)

        @jax.jit
        def f_vg(v, raw):
            return jc.value_and_grad(jc.objective(jc.to_batch(raw, jnp.float64), proj, ALPHA))(v)

        @jax.jit
        def f_hvp(v, raw):
            return hutchinson_samples(jc.objective(jc.to_batch(raw, jnp.float64), proj, ALPHA), v, key, 1)

        @jax.jit
        def f_fwd(v, raw):
            b = jc.to_batch(raw, jnp.float64)
            return proj(v, b.rotations, b.shifts, b.ctf)

        opt = variants["jaxcryo-psgd-paper"][0]
        step = jc.make_step(opt, proj, ALPHA, dtype=jnp.float64, donate=False)
        st0 = opt.init(v0)
        reps = 3 if quick else 7
        prof = {}
        fns = {"forward": lambda: f_fwd(v0, raw), "objective": lambda: f_val(v0, raw),
               "value_and_grad": lambda: f_vg(v0, raw), "hutchinson_hvp": lambda: f_hvp(v0, raw),
               "psgd_paper_step": lambda: step(v0, st0, raw)}
        times: dict = {nm: [] for nm in fns}
        for nm, fn in fns.items():
            prof[nm] = {"compile_s": time_calls(fn, 1)[0]}
        for _ in range(reps):  # round robin, so a change of load hits every part alike
            for nm, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[nm].append(time.perf_counter() - t0)
        for nm in fns:
            prof[nm]["ms"] = 1e3 * float(np.median(times[nm]))
        _, st1, _ = step(v0, st0, raw)
        ls = armijo_evals(st1)
        ls_from_fit = next(r["evals_per_step"] for r in results if r["method"] == "jaxcryo-psgd-paper")
        n_ls = (ls_from_fit - 1) if ls_from_fit else ls
        prof["line_search_evals_per_step"] = n_ls
        est = prof["value_and_grad"]["ms"] + prof["hutchinson_hvp"]["ms"] + (n_ls or 0) * prof["objective"]["ms"]
        prof["sum_of_parts_ms"] = est
        prof["share"] = {"value_and_grad": prof["value_and_grad"]["ms"] / est,
                         "hutchinson_hvp": prof["hutchinson_hvp"]["ms"] / est,
                         "line_search": (n_ls or 0) * prof["objective"]["ms"] / est}
        out["profile_jaxcryo_step_float64"] = prof
        print("profile (ms, float64, batch %d): " % batch
              + ", ".join(f"{k} {v['ms']:.1f}" for k, v in prof.items() if isinstance(v, dict) and "ms" in v),
              flush=True)

    use_agg()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    names = [r["method"] for r in results]
    vals = [r["images_per_s"] for r in results]
    colors = ["tab:gray" if n.startswith("simplecryoem") else "tab:blue" for n in names]
    bars = ax.barh(names, vals, color=colors)
    for b, r in zip(bars, results):
        lab = f"{r['images_per_s']:.0f}/s"
        if sc_rate and r["method"].startswith("jaxcryo"):
            lab += f"  ({r['images_per_s'] / sc_rate:.1f}x)"
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, " " + lab, va="center", fontsize=9)
    if sc_rate:
        ax.axvline(5 * sc_rate, color="tab:red", ls="--", lw=1, label="goal: 5x simplecryoem")
        ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images/s per PSGD epoch (steady state)")
    m = out["machine"]
    ax.set_title(f"box {box}, batch {batch}, float64, trilinear; {m['cpu'][:30]}, {m['cores']} cores", fontsize=9)
    ax.set_xlim(0, max(vals + [5 * sc_rate if sc_rate else 0]) * 1.35)
    save_figure(fig, args.out / "simplecryoem_compare.png")
    write_json(args.out / "simplecryoem_compare.json", out)
    print(f"wrote {args.out / 'simplecryoem_compare.json'}", flush=True)


if __name__ == "__main__":
    main()
