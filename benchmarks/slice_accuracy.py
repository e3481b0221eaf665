"""Slice accuracy: each slice operator's error against the exact DFT slice, per frequency shell.

For a volume ``v`` and random rotations the reference is the exact DFT of ``v`` at every slice point,
``V(p) = sum_r v(r) exp(-2 pi i p . r / N)``, summed directly in float64
(:func:`jaxcryo.forward._operators.dft_at_points`; checked against a float64 NUFFT at eps 1e-12, the agreement is in
the JSON as ``reference_check``). Each operator computes the same slices from the volume's centred Fourier
transform in the production precision (float32/complex64): ``nearest`` and ``trilinear`` at oversampling 1,
2 and 3 with and without the gridding correction (``gridding``: the real-space volume divided by the
kernel's transform before the padded FFT, RELION's ``griddingCorrect``), and ``nufft`` at its default eps.
The error of a shell is ``||S v - V||_2 / ||V||_2`` over the slice points whose radius ``|p|`` rounds to
that shell (``0 .. N/2``, voxel units; only the modelled points ``|p| <= N/2``: the image corners beyond
are masked out by the forward model), and ``overall`` the same over all of them. A shell whose reference
power is below 1e-12 of the volume's (no signal, e.g. beyond a low-pass filter) is reported as ``null``.

Volumes: the built-in phantom (:func:`jaxcryo.data._simulate.phantom`, boxes 32 and 64) and, when
``../shared/data`` is present, ASPIRE's 70S ribosome map (signal up to Nyquist; boxes 32 and 64) and RELION's
beta-galactosidase reference (low-pass filtered at about 40 Å, i.e. at shell 9 whatever the crop, so it is
measured at box 20, where that is near Nyquist), each Fourier-cropped to the box.

For context, ``timing`` records one forward and one value-and-gradient of the minibatch objective (jitted,
CTF and shifts, complex64) per operator at ``--time-box`` / ``--time-batch`` (default box 64, batch 100).

What slice errors do to a reconstruction (full mode; ``--no-reconstruction`` skips it): noise-free images of
the ribosome (the phantom when absent), box 32, 2,000 particles, CTF and shifts, made by the exact NUFFT;
the least-squares optimum of each operator's model (CG, Tikhonov 1e-5, 60 iterations) against the truth,
relative error per shell (``reconstruction``). Random per-slice errors average out over many images there,
systematic ones (the kernel's attenuation, which the gridding correction removes) do not.

Usage: python benchmarks/slice_accuracy.py [--quick] [--out DIR] [--boxes 32 64] [--images 16]
Writes DIR/slice_accuracy.json and DIR/slice_accuracy.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # the reference and the NUFFT check in float64; operators in float32

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import MAPS, load_map, machine_info, parse_args, time_calls, use_agg, write_json  # noqa: E402
from jaxcryo.data import ArrayDataset, make_batch, phantom, random_ctf_params, simulate  # noqa: E402
from jaxcryo.forward import (NUFFT, Nearest, Projector, Trilinear, describe, dft_at_points, slice_nufft,  # noqa: E402
                             slice_points)
from jaxcryo.leastsq import objective, solve_cg, value_and_grad  # noqa: E402
from jaxcryo.ndimage import fft3c, shell_index  # noqa: E402
from jaxcryo.plotting import save_figure  # noqa: E402
from jaxcryo.rotations import random_rotations  # noqa: E402

#: Default boxes per volume (``--boxes`` overrides them all); the maps are ``_common.MAPS``.
BOXES = {"phantom": (32, 64), "ribosome": (32, 64), "betagal": (20,)}
NO_SIGNAL = 1e-12


def operator_configs(quick: bool = False) -> list[tuple[str, object]]:
    """``(label, operator)`` for every configuration measured."""
    ops = []
    for cls, name in ((Nearest, "nearest"), (Trilinear, "trilinear")):
        for s in ((1, 2) if quick else (1, 2, 3)):
            for g in (False, True):
                ops.append((f"{name} x{s}{' +grid' if g else ''}", cls(oversample=s, gridding=g)))
    ops.append(("nufft", NUFFT()))
    return ops


def load_volume(name: str, box: int) -> np.ndarray | None:
    """The volume ``(box,)*3`` float64: the phantom, or a shared map Fourier-cropped to ``box`` (None if absent)."""
    if name == "phantom":
        return phantom(box).astype(np.float64)
    if not MAPS[name].exists():
        return None
    v, _ = load_map(name, box, np.float64)
    return v / np.abs(v).max()


def shell_errors(ref: np.ndarray, est: np.ndarray, radius: np.ndarray, n: int, ref_power: np.ndarray) -> dict:
    """Relative L2 error per shell ``0..n/2`` (None where the shell has no signal) and overall."""
    sh = np.where(radius <= n / 2 + 1e-6, np.rint(radius), n).astype(int)  # n: outside the image mask
    per = []
    for k in range(n // 2 + 1):
        m = sh == k
        den = np.sum(np.abs(ref[m]) ** 2)
        ok = m.any() and den / max(m.sum(), 1) > NO_SIGNAL * ref_power
        per.append(float(np.sqrt(np.sum(np.abs(est[m] - ref[m]) ** 2) / den)) if ok else None)
    keep = radius <= n / 2 + 1e-6
    overall = float(np.sqrt(np.sum(np.abs(est[keep] - ref[keep]) ** 2) / np.sum(np.abs(ref[keep]) ** 2)))
    return {"shell": per, "overall": overall}


def at_shells(per: list, n: int) -> dict:
    """The error at shells N/8, N/4, 3N/8, N/2 - 1 and N/2 (keys ``"N/8"`` ...)."""
    return {k: per[i] for k, i in (("N/8", n // 8), ("N/4", n // 4), ("3N/8", 3 * n // 8),
                                   ("N/2-1", n // 2 - 1), ("N/2", n // 2))}


def measure(vol: np.ndarray, n_images: int, ops, seed: int = 0) -> tuple[list[dict], dict]:
    n = vol.shape[-1]
    rots = random_rotations(jax.random.PRNGKey(seed), n_images, jnp.float64)
    pts = np.asarray(slice_points(rots, n, jnp.float64))
    radius = np.linalg.norm(pts, axis=-1)
    t0 = time.perf_counter()
    ref = dft_at_points(vol, pts)
    t_ref = time.perf_counter() - t0
    vf64 = fft3c(jnp.asarray(vol, jnp.complex128))
    ref_power = float(np.mean(np.abs(np.asarray(vf64)) ** 2))
    nu = np.asarray(slice_nufft(vf64, jnp.asarray(pts), 1e-12))
    check = {"nufft_eps1e-12_float64_vs_direct": float(np.linalg.norm(nu - ref) / np.linalg.norm(ref)),
             "direct_sum_seconds": t_ref, "points": int(radius.size)}
    vf32 = vf64.astype(jnp.complex64)
    pts32 = jnp.asarray(pts, jnp.float32)
    rows = []
    for label, op in ops:
        est = np.asarray(jax.jit(op.slice)(vf32, pts32), np.complex128)
        e = shell_errors(ref, est, radius, n, ref_power)
        rows.append({"operator": label, "describe": describe(op), "interp": type(op).__name__.lower(),
                     "oversample": getattr(op, "oversample", 1), "gridding": bool(getattr(op, "gridding_on", False)),
                     "shell_error": e["shell"], "overall": e["overall"], "at": at_shells(e["shell"], n)})
    return rows, check


def timing(ops, box: int, batch: int, reps: int) -> list[dict]:
    """Forward and value-and-gradient seconds (median of ``reps`` after the compiling call) per operator."""
    rng = np.random.default_rng(0)
    px = 3.0
    rots = random_rotations(jax.random.PRNGKey(1), batch, jnp.float32)
    b = make_batch(rng.standard_normal((batch, box, box)), rots, rng.uniform(-2 * px, 2 * px, (batch, 2)),
                   random_ctf_params(rng, batch), dtype=jnp.float32)
    b = jax.device_put(b)
    key = jax.random.PRNGKey(2)
    v0 = (jax.random.normal(key, (box,) * 3) + 1j * jax.random.normal(jax.random.split(key)[0], (box,) * 3))
    v0 = v0.astype(jnp.complex64)
    out = []
    for label, op in ops:
        proj = Projector(n=box, pixel_size=px, operator=op)
        fwd = jax.jit(lambda v, b, proj=proj: proj(v, b.rotations, b.shifts, b.ctf))
        grad = jax.jit(lambda v, b, proj=proj: value_and_grad(objective(b, proj))(v))
        c_f, t_f = time_calls(lambda: fwd(v0, b), reps)
        c_g, t_g = time_calls(lambda: grad(v0, b), reps)
        out.append({"operator": label, "box": box, "batch": batch, "forward_s": t_f, "gradient_s": t_g,
                    "gradient_over_forward": t_g / t_f, "forward_compile_s": c_f, "gradient_compile_s": c_g})
        print(f"  time {label:18s} forward {t_f * 1e3:8.1f} ms  value+grad {t_g * 1e3:8.1f} ms", flush=True)
    return out


#: The operators of the reconstruction experiment (the others follow from these).
RECON_OPS = ("nearest x1", "nearest x1 +grid", "nearest x2", "trilinear x1", "trilinear x1 +grid", "trilinear x2",
             "trilinear x2 +grid", "nufft")


def reconstruction(ops, box: int = 32, n_particles: int = 2000, lam: float = 1e-5, maxiter: int = 60) -> dict:
    """Per-shell relative error to the truth of each operator's least-squares optimum on noise-free data."""
    vol = load_volume("ribosome", box)
    name = "ribosome"
    if vol is None:
        vol, name = load_volume("phantom", box), "phantom"
    sim = simulate(n_particles=n_particles, box=box, snr=float("inf"), ctf=True, seed=1,
                   volume=vol.astype(np.float32), operator=NUFFT())
    ds = ArrayDataset(sim.metadata, sim.images)
    truth = np.asarray(fft3c(jnp.asarray(sim.volume, jnp.complex128)))
    sh = shell_index(box)
    rows = []
    for label, op in ops:
        t0 = time.perf_counter()
        proj = Projector(n=box, pixel_size=sim.metadata.pixel_size, operator=op)
        res = solve_cg(proj, ds, lam=lam, tol=1e-6, maxiter=maxiter, batch_size=500, dtype=jnp.float32)
        d = np.asarray(res.x, np.complex128) - truth
        per = [float(np.sqrt(np.sum(np.abs(d[sh == k]) ** 2) / np.sum(np.abs(truth[sh == k]) ** 2)))
               for k in range(box // 2 + 1)]
        m = sh <= box // 2
        overall = float(np.sqrt(np.sum(np.abs(d[m]) ** 2) / np.sum(np.abs(truth[m]) ** 2)))
        rows.append({"operator": label, "shell_error": per, "overall": overall, "at": at_shells(per, box),
                     "cg_iterations": res.iterations, "cg_residual": res.residuals[-1],
                     "seconds": time.perf_counter() - t0})
        print(f"  recon {label:18s} overall {overall:.3f}  N/4 {per[box // 4]:.3f}  N/2-1 {per[box // 2 - 1]:.3f}"
              f"  ({rows[-1]['seconds']:.0f} s)", flush=True)
    return {"volume": name, "box": box, "n_particles": n_particles, "lam": lam, "maxiter": maxiter,
            "data": "noise-free, CTF, shifts, simulated with NUFFT", "results": rows}


STYLE = {"nearest": "tab:blue", "trilinear": "tab:orange", "nufft": "tab:green"}


def plot(cases: list[dict], timings: list[dict], path: Path, recon: dict | None = None) -> None:
    use_agg()
    import matplotlib.pyplot as plt

    panels = len(cases) + (1 if timings else 0) + (1 if recon else 0)
    cols = min(3, panels)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    for ax, case in zip(axes.flat, cases):
        n = case["box"]
        for r in case["results"]:
            y = np.array([np.nan if e is None else e for e in r["shell_error"]], float)
            s = r["oversample"]
            ax.semilogy(np.arange(len(y)), y, color=STYLE[r["interp"]], lw=1.0 + 0.6 * (s - 1),
                        ls="-" if r["gridding"] or r["interp"] == "nufft" else "--",
                        alpha=0.6 + 0.13 * (s - 1), label=r["operator"])
        ax.set_title(f"{case['volume']}, box {n}, {case['images']} images", fontsize=9)
        ax.set_xlabel("shell |k| (Fourier voxels)")
        ax.set_ylabel("relative error vs exact DFT")
        ax.set_xlim(0, n // 2)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    k = len(cases)
    if timings:
        ax = axes.flat[k]
        tbox = timings[0]["box"]
        ref = next((c for c in cases if c["box"] == tbox and c["volume"] == "phantom"), cases[0])
        acc = {r["operator"]: r["overall"] for r in ref["results"]}
        for t in timings:
            name = t["operator"]
            ax.loglog(t["gradient_s"] * 1e3, acc[name], "o", color=STYLE[name.split()[0]],
                      mfc="none" if "+grid" not in name and name != "nufft" else None)
            ax.annotate(name, (t["gradient_s"] * 1e3, acc[name]), fontsize=6)
        ax.set_xlabel(f"value+gradient ms (box {timings[0]['box']}, batch {timings[0]['batch']})")
        ax.set_ylabel(f"overall error ({ref['volume']}, box {ref['box']})")
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title("accuracy vs cost", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        k += 1
    if recon:
        ax = axes.flat[k]
        style = {r["operator"]: r for r in cases[0]["results"]}
        for r in recon["results"]:
            st = style[r["operator"]]
            ax.semilogy(np.arange(len(r["shell_error"])), r["shell_error"], color=STYLE[st["interp"]],
                        lw=1.0 + 0.6 * (st["oversample"] - 1),
                        ls="-" if st["gridding"] or st["interp"] == "nufft" else "--", label=r["operator"])
        ax.set_title(f"least-squares optimum vs truth ({recon['volume']}, box {recon['box']}, "
                     f"{recon['n_particles']} noise-free images)", fontsize=8)
        ax.set_xlabel("shell |k| (Fourier voxels)")
        ax.set_ylabel("relative error of the map")
        ax.grid(True, which="both", alpha=0.3)
        k += 1
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    fig.legend(handles, labels, loc="lower center", ncol=7, fontsize=7, frameon=False)
    fig.suptitle("Slice error per frequency shell against the exact DFT (dashed: no gridding correction; "
                 "line width: oversampling)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    save_figure(fig, path)


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--boxes", type=int, nargs="+", default=None,
                       help="for every volume (default: phantom and ribosome 32 64, betagal 20; quick: 16)")
        p.add_argument("--images", type=int, default=None, help="random rotations per case (default 16; quick 3)")
        p.add_argument("--volumes", nargs="+", default=None, choices=["phantom", *MAPS],
                       help="default all present (quick: phantom)")
        p.add_argument("--time-box", type=int, default=None, help="timing box (default 64; quick 16)")
        p.add_argument("--time-batch", type=int, default=None, help="timing batch (default 100; quick 8)")
        p.add_argument("--no-timing", action="store_true")
        p.add_argument("--no-reconstruction", action="store_true", help="skip the CG experiment (quick: skipped)")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    boxes = args.boxes or ([16] if args.quick else None)
    images = args.images or (3 if args.quick else 16)
    volumes = args.volumes or (["phantom"] if args.quick else ["phantom", *MAPS])
    tbox = args.time_box or (16 if args.quick else 64)
    tbatch = args.time_batch or (8 if args.quick else 100)
    ops = operator_configs(args.quick)
    settings = {"quick": args.quick, "boxes": boxes or {v: BOXES[v] for v in volumes}, "images": images,
                "volumes": volumes,
                "operators": [label for label, _ in ops], "operator_dtype": "float32/complex64",
                "reference": "direct DFT sum in float64 (jaxcryo.forward._operators.dft_at_points)",
                "error": "||S v - V|| / ||V|| per shell round(|p|), points with |p| <= N/2 (the image mask)",
                "no_signal_threshold": NO_SIGNAL, "timing_box": tbox, "timing_batch": tbatch}
    t0 = time.perf_counter()
    cases, skipped = [], []
    for name in volumes:
        for box in boxes or BOXES[name]:
            vol = load_volume(name, box)
            if vol is None:
                skipped.append({"volume": name, "reason": f"{MAPS[name]} not found"})
                continue
            print(f"slice_accuracy: {name} box {box}, {images} images", flush=True)
            rows, check = measure(vol, images, ops)
            cases.append({"volume": name, "box": box, "images": images, "reference_check": check, "results": rows})
            print(f"  reference: direct sum {check['direct_sum_seconds']:.1f} s, NUFFT 1e-12 agrees to "
                  f"{check['nufft_eps1e-12_float64_vs_direct']:.1e}")
            for r in rows:
                a = r["at"]
                f = lambda x: "   --   " if x is None else f"{x:8.2e}"  # noqa: E731
                print(f"  {r['operator']:18s} overall {r['overall']:8.2e}  N/4 {f(a['N/4'])}  N/2-1 {f(a['N/2-1'])}"
                      f"  N/2 {f(a['N/2'])}", flush=True)
    timed = [(lab, op) for lab, op in ops if not args.quick or lab in ("nearest x1", "trilinear x2 +grid", "nufft")]
    timings = [] if args.no_timing else timing(timed, tbox, tbatch, 2 if args.quick else 5)
    recon = None
    if not (args.quick or args.no_reconstruction):
        print("slice_accuracy: least-squares optimum per operator (noise-free data)", flush=True)
        recon = reconstruction([(lab, op) for lab, op in ops if lab in RECON_OPS])
    out = {"machine": machine_info(), "settings": settings, "cases": cases, "skipped": skipped,
           "timing": timings, "reconstruction": recon, "seconds_total": time.perf_counter() - t0}
    write_json(args.out / "slice_accuracy.json", out)
    plot(cases, timings, args.out / "slice_accuracy.png", recon)
    print(f"wrote {args.out / 'slice_accuracy.json'} and .png in {out['seconds_total']:.1f} s")
    return out


if __name__ == "__main__":
    main()
