"""Device memory of jaxcryo's jitted steps per box and batch size, from XLA's own buffer assignment, and the
batch sizes that fit a 16 GB GPU (issue 12: "document and measure peak host and device memory per box size and
batch size; choose batch defaults that fit a 16 GB GPU at box 256").

For every step, box and batch size the step is lowered and compiled with abstract inputs (nothing is run, so
box 256 compiles on a laptop) and ``compiled.memory_analysis()`` gives the bytes of its arguments, outputs,
donated (aliased) buffers and temporaries. The step's device peak is ``arguments + outputs - aliased +
temporaries``; a run holds, besides, the other half set's volume and optimiser state (reconstruct keeps two
independent runs on the device), reported as ``resident_other_half``. The steps:

* ``psgd`` -- the minibatch step of ``reconstruct --optimizer psgd`` (Hutchinson, one probe; trilinear);
* ``psgd_exact`` -- the same with the exact batch diagonal (``--probes 0``);
* ``sgd`` -- plain SGD;
* ``backproject`` -- one batch of the one-pass estimate's accumulation (the default optimiser), whose sums
  live on the operator's lifted grid (``x2``: ``Trilinear(oversample=2)``, 8x the volume);
* ``local_search`` -- ``refine``'s local pose search of one batch (``Q`` = 125 candidate rotations x 25
  shifts per image, frequency limit N/4, the default chunking).

What this does and does not predict: the numbers are XLA:CPU's buffer assignment. XLA:GPU assigns buffers with
the same algorithm (liveness-based heap simulation) but fuses differently, so GPU temporaries differ (typically
by tens of percent, not by factors); the CUDA runtime, cuFFT plans and JAX's preallocation (75% of the GPU by
default, ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` to turn it off) come on top. The recommended batch keeps the
step's peak plus the resident half under 60% of 16 GB for that margin. Host memory (peak RSS) of a streamed run
is measured in ``streaming.py``.

Usage: python benchmarks/memory.py [--quick] [--out DIR] [--boxes 64 128 256] [--batches 32 64 128 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from _common import machine_info, write_json  # noqa: E402
from jaxcryo.plotting import save_figure  # noqa: E402
import jaxcryo as jc  # noqa: E402
from jaxcryo.data import RawBatch, to_batch  # noqa: E402
from jaxcryo.forward import CTFParams  # noqa: E402
from jaxcryo.rotations import local_grid  # noqa: E402
from jaxcryo.solvers import make_step  # noqa: E402
from jaxcryo.solvers._wiener import _wiener_steps  # noqa: E402
from jaxcryo.poses import score_local  # noqa: E402

GB = 1024 ** 3
BUDGET = 16 * GB
SAFE = 0.6  # of the budget: XLA:GPU's different fusions, CUDA/cuFFT workspaces


def raw_spec(b: int, n: int) -> RawBatch:
    f = jax.ShapeDtypeStruct
    return RawBatch(images=f((b, n, n), jnp.float32), rotations=f((b, 3, 3), jnp.float32), shifts=f((b, 2), jnp.float32),
                    ctf=CTFParams(*[f((b,), jnp.float32)] * len(CTFParams._fields)), weights=f((b,), jnp.float32),
                    mask=f((b,), jnp.float32))


def stats(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, k + "_in_bytes")) for k in ("argument_size", "output_size", "alias_size", "temp_size")}
    out["peak_bytes"] = out["argument_size"] + out["output_size"] - out["alias_size"] + out["temp_size"]
    return out


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def measure(step: str, n: int, b: int) -> dict:
    vol = jax.ShapeDtypeStruct((n,) * 3, jnp.complex64)
    raw = raw_spec(b, n)
    lam = 1e-3
    if step in ("psgd", "psgd_exact", "sgd"):
        proj = jc.Projector(n=n, pixel_size=1.0, operator="trilinear")
        opt = (optax.sgd(1.0) if step == "sgd" else
               jc.preconditioned_sgd(1.0, diagonal="batch" if step == "psgd_exact" else None, projector=proj, lam=lam))
        state = jax.eval_shape(opt.init, vol)
        fn = make_step(opt, proj, lam)
        t = time.perf_counter()
        c = fn.lower(vol, state, raw).compile()
        resident = tree_bytes((vol, state))
    elif step.startswith("backproject"):
        s = 2 if step.endswith("x2") else 1
        proj = jc.Projector(n=n, pixel_size=1.0, operator=jc.Trilinear(oversample=s))
        acc, _ = _wiener_steps(proj, np.dtype(np.float32), True)
        num = jax.ShapeDtypeStruct(proj.lifted_shape(), jnp.complex64)
        den = jax.ShapeDtypeStruct((n,) * 3, jnp.float32)
        t = time.perf_counter()
        c = acc.lower(num, den, raw).compile()
        resident = tree_bytes((num, den))
    elif step == "local_search":
        proj = jc.Projector(n=n, pixel_size=1.0, operator=jc.Trilinear(oversample=2))
        grid = jnp.asarray(np.stack(np.meshgrid(np.arange(-2, 3), np.arange(-2, 3)), -1).reshape(-1, 2), jnp.float32)

        def one(v, r, rot, sh):
            cand = local_grid(rot, 2.0, 4.0)
            return score_local(v, to_batch(r), proj, cand, sh[:, None, :] + grid[None], kmax=n / 4)

        t = time.perf_counter()
        c = jax.jit(one).lower(vol, raw, jax.ShapeDtypeStruct((b, 3, 3), jnp.float32),
                               jax.ShapeDtypeStruct((b, 2), jnp.float32)).compile()
        resident = tree_bytes(vol)  # the other half's map
    else:
        raise ValueError(step)
    rec = {"step": step, "box": n, "batch": b, **stats(c), "compile_seconds": time.perf_counter() - t,
           "resident_other_half": resident}
    rec["device_total_bytes"] = rec["peak_bytes"] + resident
    rec["device_total_gb"] = rec["device_total_bytes"] / GB
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="box 32, batches 32 and 64 (CI)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--boxes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--steps", nargs="+",
                   default=["psgd", "psgd_exact", "sgd", "backproject", "backproject_x2", "local_search"])
    args = p.parse_args(argv)
    if args.quick:
        args.boxes, args.batches = [32], [32, 64]
    rows = []
    for n in args.boxes:
        for step in args.steps:
            for b in args.batches:
                r = measure(step, n, b)
                rows.append(r)
                print(f"{step:15s} box {n:4d} batch {b:4d}: peak {r['peak_bytes'] / GB:7.3f} GB "
                      f"(temp {r['temp_size'] / GB:.3f}), with the other half {r['device_total_gb']:.3f} GB "
                      f"[compile {r['compile_seconds']:.1f} s]", flush=True)
    recommended = {}
    for step in args.steps:
        for n in args.boxes:
            fits = [r["batch"] for r in rows if r["step"] == step and r["box"] == n
                    and r["device_total_bytes"] <= SAFE * BUDGET]
            recommended.setdefault(step, {})[str(n)] = max(fits) if fits else None
    result = {"machine": machine_info(), "jax": jax.__version__, "backend": jax.default_backend(),
              "budget_gb": BUDGET / GB, "safety_fraction": SAFE, "rows": rows,
              "largest_batch_within_60pct_of_16GB": recommended,
              "note": ("XLA:CPU buffer assignment of each compiled step (compiled.memory_analysis()); GPU "
                       "fusions differ, and CUDA/cuFFT workspaces and JAX's preallocation come on top. "
                       "device_total = step peak + the other half's resident volume and optimiser state.")}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "memory.json", result)
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, len(args.boxes), squeeze=False)[0]
    for ax, n in zip(axes, args.boxes):
        for step in args.steps:
            pts = [(r["batch"], r["device_total_gb"]) for r in rows if r["step"] == step and r["box"] == n]
            ax.plot(*zip(*pts), "o-", label=step)
        ax.axhline(SAFE * BUDGET / GB, color="k", ls="--", lw=0.8, label="60% of 16 GB")
        ax.set(xscale="log", yscale="log", xlabel="batch (images)", ylabel="device memory (GB)", title=f"box {n}")
        ax.set_xticks(args.batches, [str(b) for b in args.batches])
    axes[0].legend(fontsize=7)
    save_figure(fig, args.out / "memory.png")
    print("largest batch within 60% of 16 GB:", recommended)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
