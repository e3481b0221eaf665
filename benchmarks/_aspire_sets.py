"""ASPIRE side of ``benchmarks/robustness.py``: runs inside a Python that has ASPIRE (its own venv), never jaxcryo's.

Like ``_aspire_peer.py`` (whose conventions it keeps), ``robustness.py`` calls it as a subprocess with the
ASPIRE interpreter (``--aspire-python``, ``$JAXCRYO_ASPIRE_PYTHON`` or ``/work/aspire-venv/bin/python``)::

    python _aspire_sets.py simulate --volume asym --box 64 --particles 5000 --snr 0.5 --seed 0 --out DIR
    python _aspire_sets.py simulate --volume clean70SRibosome_vol.npy ... --out DIR
    python _aspire_sets.py volume --box 64 --seed 0 --out vol.npy     # the asym map alone (ASPIRE's sign)

``simulate`` writes ``DIR/particles.star`` (+ ``.mrcs``, ASPIRE's own RELION 3.1 export, ``Simulation.save``),
``DIR/truth_relion.npy`` and ``DIR/sim.json``:

* volume: ``asym`` = ``AsymmetricVolume(L=box, C=1, K=64, seed=seed)`` (random 3D Gaussian blobs), or a cubic
  ``.npy`` map Fourier-resampled to ``box`` (``Volume.downsample``), declared at ``--pixel-size`` Å/px;
* poses uniform (ASPIRE's default, seeded); offsets Gaussian, σ = ``--shift-sigma`` px per axis, clipped to
  ``±--shift-clip`` px (our own seeded draw, passed as ``offsets``);
* ``RadialCTFFilter`` at 300 kV, Cs 2.7 mm, amplitude contrast 0.1, ``--n-defocus`` defoci evenly spaced
  over 1–2.5 µm; amplitudes 1;
* noise ``WhiteNoiseAdder.from_snr(snr)``: ASPIRE's SNR definition, *signal power / noise variance*, where the
  signal power is the mean squared pixel of the clean (CTF-modulated, shifted) images inside the disc of
  radius ``box // 2`` (``Simulation.true_signal_power``, ``estimate_signal_mean_energy``). The map is first
  scaled so that this power equals ``snr`` (noise variance 1, as RELION's normalisation leaves images).

``sim.json`` also gives the SNR in jaxcryo's definition (``jaxcryo simulate --snr``: the mean over images of
the variance of the whole clean image, over the noise variance), measured on the same clean images, and their
ratio. ASPIRE's CTF sign is the opposite of RELION's (``shared/CONVENTIONS.md``): a RELION-faithful
reconstruction of these images is *minus* ASPIRE's volume, so the truth is written already flipped
(``truth_relion.npy`` = −volume, ``[z, y, x]``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np


#: The settings of ``simulate`` besides the box, particle count, SNR and volume (Å, kV, mm, px).
SIMULATION_DEFAULTS = {"pixel_size": 3.0, "seed": 0, "shift_sigma": 1.5, "shift_clip": 5.0, "defocus_min": 10000.0,
                       "defocus_max": 25000.0, "n_defocus": 9, "voltage": 300.0, "cs": 2.7, "amp_contrast": 0.1}


def disc_mask(box: int) -> np.ndarray:
    """ASPIRE's ``support_mask(box)``: pixels closer than ``box // 2`` to the centre."""
    g = np.arange(box) - box // 2
    return np.hypot(g[:, None], g[None, :]) < box // 2


def asym_volume(box: int, seed: int, pixel_size: float) -> np.ndarray:
    """``AsymmetricVolume(L=box, C=1, K=64, seed=seed)`` as a ``[z, y, x]`` float32 array."""
    from aspire.volume import AsymmetricVolume

    return np.asarray(AsymmetricVolume(L=box, C=1, K=64, seed=seed, pixel_size=pixel_size,
                                       dtype=np.float32).generate().asnumpy()[0], np.float32)


def volume(a) -> dict:
    """``volume``: the ``asym`` map alone (ASPIRE's sign; for ``jaxcryo simulate``, which uses RELION's)."""
    np.save(a.out, asym_volume(a.box, a.seed, a.pixel_size))
    return {"volume": "AsymmetricVolume(L=%d, C=1, K=64, seed=%d)" % (a.box, a.seed), "out": str(a.out)}


def simulate(a) -> dict:
    import aspire
    from aspire.image import Image
    from aspire.noise import WhiteNoiseAdder
    from aspire.operators import RadialCTFFilter
    from aspire.source import Simulation
    from aspire.volume import Volume

    t0 = time.perf_counter()
    if a.volume == "asym":
        arr = asym_volume(a.box, a.seed, a.pixel_size)
    else:
        v = np.asarray(np.load(a.volume), np.float32)
        if v.ndim != 3 or len(set(v.shape)) != 1:
            raise SystemExit(f"{a.volume}: expected a cubic map, got shape {v.shape}")
        arr = Volume(v).downsample(a.box).asnumpy()[0] if v.shape[0] != a.box else v
    arr = np.asarray(arr, np.float32)
    rng = np.random.default_rng([a.seed, 7])
    offsets = np.clip(a.shift_sigma * rng.standard_normal((a.particles, 2)), -a.shift_clip, a.shift_clip)
    defoci = np.linspace(a.defocus_min, a.defocus_max, a.n_defocus)
    filters = [RadialCTFFilter(voltage=a.voltage, defocus=float(d), Cs=a.cs, alpha=a.amp_contrast)
               for d in defoci]

    angles = None
    if a.angles:  # RELION's rot/tilt/psi in radians, which ASPIRE's Simulation takes and writes unchanged
        angles = np.asarray(np.load(a.angles), np.float32)
        if angles.shape != (a.particles, 3):
            raise SystemExit(f"{a.angles}: expected ({a.particles}, 3) Euler angles, got shape {angles.shape}")

    def make(vol_arr, noise_adder=None):
        return Simulation(n=a.particles, vols=Volume(vol_arr.astype(np.float32), pixel_size=a.pixel_size),
                          angles=angles, offsets=offsets.astype(np.float32), unique_filters=filters, amplitudes=1.0,
                          seed=a.seed, pixel_size=a.pixel_size, noise_adder=noise_adder, dtype=np.float32)

    # The clean images are projected once (the projections dominate the time: box 128 x 10,000 particles) and
    # reused: scaled with the map (projection is linear), and for ASPIRE's own signal-power estimate
    # (estimate_signal_mean_energy, what true_signal_power and WhiteNoiseAdder.from_snr compute on them).
    sim0 = make(arr)
    clean = sim0.clean_images[:].asnumpy()
    power0 = float(sim0.estimate_signal_mean_energy(image_accessor=Image(clean)))
    scale = np.float32(np.sqrt(a.snr / power0))  # -> signal power = snr, noise variance = 1
    arr, clean = arr * scale, clean * scale
    power = float(sim0.estimate_signal_mean_energy(image_accessor=Image(clean)))
    sim = make(arr, WhiteNoiseAdder.from_snr(a.snr, signal_power=power, seed=a.seed))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    star = out / "particles.star"
    sim.save(str(star), save_mode="single", overwrite=True)
    np.save(out / "truth_relion.npy", -arr)
    noise_var = float(sim.noise_adder.noise_var)
    m = disc_mask(a.box)
    aspire_def = float(np.mean(clean[:, m] ** 2)) / noise_var
    jaxcryo_def = float(np.mean(np.var(clean, axis=(1, 2)))) / noise_var
    k = min(a.particles, 500)
    info = {"generator": "aspire", "simulator": "aspire.source.Simulation", "aspire": aspire.__version__,
            "python": sys.version.split()[0], "star": str(star), "box": a.box, "particles": a.particles,
            "pixel_size": a.pixel_size, "seed": a.seed,
            "volume": ("AsymmetricVolume(L=%d, C=1, K=64, seed=%d)" % (a.box, a.seed)) if a.volume == "asym"
            else str(a.volume),
            "snr_aspire": a.snr, "snr_aspire_measured": aspire_def, "snr_jaxcryo_measured": jaxcryo_def,
            "jaxcryo_over_aspire": jaxcryo_def / aspire_def, "noise_variance": noise_var,
            "noise_variance_check_first500": float(np.var(sim.images[:k].asnumpy() - clean[:k])),
            "truth": "truth_relion.npy = -ASPIRE volume (ASPIRE's CTF sign is the opposite of RELION's)",
            "ctf": {"filter": "RadialCTFFilter", "voltage_kv": a.voltage, "cs_mm": a.cs,
                    "amplitude_contrast": a.amp_contrast, "defocus_A": [float(d) for d in defoci]},
            "shifts": {"distribution": "normal", "sigma_px": a.shift_sigma, "clip_px": a.shift_clip},
            "angles": a.angles or "uniform (ASPIRE's default)",
            "seconds": time.perf_counter() - t0}
    (out / "sim.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate")
    s.add_argument("--volume", default="asym", help="'asym' (AsymmetricVolume) or a cubic .npy map")
    s.add_argument("--box", type=int, required=True)
    s.add_argument("--particles", type=int, required=True)
    s.add_argument("--snr", type=float, required=True, help="ASPIRE's definition (WhiteNoiseAdder.from_snr)")
    for name, value in SIMULATION_DEFAULTS.items():
        s.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    s.add_argument("--angles", default=None,
                   help=".npy of (particles, 3) Euler angles (RELION's rot/tilt/psi, radians); default uniform")
    s.add_argument("--out", required=True)
    v = sub.add_parser("volume")
    v.add_argument("--box", type=int, required=True)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--pixel-size", type=float, default=3.0)
    v.add_argument("--out", required=True, help="output .npy")
    a = p.parse_args(argv)
    logging.getLogger("aspire").setLevel(logging.WARNING)
    print("RESULT " + json.dumps(simulate(a) if a.cmd == "simulate" else volume(a)), flush=True)


if __name__ == "__main__":
    main()
