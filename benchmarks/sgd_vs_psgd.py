"""The paper's experiment: SGD against preconditioned SGD (and CG, Wiener, Adam) on the same objective.

For each box size and batch regime, a simulated set (built-in phantom, CTF, shifts, noise) is reconstructed by
every optimiser; after each epoch we record the full-data loss and its gap to the CG optimum (``jc.Optimum``:
CG on the assembled stencil Hessian in complex128; the gap computed exactly as ``1/2 (v - v*)^H H (v - v*)``),
the FSC against the CG solution per shell (the paper's measure), and the FSC and relative error against the
ground truth. Reconstruction by ``--interp nearest`` or ``trilinear`` (the exact optimum needs a local stencil).
The headline numbers are the epochs and seconds until the FSC against the CG solution is >= 0.9 in every
shell (1..N/2), per optimiser, and the ratio SGD/PSGD as the box grows.

Optimisers: SGD (best of a learning-rate sweep: constant eta = c / lambda_max(H_B), c in {0.5, 1, 1.9}, and the
same 1/epoch decay PSGD uses, c in {1, 1.9}), PSGD with
Hutchinson (K = 1 and K = 4 probes; step eta_0/(1 + epoch), eta_0 = 1/lambda_max(D^-1 H_B)), PSGD with the
exact diagonal, Adam, CG (full batch; one data pass per iteration) and the Wiener backprojection (one pass).
Regimes: "paper" (about 30 steps per epoch, as batch 1000 of 30,000 on a GPU) and "small" (batch 100).

Usage: python benchmarks/sgd_vs_psgd.py [--quick] [--out DIR] [--boxes 32 64] [--interp nearest]
Resumable: finished runs are appended to DIR/sgd_vs_psgd.runs.jsonl and skipped when re-run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, write_json  # noqa: E402
import jaxcryo as jc  # noqa: E402
from jaxcryo.leastsq import relative_error_in_ball  # noqa: E402
from jaxcryo.plotting import save_figure  # noqa: E402

LAM = 1e-3


class Problem:
    """One simulated data set, the exact optimum of its objective (:class:`jaxcryo.Optimum`: CG on the assembled
    stencil Hessian, complex128) and the evaluation of an iterate."""

    def __init__(self, box, n_particles, snr, interp, seed=0, eval_batch=500, sim_method="nufft"):
        self.box = box
        self.sim = jc.simulate(n_particles=n_particles, box=box, snr=snr, seed=seed, operator=sim_method)
        self.ds = jc.ArrayDataset(self.sim.metadata, self.sim.images)
        self.px = self.sim.metadata.pixel_size
        self.proj = jc.Projector(n=box, pixel_size=self.px, operator=interp)
        self.eval_batch = eval_batch
        self.batches = [jc.to_batch(r) for r in jc.iterate_batches(self.ds, eval_batch)]
        self._loss = jax.jit(lambda v, b: jc.loss(v, b, self.proj, 0.0) * jnp.sum(b.mask))
        self.truth_f = jc.volume_to_fourier(jnp.asarray(self.sim.volume))
        self.optimum = jc.Optimum(self.proj, self.ds, LAM, batch_size=eval_batch)
        self.opt_f = self.optimum.solution

    def full_loss(self, v) -> float:
        data = sum(float(self._loss(v, b)) for b in self.batches) / len(self.ds)
        return data + 0.5 * LAM * float(jnp.sum(jnp.abs(v) ** 2))

    def evaluate(self, v) -> dict:
        m = self.optimum.compare(v)  # the loss gap exactly, 1/2 (v - v*)^H H (v - v*), no difference of losses
        f_opt = m["fsc"]
        gt = jc.fsc(np.asarray(jc.fourier_to_volume(v)), self.sim.volume, pixel_size=self.px)
        return {
            "loss": self.full_loss(v),
            "loss_gap": m["loss_gap"] / self.optimum.gap_at_zero,
            "fsc_opt": [float(x) for x in f_opt],
            "fsc_opt_min": float(np.min(f_opt[1:])),
            "rel_err_opt": relative_error_in_ball(v, self.opt_f),
            "resolution_05_gt": float(gt.resolution_05),
            "rel_err_gt": relative_error_in_ball(v, self.truth_f),
        }


def run_optimizer(prob: Problem, name: str, batch: int, epochs: int, seed: int = 0) -> dict:
    """Run one optimiser for ``epochs`` epochs and evaluate after each (evaluation time excluded)."""
    hist = []
    if name == "wiener":
        t = time.perf_counter()
        v, _ = jc.wiener_backprojection(prob.proj, prob.ds, lam=LAM, batch_size=prob.eval_batch)
        jax.block_until_ready(v)
        hist.append({"epoch": 1, "seconds": time.perf_counter() - t, **prob.evaluate(v)})
        return {"history": hist}
    if name == "cg":
        ne = jc.normal_equations(prob.proj, prob.ds, prob.eval_batch, LAM)
        state = {"t": 0.0, "t0": time.perf_counter()}

        def cb(it, x, res):
            state["t"] += time.perf_counter() - state["t0"]
            hist.append({"epoch": it, "seconds": state["t"], "relative_residual": res, **prob.evaluate(x)})
            state["t0"] = time.perf_counter()

        jc.conjugate_gradient(ne.matvec, ne.rhs, tol=1e-12, maxiter=epochs, callback=cb)
        return {"history": hist}
    if name.startswith("sgd_h"):
        return run_sgd_decay(prob, float(name[5:]), batch, epochs, seed)
    kwargs = dict(optimizer=name, epochs=epochs, batch_size=batch, halfmaps=False, seed=seed, progress=False,
                  interp=prob.proj.interp, lam=LAM)
    if name.startswith("sgd_c"):
        # c x the SGD strategy's own step (1/lambda_max(H_B) on the first batch)
        kwargs.update(optimizer="sgd", lr=float(name[5:]) * sgd_step(prob, batch, seed))
    elif name == "psgd_k1":
        kwargs.update(optimizer="psgd", probes=1)
    elif name == "psgd_k4":
        kwargs.update(optimizer="psgd", probes=4)
    elif name == "psgd_exact":
        kwargs.update(optimizer="psgd", probes=0)
    evals, eval_times = [], []

    def vcb(v):
        t = time.perf_counter()
        evals.append(prob.evaluate(v))
        eval_times.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    try:
        res = jc.reconstruct(prob.ds, volume_callback=vcb, prior="tikhonov", **kwargs)  # the CG optimum's objective
        diverged = False
    except Exception as e:  # a learning rate of the sweep may diverge: that is a result
        res, diverged = None, f"{type(e).__name__}: {e}"
    total = time.perf_counter() - t0
    if res is not None:
        # reconstruct's cumulative seconds are taken before the evaluation callback of that epoch runs, so
        # they include the evaluations of the earlier epochs: subtract those (training time only; start-up,
        # compilation and the step-size estimate stay in, as a user would see them).
        earlier = np.concatenate([[0.0], np.cumsum(eval_times)])
        for i, (rec, ev) in enumerate(zip(res.history, evals)):
            hist.append({"epoch": rec["epoch"], "seconds": rec["seconds"] - earlier[i], **ev})
    out = {"history": hist, "wall_seconds": total, "eval_seconds": float(np.sum(eval_times))}
    if diverged:
        out["diverged"] = diverged
    return out


def sgd_step(prob: Problem, batch: int, seed: int = 0) -> float:
    """The SGD strategy's initial step on this problem (jaxcryo's public step-size policy)."""
    ls = jc.Problem(prob.ds, prob.proj, np.arange(len(prob.ds)), LAM, batch, seed)
    return jc.initial_step_size("sgd", ls)


def run_sgd_decay(prob: Problem, c: float, batch: int, epochs: int, seed: int = 0) -> dict:
    """Plain SGD with the same 1/epoch decay PSGD uses: eta_k = (c / lambda_max(H_B)) / (1 + epoch)."""
    t0 = time.perf_counter()
    eta = c * sgd_step(prob, batch, seed)
    spe = int(np.ceil(len(prob.ds) / batch))
    hist, eval_times = [], []

    def cb(rec, v):
        t = time.perf_counter()
        hist.append({"epoch": rec["epoch"], "seconds": time.perf_counter() - t0 - sum(eval_times), **prob.evaluate(v)})
        eval_times.append(time.perf_counter() - t)

    try:
        jc.fit(prob.ds, jc.sgd(jc.harmonic_schedule(eta, spe)), prob.proj, epochs=epochs, batch_size=batch, lam=LAM,
            seed=seed, callback=cb)
        return {"history": hist, "wall_seconds": time.perf_counter() - t0, "eval_seconds": sum(eval_times)}
    except Exception as e:
        return {"history": hist, "diverged": f"{type(e).__name__}: {e}"}


def epochs_to(hist, thr=0.9):
    for h in hist:
        if h["fsc_opt_min"] >= thr:
            return h["epoch"], h["seconds"]
    return None, None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny CI run (box 32, one regime, few epochs)")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--boxes", type=int, nargs="+", default=None, help="box sizes (default 32 64)")
    p.add_argument("--interp", default="nearest", choices=("nearest", "trilinear"),
                   help="slice operator of the reconstruction (one with a local stencil: the exact optimum needs it)")
    p.add_argument("--epochs", type=int, default=None, help="epoch cap (default 10; quick 3)")
    p.add_argument("--snr", type=float, default=0.5)
    p.add_argument("--sim-method", default="nufft", choices=("nufft", "trilinear"),
                   help="slice operator that makes the simulated images (trilinear where jax-finufft is absent)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    boxes = args.boxes or ([32] if quick else [32, 64])
    epochs = args.epochs or (3 if quick else 10)
    optimizers = (["sgd_c1", "psgd_k1", "psgd_exact", "wiener"] if quick else
                  ["sgd_c0.5", "sgd_c1", "sgd_c1.9", "sgd_h1", "sgd_h1.9", "psgd_k1", "psgd_k4", "psgd_exact",
                   "adam", "cg", "wiener"])
    runs_file = args.out / ("sgd_vs_psgd.quick.runs.jsonl" if quick else "sgd_vs_psgd.runs.jsonl")
    done = {}
    if runs_file.exists():
        for line in runs_file.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["box"], r["batch"], r["optimizer"], r["interp"])] = r
    runs = []
    problems = {}
    for box in boxes:
        n = 600 if quick else int(4000 * box / 32)
        regimes = {"paper": max(1, n // 30)} if quick else {"paper": max(1, n // 30), "small": 100}
        for regime, batch in regimes.items():
            for opt in optimizers:
                key = (box, batch, opt, args.interp)
                if key in done:
                    runs.append(done[key])
                    continue
                if box not in problems:
                    t = time.perf_counter()
                    problems[box] = Problem(box, n, args.snr, args.interp, sim_method=args.sim_method)
                    print(f"box {box}: simulated {n} particles, exact optimum in {problems[box].optimum.iterations} "
                          f"CG iterations ({time.perf_counter() - t:.1f} s)", flush=True)
                prob = problems[box]
                t = time.perf_counter()
                r = run_optimizer(prob, opt, batch, epochs)
                e, s = epochs_to(r["history"])
                rec = {"box": box, "batch": batch, "regime": regime, "n_particles": n, "interp": args.interp,
                       "optimizer": opt, "epochs_to_fsc09": e, "seconds_to_fsc09": s, **r}
                print(f"  box {box} batch {batch:5d} {opt:11s} epochs_to_fsc09={e} seconds={s} "
                      f"final min-shell FSC vs opt={r['history'][-1]['fsc_opt_min'] if r['history'] else None} "
                      f"({time.perf_counter() - t:.1f} s)", flush=True)
                with open(runs_file, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                runs.append(rec)
    # Best SGD of the sweep per (box, batch): fewest epochs to FSC 0.9, then lowest final loss.
    summary = []
    for box in boxes:
        for batch in sorted({r["batch"] for r in runs if r["box"] == box}):
            rs = {r["optimizer"]: r for r in runs if r["box"] == box and r["batch"] == batch}
            sweep = [r for k, r in rs.items() if k.startswith(("sgd_c", "sgd_h")) and r["history"]]
            if not sweep:
                continue
            cap = epochs + 1
            best = min(sweep, key=lambda r: (r["epochs_to_fsc09"] or cap, r["history"][-1]["loss"]))
            rs["sgd"] = dict(best, optimizer="sgd", best_of=best["optimizer"])
            row = {"box": box, "batch": batch, "regime": rs[best["optimizer"]]["regime"],
                   "sgd_best_of_sweep": best["optimizer"]}
            for k in ("sgd", "psgd_k1", "psgd_k4", "psgd_exact", "adam", "cg", "wiener"):
                if k in rs:
                    row[f"{k}_epochs"] = rs[k]["epochs_to_fsc09"]
                    row[f"{k}_seconds"] = rs[k]["seconds_to_fsc09"]
                    row[f"{k}_final_fsc_opt_min"] = rs[k]["history"][-1]["fsc_opt_min"] if rs[k]["history"] else None
                    row[f"{k}_final_res05_gt"] = rs[k]["history"][-1]["resolution_05_gt"] if rs[k]["history"] else None
            se, pe = row.get("sgd_epochs"), row.get("psgd_k1_epochs")
            # With SGD never reaching the threshold within the cap, the ratio is a lower bound (cap + 1) / psgd.
            row["ratio_sgd_over_psgd_k1_epochs"] = (
                None if pe is None else ((se if se is not None else cap) / pe))
            row["ratio_is_lower_bound"] = se is None
            row["sgd_never_reached"] = se is None
            summary.append(row)
            runs.append(rs["sgd"])
    out = {"machine": machine_info(),
           "settings": {"quick": quick, "boxes": boxes, "interp": args.interp, "epochs_cap": epochs,
                        "sim_method": args.sim_method,
                        "snr": args.snr, "lam": LAM, "sgd_sweep": "constant eta = c / lambda_max(H_B), c in {0.5, 1, 1.9}; and decaying "
                        "eta = (c / lambda_max) / (1 + epoch), c in {1, 1.9}" if not quick else "constant, c = 1", "threshold": "FSC vs CG optimum >= 0.9 in every shell 1..N/2",
                        "psgd_step": "eta_0 / (1 + epoch), eta_0 = 1 / lambda_max(D^-1 H_B)"},
           "runs": runs, "summary": summary}
    write_json(args.out / "sgd_vs_psgd.json", out)
    plot(out, args.out / "sgd_vs_psgd.png")
    for row in summary:
        print(json.dumps({k: v for k, v in row.items() if "final" not in k}))
    return 0


def plot(out, path):
    keys = sorted({(r["box"], r["batch"]) for r in out["runs"]})
    fig = Figure(figsize=(15, 3.6 * len(keys)))  # object-oriented: no global backend switch
    axes = fig.subplots(len(keys), 3, squeeze=False)
    show = ("sgd", "psgd_k1", "psgd_k4", "psgd_exact", "adam", "cg", "wiener")
    for i, (box, batch) in enumerate(keys):
        for r in out["runs"]:
            if (r["box"], r["batch"]) != (box, batch) or r["optimizer"] not in show or not r["history"]:
                continue
            h = r["history"]
            lab = r["optimizer"] + (f" ({r['best_of']})" if "best_of" in r else "")
            axes[i][0].plot([x["epoch"] for x in h], [x["fsc_opt_min"] for x in h], "o-", ms=3, label=lab)
            axes[i][1].semilogy([x["seconds"] for x in h], [max(x["loss_gap"], 1e-8) for x in h], "o-", ms=3, label=lab)
            axes[i][2].plot([x["epoch"] for x in h], [x["resolution_05_gt"] for x in h], "o-", ms=3, label=lab)
        axes[i][0].axhline(0.9, color="gray", ls="--", lw=0.8)
        axes[i][0].set(xlabel="epoch", ylabel="min-shell FSC vs CG optimum", title=f"box {box}, batch {batch}")
        axes[i][1].set(xlabel="seconds", ylabel="relative loss gap to optimum")
        axes[i][2].set(xlabel="epoch", ylabel="FSC-0.5 resolution vs truth (Å)")
        for ax in axes[i]:
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
