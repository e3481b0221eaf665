"""ASPIRE side of ``benchmarks/peers.py``: runs inside a Python that has ASPIRE (its own venv), never jaxcryo's.

ASPIRE is a benchmark-only peer, not a jaxcryo dependency. ``peers.py`` calls this script as a subprocess with
the ASPIRE interpreter (``--aspire-python``, ``$JAXCRYO_ASPIRE_PYTHON`` or ``/work/aspire-venv/bin/python``)::

    python _aspire_peer.py version
    python _aspire_peer.py simulate --box 64 --particles 5000 --snr 0.5 --pixel-size 3 --seed 0 \
        --volume clean70SRibosome_vol.npy --out DIR          # DIR/particles.star + .mrcs, truth.npy, sim.json
    python _aspire_peer.py estimate --star DIR/particles.star --pixel-size 3 --out vol.npy [--maxiter 50]

``simulate``: ASPIRE ``Simulation`` of the given map (Fourier-resampled to ``box`` by ``Volume.downsample`` and
declared ``pixel_size`` Å/px), uniform random poses, ASPIRE's default in-plane shifts (normal, σ = box/16 px),
``RadialCTFFilter`` at 300 kV, Cs 2.7 mm, amplitude contrast 0.1 with defoci evenly spaced over 1–2.5 µm,
amplitudes 1, and white noise. SNR is the mean per-image variance of the clean (CTF-modulated, shifted) images
over the noise variance; the map is scaled so that the noise variance is 1 (images normalised as RELION's
preprocessing leaves them). Written with ASPIRE's own STAR export (``Simulation.save``, RELION 3.1 layout).
The ground truth is the scaled map as ASPIRE holds it (``truth.npy``, ``[z, y, x]`` like an MRC file).

``estimate``: ASPIRE's ``MeanEstimator`` (its defaults: Dirac basis, circulant preconditioner, CG with at most
``maxiter`` = 50 iterations) on ``RelionSource(star)``; writes the map as ``.npy`` and prints a JSON line
with the seconds spent reading and estimating.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np


def _version() -> dict:
    import aspire

    return {"aspire": aspire.__version__, "python": sys.version.split()[0], "numpy": np.__version__}


def simulate(a) -> dict:
    from aspire.noise import WhiteNoiseAdder
    from aspire.operators import RadialCTFFilter
    from aspire.source import Simulation
    from aspire.volume import Volume

    t0 = time.perf_counter()
    v = np.asarray(np.load(a.volume), np.float32)
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise SystemExit(f"{a.volume}: expected a cubic map, got shape {v.shape}")
    arr = Volume(v).downsample(a.box).asnumpy()[0] if v.shape[0] != a.box else v
    defoci = np.linspace(a.defocus_min, a.defocus_max, a.n_defocus)
    filters = [RadialCTFFilter(voltage=a.voltage, defocus=float(d), Cs=a.cs, alpha=a.amp_contrast)
               for d in defoci]

    def make(vol_arr, noise_adder=None):
        return Simulation(n=a.particles, vols=Volume(vol_arr.astype(np.float32), pixel_size=a.pixel_size),
                          unique_filters=filters, amplitudes=1.0, seed=a.seed, pixel_size=a.pixel_size,
                          noise_adder=noise_adder)

    clean = make(arr).clean_images[:].asnumpy()
    signal_var = float(np.mean(np.var(clean, axis=(1, 2))))
    scale = float(np.sqrt(a.snr / signal_var))  # -> signal variance = snr, noise variance = 1
    truth = (arr * scale).astype(np.float32)
    sim = make(truth, WhiteNoiseAdder(var=1.0, seed=a.seed))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    star = out / "particles.star"
    sim.save(str(star), save_mode="single", overwrite=True)
    np.save(out / "truth.npy", truth)
    imgs = sim.images[: min(a.particles, 500)].asnumpy()
    info = {"simulator": "aspire.source.Simulation", **_version(), "star": str(star), "box": a.box,
            "particles": a.particles, "snr": a.snr, "pixel_size": a.pixel_size, "seed": a.seed,
            "volume": str(a.volume), "volume_input_shape": list(v.shape), "volume_scale": scale,
            "signal_variance": a.snr, "noise_variance": 1.0,
            "noise_variance_check_first500": float(np.var(imgs - sim.clean_images[: len(imgs)].asnumpy())),
            "ctf": {"filter": "RadialCTFFilter", "voltage_kv": a.voltage, "cs_mm": a.cs,
                    "amplitude_contrast": a.amp_contrast, "defocus_A": [float(d) for d in defoci]},
            "shifts": "ASPIRE default: normal, sigma = box/16 px per axis", "amplitudes": 1.0,
            "seconds": time.perf_counter() - t0}
    (out / "sim.json").write_text(json.dumps(info, indent=1))
    return info


def estimate(a) -> dict:
    from aspire.reconstruction import MeanEstimator
    from aspire.source import RelionSource

    t0 = time.perf_counter()
    src = RelionSource(str(a.star), pixel_size=a.pixel_size)
    t1 = time.perf_counter()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    est = MeanEstimator(src, maxiter=a.maxiter, checkpoint_prefix=str(out.parent / "aspire_checkpoint"))
    vol = est.estimate()
    t2 = time.perf_counter()
    arr = np.asarray(vol.asnumpy(), np.float32).reshape((src.L,) * 3)
    np.save(out, arr)
    return {"estimator": "aspire.reconstruction.MeanEstimator", **_version(), "maxiter": a.maxiter,
            "basis": type(est.basis).__name__, "preconditioner": est.preconditioner,
            "read_s": t1 - t0, "estimate_s": t2 - t1, "out": str(out)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("version")
    s = sub.add_parser("simulate")
    s.add_argument("--box", type=int, required=True)
    s.add_argument("--particles", type=int, required=True)
    s.add_argument("--snr", type=float, default=0.5)
    s.add_argument("--pixel-size", type=float, default=3.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--volume", required=True, help=".npy map (cubic)")
    s.add_argument("--defocus-min", type=float, default=10000.0)
    s.add_argument("--defocus-max", type=float, default=25000.0)
    s.add_argument("--n-defocus", type=int, default=16)
    s.add_argument("--voltage", type=float, default=300.0)
    s.add_argument("--cs", type=float, default=2.7)
    s.add_argument("--amp-contrast", type=float, default=0.1)
    s.add_argument("--out", required=True)
    e = sub.add_parser("estimate")
    e.add_argument("--star", required=True)
    e.add_argument("--pixel-size", type=float, default=None)
    e.add_argument("--maxiter", type=int, default=50)
    e.add_argument("--out", required=True, help="output .npy")
    a = p.parse_args(argv)
    logging.getLogger("aspire").setLevel(logging.WARNING)
    res = _version() if a.cmd == "version" else simulate(a) if a.cmd == "simulate" else estimate(a)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
