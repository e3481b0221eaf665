"""Conditioning: κ(H) and κ(D⁻¹H) against the box size, with and without CTF, measured (Lanczos) and
predicted; and the Hutchinson diagonal's relative error against the exact diagonal as a function of the
number of probes and of epochs (the paper: about 0.1 after one epoch, 0.012 after 100).

Usage: python benchmarks/conditioning.py [--quick] [--out DIR] [--boxes 16 32 64] [--epochs 100]
Writes DIR/conditioning.json and DIR/conditioning.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from _common import machine_info, write_json
from jaxcryo.data import ArrayDataset, epoch_batches, iterate_batches, load_batch, simulate, to_batch
from jaxcryo.forward import Projector
from jaxcryo.leastsq import condition_report, exact_diagonal, objective
from jaxcryo.solvers import hutchinson_diagonal, hutchinson_samples
from jaxcryo.plotting import save_figure

LAM = 1e-3


def hutchinson_errors(box, n_particles, batch, epochs, probes_list, interp="trilinear", seed=0) -> dict:
    """Relative L2 error of the Hutchinson diagonal (the optimiser's running estimate, paper averaging,
    one probe per step, at v = 0) against the exact full-data diagonal, after each epoch; and of a single
    batch's estimate against that batch's exact diagonal as a function of the number of probes K."""
    sim = simulate(n_particles=n_particles, box=box, snr=1.0, seed=seed)
    ds = ArrayDataset(sim.metadata, sim.images)
    proj = Projector(n=box, pixel_size=sim.metadata.pixel_size, operator=interp)
    exact = exact_diagonal(proj, [to_batch(r) for r in iterate_batches(ds, 500)], lam=LAM)
    v0 = jnp.zeros((box,) * 3, jnp.complex64)
    tx = hutchinson_diagonal(seed=seed, n_probes=1, averaging="mean")

    @jax.jit
    def step(state, raw):
        fn = objective(to_batch(raw), proj, LAM)
        d, state = tx.update(None, state, v0, obj_fn=fn)
        return d, state

    state = tx.init(v0)
    rng = np.random.default_rng(seed)
    per_epoch = []
    for e in range(epochs):
        for idx, mask in epoch_batches(np.arange(len(ds)), batch, rng):
            d, state = step(state, load_batch(ds, idx, mask))
        per_epoch.append(float(jnp.linalg.norm(d - exact) / jnp.linalg.norm(exact)))
    # Probes: one batch, K probes, against that batch's exact diagonal.
    raw = load_batch(ds, np.arange(batch))
    b = to_batch(raw)
    dbatch = exact_diagonal(proj, b, lam=LAM)
    kmax = max(probes_list)
    samples = jax.jit(lambda key: hutchinson_samples(objective(b, proj, LAM), v0, key, kmax))(jax.random.PRNGKey(seed))
    per_k = {k: float(jnp.linalg.norm(samples[:k].mean(0) - dbatch) / jnp.linalg.norm(dbatch)) for k in probes_list}
    return {"box": box, "n_particles": n_particles, "batch": batch, "interp": interp,
            "error_vs_epoch": per_epoch, "error_vs_probes": per_k}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--boxes", type=int, nargs="+", default=None, help="default 16 32 64 (quick: 16)")
    p.add_argument("--epochs", type=int, default=None, help="Hutchinson epochs (default 100; quick 3)")
    p.add_argument("--lanczos-iters", type=int, default=None)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    boxes = args.boxes or ([16] if args.quick else [16, 32, 64])
    iters = args.lanczos_iters or (40 if args.quick else 500)
    t0 = time.perf_counter()
    kappa = {}
    for ctf in (False, True):
        r = condition_report(boxes, ctf=ctf, lanczos_iters=iters, n_poses=500 if args.quick else 2000)
        kappa["ctf" if ctf else "no_ctf"] = r
        for b, k1, k2, kp in zip(r["box"], r["kappa_H"], r["kappa_DinvH"], r["kappa_predicted"]):
            print(f"CTF {'on ' if ctf else 'off'} box {b:4d}: kappa(H) {k1:9.1f}  kappa(D^-1 H) {k2:7.1f}  "
                  f"predicted {kp:6.1f}", flush=True)
    epochs = args.epochs or (3 if args.quick else 100)
    hut = hutchinson_errors(box=16 if args.quick else 32, n_particles=400 if args.quick else 2000,
                            batch=100, epochs=epochs, probes_list=[1, 4, 16, 64])
    print("Hutchinson error vs epoch:", [round(x, 4) for x in hut["error_vs_epoch"][:3]], "...",
          round(hut["error_vs_epoch"][-1], 4))
    print("Hutchinson error vs probes:", {k: round(v, 3) for k, v in hut["error_vs_probes"].items()})
    out = {"machine": machine_info(), "settings": {"quick": args.quick, "boxes": boxes, "lanczos_iters": iters,
                                                   "lam_hutchinson": LAM},
           "kappa": kappa, "box": boxes, "kappa_H": kappa["no_ctf"]["kappa_H"],
           "kappa_DinvH": kappa["no_ctf"]["kappa_DinvH"], "kappa_predicted": kappa["no_ctf"]["kappa_predicted"],
           "hutchinson": hut, "seconds": time.perf_counter() - t0}
    write_json(args.out / "conditioning.json", out)
    plot(out, args.out / "conditioning.png")
    return 0


def plot(out, path):
    fig = Figure(figsize=(15, 4))
    ax = fig.subplots(1, 3)
    for key, style in (("no_ctf", "-"), ("ctf", "--")):
        r = out["kappa"][key]
        lab = "no CTF" if key == "no_ctf" else "CTF"
        ax[0].loglog(r["box"], r["kappa_H"], "o" + style, label=f"κ(H), {lab}")
        ax[0].loglog(r["box"], r["kappa_DinvH"], "s" + style, label=f"κ(D⁻¹H), {lab}")
    r = out["kappa"]["no_ctf"]
    ax[0].loglog(r["box"], r["kappa_predicted"], "k:", label="predicted (paper's bound)")
    ax[0].set(xlabel="box", ylabel="condition number", title="conditioning (Lanczos, ball N/2)")
    ax[0].legend(fontsize=7)
    h = out["hutchinson"]
    ep = np.arange(1, len(h["error_vs_epoch"]) + 1)
    ax[1].loglog(ep, h["error_vs_epoch"], "o-", ms=3)
    ax[1].set(xlabel="epochs", ylabel="relative error vs exact diagonal",
              title=f"Hutchinson running mean (box {h['box']}, batch {h['batch']}, K=1)")
    ks = np.array(sorted(int(k) for k in h["error_vs_probes"]))
    errs = np.array([h["error_vs_probes"][k] if k in h["error_vs_probes"] else h["error_vs_probes"][str(k)] for k in ks])
    ax[2].loglog(ks, errs, "o-", label="measured")
    ax[2].loglog(ks, errs[0] / np.sqrt(ks), "k:", label="1/√K")
    ax[2].set(xlabel="probes K", ylabel="relative error (one batch)", title="Hutchinson error vs probes")
    ax[2].legend()
    for a in ax:
        a.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
