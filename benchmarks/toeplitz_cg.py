"""CG on the NUFFT model's normal equations: the Toeplitz kernel operator against the explicit data-pass one.

The normal operator ``H = (1/n) sum_i S_i^H M S_i + lam I`` of the NUFFT model is applied two ways
(issue 9, item 5):

* ``explicit``: :func:`jaxcryo.leastsq._hessian.normal_equations`, one pass over all the images per matvec (a type-2
  and a type-1 NUFFT per image batch; batches cached in host memory);
* ``toeplitz``: :func:`jaxcryo.leastsq._toeplitz.toeplitz_normal_equations`, a convolution on the ``2N`` grid whose
  kernel is built once (one type-1 NUFFT pass over the metadata), so a matvec is four FFTs whatever the number
  of particles.

Per set (jaxcryo's simulator: built-in phantom, CTF with defocus 1–2.5 µm, shifts up to 2 px, SNR 0.5, 3 Å/px)
we report: the kernel build (``kernel_first_s`` with compilation, ``kernel_s`` a second build), the whole
set-up of the Toeplitz normal equations (``toeplitz_setup_s``: kernel and the right-hand side's adjoint pass,
with its compilation; ``explicit_setup_s`` for the explicit ones: the same adjoint pass, batches cached), the
matvec of each operator (``*_matvec_s``: median of later
calls, ``block_until_ready``), their agreement (``matvec_rel_error`` on a random complex volume,
``rhs_rel_error``), CG with the Toeplitz operator to relative residual ``tol`` (iterations, seconds, seconds
per iteration, the residual history) and CG with the explicit operator for ``explicit_iters`` iterations
(seconds per iteration; its residuals should track the Toeplitz ones: ``residual_gap``, the largest
relative difference over the first 10 iterations; later, float32 rounding makes the two drift apart by a few
per cent without changing the iteration count), and the estimated explicit CG time to ``tol``
(``explicit_cg_to_tol_est_s`` = its seconds per iteration × the Toeplitz iteration count; ``null`` when the
explicit CG itself ran to ``tol``, as in quick mode, where ``explicit_cg_iterations_to_tol`` is measured).
The 1-minute load average is recorded (other jobs may share the CPU; times are then pessimistic).

Full mode: box 32 / 3,000 particles and box 64 / 5,000, ``lam = 1e-3`` (reconstruct's default Tikhonov
weight), ``tol = 1e-6``, 3 explicit iterations. Quick mode: box 16, 300 particles, explicit CG to ``tol``.

Usage: python benchmarks/toeplitz_cg.py [--quick] [--out DIR] [--sets 32:3000,64:5000] [--lam 1e-3]
       [--tol 1e-6] [--explicit-iters 3] [--batch 256]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import (host_peak_rss_mb, loadavg, machine_info, parse_args, time_calls,  # noqa: E402
                     use_agg, write_json)
from jaxcryo.data import ArrayDataset, simulate  # noqa: E402
from jaxcryo.forward import Projector  # noqa: E402
from jaxcryo.leastsq import (conjugate_gradient, normal_equations, toeplitz_kernel,  # noqa: E402
                             toeplitz_normal_equations)
from jaxcryo.ndimage import relative_error  # noqa: E402
from jaxcryo.plotting import save_figure  # noqa: E402

PIXEL_SIZE = 3.0


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def bench_set(box: int, n_particles: int, lam: float, tol: float, explicit_iters: int | None, batch: int,
              maxiter: int) -> dict:
    print(f"box {box}, {n_particles} particles: simulating", flush=True)
    sim = simulate(n_particles, box, snr=0.5, pixel_size=PIXEL_SIZE, seed=0)
    src = ArrayDataset(sim.metadata, sim.images)
    proj = Projector(n=box, pixel_size=PIXEL_SIZE, operator="nufft")
    load0 = loadavg()

    _, kernel_first = _timed(lambda: toeplitz_kernel(proj, src).fourier)
    _, kernel_s = _timed(lambda: toeplitz_kernel(proj, src).fourier)
    nt, toeplitz_setup = _timed(lambda: toeplitz_normal_equations(proj, src, batch, lam))
    print(f"  kernel {kernel_s:.2f} s (first {kernel_first:.2f} s); kernel + rhs pass {toeplitz_setup:.2f} s",
          flush=True)

    ne, explicit_setup = _timed(lambda: normal_equations(proj, src, batch, lam))
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.standard_normal((box,) * 3) + 1j * rng.standard_normal((box,) * 3), jnp.complex64)
    t_first, t_mv = time_calls(lambda: nt.matvec(z), reps=5)
    e_first, e_mv = time_calls(lambda: ne.matvec(z), reps=1)
    mv_err = relative_error(nt.matvec(z), ne.matvec(z))
    rhs_err = relative_error(nt.rhs, ne.rhs)
    print(f"  matvec toeplitz {t_mv * 1e3:.1f} ms, explicit {e_mv:.2f} s (x{e_mv / t_mv:.0f}); "
          f"rel. difference {mv_err:.1e}", flush=True)

    t0 = time.perf_counter()
    tres = conjugate_gradient(nt.matvec, nt.rhs, tol=tol, maxiter=maxiter)
    jax.block_until_ready(tres.x)
    t_cg = time.perf_counter() - t0
    t_it = t_cg / max(1, tres.iterations)
    print(f"  toeplitz CG: {tres.iterations} iterations to {tres.residuals[-1]:.1e} in {t_cg:.2f} s "
          f"({t_it * 1e3:.1f} ms/it)", flush=True)

    e_max = maxiter if explicit_iters is None else explicit_iters
    t0 = time.perf_counter()
    eres = conjugate_gradient(ne.matvec, ne.rhs, tol=tol, maxiter=e_max)
    jax.block_until_ready(eres.x)
    e_cg = time.perf_counter() - t0
    e_it = e_cg / max(1, eres.iterations)
    k = min(len(eres.residuals), len(tres.residuals), 11)
    gap = float(np.max(np.abs(np.array(eres.residuals[:k]) - np.array(tres.residuals[:k]))
                       / np.array(tres.residuals[:k])))
    reached = eres.residuals[-1] <= tol
    sol_diff = relative_error(tres.x, eres.x) if reached else None
    print(f"  explicit CG: {eres.iterations} iterations in {e_cg:.2f} s ({e_it:.2f} s/it); residual gap "
          f"{gap:.1e}" + (f"; solutions differ by {sol_diff:.1e}" if reached else ""), flush=True)
    load1 = loadavg()
    return {
        "box": box, "n_particles": n_particles, "lam": lam, "tol": tol, "batch": batch,
        "kernel_first_s": kernel_first, "kernel_s": kernel_s, "toeplitz_setup_s": toeplitz_setup,
        "explicit_setup_s": explicit_setup,
        "toeplitz_matvec_s": t_mv, "toeplitz_matvec_first_s": t_first,
        "explicit_matvec_s": e_mv, "explicit_matvec_first_s": e_first,
        "matvec_speedup": e_mv / t_mv,
        "matvec_rel_error": mv_err, "rhs_rel_error": rhs_err,
        "toeplitz_cg_iterations": tres.iterations, "toeplitz_cg_s": t_cg, "toeplitz_cg_iteration_s": t_it,
        "toeplitz_final_residual": tres.residuals[-1], "toeplitz_residuals": tres.residuals,
        "explicit_cg_iterations": eres.iterations, "explicit_cg_s": e_cg, "explicit_cg_iteration_s": e_it,
        "explicit_residuals": eres.residuals, "residual_gap": gap,
        "explicit_cg_iterations_to_tol": eres.iterations if reached else None,
        "explicit_cg_to_tol_est_s": None if reached else e_it * tres.iterations,
        "solution_rel_difference": sol_diff,
        "toeplitz_total_s": toeplitz_setup + t_cg,
        "loadavg": [load0, load1],
    }


def plot(results: list[dict], path: Path) -> None:
    use_agg()
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for r in results:
        lab = f"box {r['box']}, {r['n_particles']}"
        line, = ax1.semilogy(r["toeplitz_residuals"], label=f"{lab}: Toeplitz")
        ax1.semilogy(r["explicit_residuals"], "o", ms=5, mfc="none", color=line.get_color(),
                     label=f"{lab}: explicit")
    ax1.axhline(results[0]["tol"], color="gray", lw=0.8, ls=":")
    ax1.set_xlabel("CG iteration")
    ax1.set_ylabel("relative residual")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    x = np.arange(len(results))
    ax2.bar(x - 0.2, [r["toeplitz_cg_iteration_s"] for r in results], 0.4, label="Toeplitz (FFTs)")
    ax2.bar(x + 0.2, [r["explicit_cg_iteration_s"] for r in results], 0.4, label="explicit (data pass)")
    ax2.scatter(x - 0.2, [r["kernel_s"] for r in results], marker="_", s=400, color="k", zorder=3,
                label="kernel build (once)")
    ax2.set_xticks(x)
    ax2.set_xticklabels([f"box {r['box']}\n{r['n_particles']} particles" for r in results])
    ax2.set_yscale("log")
    ax2.set_ylabel("seconds per CG iteration")
    ax2.legend(fontsize=8)
    ax2.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle(f"CG on the NUFFT normal equations ({jax.devices()[0].device_kind})")
    save_figure(fig, path)


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--sets", default=None, help="box:particles,... (default 32:3000,64:5000)")
        p.add_argument("--lam", type=float, default=1e-3, help="Tikhonov weight (default %(default)s)")
        p.add_argument("--tol", type=float, default=1e-6, help="CG relative residual (default %(default)s)")
        p.add_argument("--explicit-iters", type=int, default=None,
                       help="explicit CG iterations timed (default 3; quick: run to --tol)")
        p.add_argument("--batch", type=int, default=256, help="images per batch of the data passes")
        p.add_argument("--maxiter", type=int, default=2000)

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    spec = args.sets or ("16:300" if args.quick else "32:3000,64:5000")
    sets = [tuple(int(v) for v in s.split(":")) for s in spec.split(",")]
    explicit_iters = args.explicit_iters if args.explicit_iters is not None else (None if args.quick else 3)
    settings = {"quick": args.quick, "sets": sets, "lam": args.lam, "tol": args.tol, "batch": args.batch,
                "explicit_iters": explicit_iters, "maxiter": args.maxiter, "pixel_size": PIXEL_SIZE,
                "dtype": "float32/complex64", "operator": "nufft (eps 1e-6)", "snr": 0.5, "ctf": True}
    t0 = time.perf_counter()
    results = [bench_set(b, n, args.lam, args.tol, explicit_iters, args.batch, args.maxiter) for b, n in sets]
    out = {"machine": machine_info(), "settings": settings, "results": results,
           "peak_memory": {"host_rss_mb": host_peak_rss_mb()}, "seconds_total": time.perf_counter() - t0}
    write_json(args.out / "toeplitz_cg.json", out)
    plot(results, args.out / "toeplitz_cg.png")
    print(f"wrote {args.out / 'toeplitz_cg.json'} and .png in {out['seconds_total']:.1f} s")
    return out


if __name__ == "__main__":
    main()
