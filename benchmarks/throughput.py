"""Throughput of the forward model, the gradient and the full optimiser steps, per slice operator and box.

For each interpolation (``nearest``, ``trilinear``, ``nufft``) and box we time, on one static-shape minibatch
of random poses, shifts and CTFs (the images are noise: the cost does not depend on their content):

* ``forward``: the forward model ``P_i V`` (slice, shift, CTF) for the batch;
* ``gradient``: the minibatch objective and its gradient (``jaxcryo.loss.value_and_grad``);
* ``sgd_step``: :func:`jaxcryo.fit.make_step` with :func:`jaxcryo.optim.sgd`;
* ``psgd_step_k1`` / ``psgd_step_k4``: the same with :func:`jaxcryo.optim.preconditioned_sgd` and K = 1 / 4
  Hutchinson probes (gradient + K Hessian-vector products + the diagonal update).

Each is jitted; ``compile_s`` is the first call (trace + compile + one run) and ``step_s`` the median of the
later calls, both with ``block_until_ready``. The batch is put on the device beforehand (``to_batch`` runs
inside the step, as in :func:`jaxcryo.fit.fit`), so host-side I/O is not included. The figure to watch is
``psgd_over_sgd``: the cost of a PSGD step relative to an SGD step, per operator and box.

Peak memory: host ``ru_maxrss`` after each configuration (monotone: the process peak so far) and, on GPU,
the device's ``peak_bytes_in_use``.

Usage: python benchmarks/throughput.py [--quick] [--out DIR] [--boxes 64 128] [--batch 128] [--reps 5]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import (device_peak_mb, host_peak_rss_mb, machine_info, parse_args, save_figure,  # noqa: E402
                     time_calls, use_agg, write_json)
from jaxcryo import (ArrayDataset, ParticleMetadata, Projector, load_batch, make_step, objective,  # noqa: E402
                     preconditioned_sgd, sgd, to_batch, value_and_grad)
from jaxcryo.operators import OPERATOR_NAMES  # noqa: E402
from jaxcryo.rotations import random_rotations  # noqa: E402
from jaxcryo.simulate import random_ctf_params  # noqa: E402

INTERPS = OPERATOR_NAMES
OPS = ("forward", "gradient", "sgd_step", "psgd_step_k1", "psgd_step_k4")
PIXEL_SIZE = 3.0


def make_raw_batch(box: int, batch: int, seed: int = 0):
    """A device-resident RawBatch of ``batch`` random poses/shifts/CTFs and noise images."""
    rng = np.random.default_rng(seed)
    rots = np.asarray(random_rotations(jax.random.PRNGKey(seed), batch), np.float64)
    md = ParticleMetadata(
        rotations=rots, shifts=rng.uniform(-2 * PIXEL_SIZE, 2 * PIXEL_SIZE, (batch, 2)),
        ctf=random_ctf_params(rng, batch), image_files=np.array(["mem"] * batch, dtype=object),
        image_indices=np.arange(batch), pixel_size=PIXEL_SIZE, box=box, source="throughput",
    )
    ds = ArrayDataset(md, rng.standard_normal((batch, box, box)).astype(np.float32))
    raw = load_batch(ds, np.arange(batch))
    return jax.device_put(raw)


def bench_one(interp: str, box: int, batch: int, reps: int, min_seconds: float) -> list[dict]:
    proj = Projector(n=box, pixel_size=PIXEL_SIZE, operator=interp)
    raw = make_raw_batch(box, batch)
    key = jax.random.PRNGKey(1)
    vol0 = (jax.random.normal(key, (box,) * 3) + 1j * jax.random.normal(jax.random.split(key)[0], (box,) * 3))
    vol0 = vol0.astype(jnp.complex64)

    @jax.jit
    def forward(v, raw):
        b = to_batch(raw)
        return proj(v, b.rotations, b.shifts, b.ctf)

    @jax.jit
    def grad(v, raw):
        return value_and_grad(objective(to_batch(raw), proj))(v)

    fns = {
        "forward": lambda: forward(vol0, raw),
        "gradient": lambda: grad(vol0, raw),
    }
    opts = {"sgd_step": sgd(1e-3), "psgd_step_k1": preconditioned_sgd(1e-3, n_probes=1),
            "psgd_step_k4": preconditioned_sgd(1e-3, n_probes=4)}
    for name, opt in opts.items():
        step = make_step(opt, proj, donate=True)
        state = {"v": jnp.array(vol0), "s": None}
        state["s"] = opt.init(state["v"])

        def call(step=step, state=state):
            state["v"], state["s"], val = step(state["v"], state["s"], raw)
            return state["v"], val

        fns[name] = call

    out = []
    for op in OPS:
        first, med = time_calls(fns[op], reps, min_seconds)
        rec = {"op": op, "interp": interp, "box": box, "batch": batch, "compile_s": first, "step_s": med,
               "images_per_s": batch / med, "host_peak_rss_mb": host_peak_rss_mb(),
               "device_peak_mb": device_peak_mb()}
        print(f"  {interp:9s} box {box:4d} {op:13s} first {first:7.3f} s  step {med * 1e3:9.2f} ms  "
              f"{rec['images_per_s']:10.1f} img/s", flush=True)
        out.append(rec)
    return out


def ratios(results: list[dict]) -> dict:
    """``{"<interp>_<box>": {"psgd_k1": t_psgd1 / t_sgd, "psgd_k4": ..., "gradient_over_forward": ...}}``."""
    by = {(r["interp"], r["box"], r["op"]): r["step_s"] for r in results}
    out = {}
    for interp, box in sorted({(r["interp"], r["box"]) for r in results}, key=lambda t: (t[1], t[0])):
        sgd_t = by[(interp, box, "sgd_step")]
        out[f"{interp}_{box}"] = {
            "interp": interp, "box": box,
            "psgd_k1": by[(interp, box, "psgd_step_k1")] / sgd_t,
            "psgd_k4": by[(interp, box, "psgd_step_k4")] / sgd_t,
            "gradient_over_forward": by[(interp, box, "gradient")] / by[(interp, box, "forward")],
        }
    return out


def plot(results: list[dict], path: Path) -> None:
    use_agg()
    import matplotlib.pyplot as plt

    boxes = sorted({r["box"] for r in results})
    interps = [i for i in INTERPS if any(r["interp"] == i for r in results)]
    fig, axes = plt.subplots(1, len(boxes), figsize=(6.5 * len(boxes), 4.2), squeeze=False)
    w = 0.8 / len(interps)
    for ax, box in zip(axes[0], boxes):
        for j, interp in enumerate(interps):
            vals = [next((r["images_per_s"] for r in results
                          if r["box"] == box and r["interp"] == interp and r["op"] == op), np.nan) for op in OPS]
            x = np.arange(len(OPS)) + (j - (len(interps) - 1) / 2) * w
            ax.bar(x, vals, w, label=interp)
        ax.set_xticks(np.arange(len(OPS)))
        ax.set_xticklabels([o.replace("_step", "\nstep").replace("_k", " K=") for o in OPS], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("images / s (steady state)")
        batch = next(r["batch"] for r in results if r["box"] == box)
        ax.set_title(f"box {box}, batch {batch}")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"jaxcryo throughput ({jax.devices()[0].device_kind})")
    save_figure(fig, path)


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--boxes", type=int, nargs="+", default=None)
        p.add_argument("--batch", type=int, default=None, help="images per step")
        p.add_argument("--interps", nargs="+", default=None, choices=INTERPS,
                       help="default all (quick: nearest and nufft, to keep CI compile time down)")
        p.add_argument("--reps", type=int, default=None, help="timed calls after the first")
        p.add_argument("--min-seconds", type=float, default=None, help="keep timing until this long (per op)")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    boxes = args.boxes or ([32] if args.quick else [64, 128])
    batch = args.batch or (16 if args.quick else 128)
    reps = args.reps or (2 if args.quick else 5)
    args.interps = args.interps or (["nearest", "nufft"] if args.quick else list(INTERPS))
    min_s = args.min_seconds if args.min_seconds is not None else (0.0 if args.quick else 1.0)
    settings = {"quick": args.quick, "boxes": boxes, "batch": batch, "interps": args.interps, "reps": reps,
                "min_seconds": min_s, "dtype": "float32/complex64", "pixel_size": PIXEL_SIZE, "ctf": True,
                "learning_rate": 1e-3, "batch_on_device": True,
                "timing": "compile_s = first call (trace+compile+run); step_s = median of later calls; "
                          "block_until_ready"}
    print(f"throughput: boxes {boxes}, batch {batch}, interps {args.interps}", flush=True)
    t0 = time.perf_counter()
    results = []
    for box in boxes:
        for interp in args.interps:
            results.extend(bench_one(interp, box, batch, reps, min_s))
    rat = ratios(results)
    for k, v in rat.items():
        print(f"  psgd/sgd {k:14s} K=1 {v['psgd_k1']:.2f}  K=4 {v['psgd_k4']:.2f}")
    out = {"machine": machine_info(), "settings": settings, "results": results, "psgd_over_sgd": rat,
           "peak_memory": {"host_rss_mb": host_peak_rss_mb(), "device_mb": device_peak_mb()},
           "seconds_total": time.perf_counter() - t0}
    write_json(args.out / "throughput.json", out)
    plot(results, args.out / "throughput.png")
    print(f"wrote {args.out / 'throughput.json'} and .png in {out['seconds_total']:.1f} s")
    return out


if __name__ == "__main__":
    main()
