"""jaxcryo against a peer package on one simulated RELION STAR set: wall time and FSC to the ground truth.

A particle set is simulated with :func:`jaxcryo.simulate.simulate` (built-in phantom, RELION CTF, shifts,
white noise) and written as a RELION 3.1 STAR + MRC stack with :func:`jaxcryo.data.write_dataset` (what
``jaxcryo simulate`` does). Every method reads that STAR file:

* jaxcryo ``psgd``, ``cg`` and ``backproject`` via :func:`jaxcryo.reconstruct.reconstruct` (``halfmaps=False``,
  ``reference`` = the ground truth), all on the full set;
* ASPIRE's ``MeanEstimator`` (``RelionSource`` on the same STAR), if ``aspire`` is importable. It is not
  installed by this script; when missing, ``"aspire": {"available": false, "reason": ...}`` says so.
  ASPIRE's CTF sign is the opposite of RELION's (``shared/CONVENTIONS.md``), so its map is compared with the
  truth at sign +1 and -1 (and with the axes as stored or reversed); the best is reported with the sign and
  axis order used.

Reported per method: wall seconds (reading included, simulation excluded) and the FSC-0.5 / FSC-0.143
resolution (Å) of the full map against the ground truth (no mask).

Usage: python benchmarks/peers.py [--quick] [--out DIR] [--box 64] [--particles 5000]
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _common import host_peak_rss_mb, machine_info, parse_args, save_figure, use_agg, write_json  # noqa: E402
from jaxcryo import ParticleDataset, fsc, reconstruct, simulate, write_dataset  # noqa: E402
from jaxcryo.operators import OPERATOR_NAMES  # noqa: E402


def _fsc_record(vol, truth, px) -> dict:
    r = fsc(np.asarray(vol, np.float32), truth, pixel_size=px)
    return {"resolution_05": float(r.resolution_05), "resolution_0143": float(r.resolution_0143),
            "fsc": [float(x) for x in r.fsc]}


def run_jaxcryo(star: Path, truth: np.ndarray, px: float, method: str, epochs: int, batch: int,
                interp: str) -> dict:
    t0 = time.perf_counter()
    ds = ParticleDataset.from_file(star)
    res = reconstruct(ds, optimizer=method, epochs=epochs, batch_size=batch, interp=interp, halfmaps=False,
                      reference=truth, progress=False)
    dt = time.perf_counter() - t0
    rec = {"method": f"jaxcryo-{method}", "seconds": dt, "epochs": epochs if method != "backproject" else 1,
           "batch_size": batch, "interp": interp}
    rec.update(_fsc_record(res.volume, truth, px))
    print(f"  {rec['method']:20s} {dt:8.1f} s   FSC0.5 {rec['resolution_05']:.2f} Å   "
          f"FSC0.143 {rec['resolution_0143']:.2f} Å", flush=True)
    return rec


def aspire_status() -> dict:
    try:
        import aspire  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError or a broken install
        return {"available": False, "reason": f"cannot import aspire ({type(e).__name__}: {e}); "
                                               "install it with `pip install aspire` to include it"}
    return {"available": True, "version": getattr(aspire, "__version__", None)}


def run_aspire(star: Path, truth: np.ndarray, px: float, n: int) -> tuple[dict | None, dict]:
    """ASPIRE MeanEstimator on the STAR file; returns (result record or None, aspire info)."""
    info = aspire_status()
    if not info["available"]:
        return None, info
    try:
        from aspire.reconstruction import MeanEstimator
        from aspire.source import RelionSource

        t0 = time.perf_counter()
        src = RelionSource(str(star), pixel_size=px, max_rows=n)
        try:
            est = MeanEstimator(src)  # ASPIRE >= 0.11: basis defaults to FFBBasis3D
        except TypeError:
            from aspire.basis import FBBasis3D

            est = MeanEstimator(src, basis=FBBasis3D((src.L,) * 3))
        vol = est.estimate()
        dt = time.perf_counter() - t0
        arr = np.asarray(vol.asnumpy() if hasattr(vol, "asnumpy") else vol, np.float32).reshape((src.L,) * 3)
        best = None
        for sign in (+1, -1):
            for axes, a in (("as_stored", arr), ("reversed", np.transpose(arr, (2, 1, 0)))):
                r = _fsc_record(sign * a, truth, px)
                score = float(np.mean(r["fsc"][1:]))
                if best is None or score > best[0]:
                    best = (score, sign, axes, r)
        _, sign, axes, r = best
        rec = {"method": "aspire-MeanEstimator", "seconds": dt, "sign": sign, "axes": axes}
        rec.update(r)
        info.update(sign_used=sign, axes_used=axes,
                    note="ASPIRE's CTF sign is opposite to RELION's: compared at +1 and -1, best reported")
        print(f"  {rec['method']:20s} {dt:8.1f} s   FSC0.5 {rec['resolution_05']:.2f} Å   "
              f"FSC0.143 {rec['resolution_0143']:.2f} Å   (sign {sign:+d}, axes {axes})", flush=True)
        return rec, info
    except Exception as e:  # noqa: BLE001 - report, don't fail the whole benchmark
        info.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=5))
        print(f"  ASPIRE failed: {info['error']}", flush=True)
        return None, info


def plot(results: list[dict], settings: dict, path: Path) -> None:
    use_agg()
    import matplotlib.pyplot as plt

    names = [r["method"] for r in results]
    x = np.arange(len(names))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.bar(x, [r["seconds"] for r in results], color="tab:blue")
    a1.set_ylabel("wall time (s)")
    a1.set_yscale("log")
    a1.set_title("time")
    w = 0.38
    a2.bar(x - w / 2, [r["resolution_05"] for r in results], w, label="FSC 0.5")
    a2.bar(x + w / 2, [r["resolution_0143"] for r in results], w, label="FSC 0.143")
    a2.axhline(2 * settings["pixel_size"], color="k", ls=":", lw=1, label="Nyquist")
    a2.set_ylabel("resolution vs ground truth (Å, lower is better)")
    a2.set_title("resolution")
    a2.legend(fontsize=8)
    for a in (a1, a2):
        a.set_xticks(x)
        a.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        a.grid(axis="y", alpha=0.3)
    fig.suptitle(f"box {settings['box']}, {settings['particles']} particles, SNR {settings['snr']}")
    save_figure(fig, path)


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--box", type=int, default=None)
        p.add_argument("--particles", type=int, default=None)
        p.add_argument("--snr", type=float, default=0.1)
        p.add_argument("--epochs", type=int, default=None, help="PSGD epochs (CG: iterations = 2x)")
        p.add_argument("--interp", default="nearest", choices=OPERATOR_NAMES)
        p.add_argument("--no-aspire", action="store_true", help="skip ASPIRE even if installed")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    box = args.box or (32 if args.quick else 64)
    n = args.particles or (1000 if args.quick else 5000)
    epochs = args.epochs or (2 if args.quick else 10)
    batch = 250 if args.quick else 500
    px = 3.0
    settings = {"quick": args.quick, "box": box, "particles": n, "snr": args.snr, "pixel_size": px,
                "psgd_epochs": epochs, "cg_iterations": 2 * epochs, "batch_size": batch, "interp": args.interp,
                "halfmaps": False, "mask": None, "simulator": "jaxcryo.simulate.simulate (nufft, CTF, shifts)"}
    t0 = time.perf_counter()
    sim = simulate(n_particles=n, box=box, snr=args.snr, pixel_size=px, seed=0)
    data_dir = args.out / "peers_data"
    star = write_dataset(data_dir, sim.metadata, sim.images)
    truth = sim.volume
    settings["simulate_s"] = time.perf_counter() - t0
    settings["star"] = str(star)
    print(f"peers: box {box}, {n} particles, simulated in {settings['simulate_s']:.1f} s -> {star}", flush=True)

    results = [
        run_jaxcryo(star, truth, px, "backproject", 1, batch, args.interp),
        run_jaxcryo(star, truth, px, "cg", 2 * epochs, batch, args.interp),
        run_jaxcryo(star, truth, px, "psgd", epochs, batch, args.interp),
    ]
    if args.no_aspire:
        info = {"available": None, "reason": "skipped (--no-aspire)"}
    else:
        rec, info = run_aspire(star, truth, px, n)
        if rec is not None:
            results.append(rec)
    if info.get("available") is False:
        print(f"  ASPIRE not available: {info['reason']}", flush=True)
    out = {"machine": machine_info(), "settings": settings, "results": results, "aspire": info,
           "host_peak_rss_mb": host_peak_rss_mb(), "seconds_total": time.perf_counter() - t0}
    write_json(args.out / "peers.json", out)
    plot(results, settings, args.out / "peers.png")
    print(f"wrote {args.out / 'peers.json'} and .png in {out['seconds_total']:.1f} s")
    return out


if __name__ == "__main__":
    main()
