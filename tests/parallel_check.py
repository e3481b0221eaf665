"""Run by ``tests/test_parallel.py`` in a subprocess: forces ``--devices`` CPU devices *before* JAX is imported
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), then compares data-parallel runs with 1-device runs
and prints one JSON object on stdout.

``python tests/parallel_check.py api OUT_DIR``: :func:`jaxcryo.fit` on a small simulated set, per configuration
(Hutchinson PSGD on 1/4/3 devices, the exact batch diagonal and NUFFT slices on 1/4), the maps' relative
differences, the shardings of the batch and the volume around the step, the per-device batch the step's body
was traced with, and the all-reduces in the compiled step.

``python tests/parallel_check.py cli OUT_DIR``: ``jaxcryo simulate``, then ``jaxcryo reconstruct --devices 4``
and ``--devices 1`` (same seed) for ``--optimizer psgd`` and the default ``backproject``, into ``OUT_DIR/cli``;
the test compares the maps and reads ``run.json``. Also ``--devices 8`` (more than there are: exit code 2).

``all`` runs both in one process (one JAX start-up); the JSON has one key per mode.
"""

from __future__ import annotations

import os
import sys

N_FORCED = 4
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={N_FORCED}").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402


def rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def api(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    import jaxcryo as jc
    from jaxcryo import parallel
    from jaxcryo.simulate import simulate

    sim = simulate(n_particles=160, box=16, snr=1.0, seed=0, operator="trilinear")
    ds = jc.ArrayDataset(sim.metadata, sim.images)
    batch, lam, epochs = 40, 1e-3, 3

    def run(interp, diagonal, n_dev, spy=None):
        proj = jc.Projector(n=16, pixel_size=3.0, operator=interp)
        opt = jc.preconditioned_sgd(jc.harmonic_schedule(0.5, 4), diagonal=diagonal, projector=proj, lam=lam,
                                    n_probes=2)
        mesh = parallel.make_mesh(n_dev)
        step = jc.make_step(opt, proj, lam, mesh=mesh)

        def spied(v, s, raw):
            leaves = parallel.shardings(raw)
            spy.append({"batch": [str(getattr(x, "spec", x)) for x in leaves],
                        "batch_devices": sorted({len(x.device_set) for x in leaves}),
                        "shard_shapes": sorted({tuple(sh.data.shape)[:1] for sh in raw.images.addressable_shards}),
                        "n_shards": len(raw.images.addressable_shards),
                        "volume": str(getattr(v.sharding, "spec", v.sharding)),
                        "volume_devices": len(v.sharding.device_set)})
            return step(v, s, raw)

        res = jc.fit(ds, opt, proj, epochs=epochs, batch_size=batch, lam=lam, seed=3,
                     step_fn=step if spy is None else spied, mesh=mesh)
        info = {"losses": [h["loss"] for h in res.history], "volume_sharding": str(res.volume_f.sharding)}
        if isinstance(step, parallel.ShardedStep):
            info["local_batch_shapes"] = list(step.local_batch_shapes)
            raw = parallel.shard_batch(jc.load_batch(ds, np.arange(parallel.padded_batch_size(batch, mesh))), mesh)
            v = parallel.replicate(res.volume_f, mesh)
            txt = step.lower(v, parallel.replicate(res.state.opt_state, mesh), raw).compile().as_text()
            info["all_reduce"] = txt.count("all-reduce(")
            info["all_gather"] = txt.count("all-gather(")
        return np.asarray(res.volume_f), info

    report = {"devices_seen": len(jax.devices()), "configs": {}}
    for name, interp, diagonal, counts in (("psgd_hutchinson_trilinear", "trilinear", None, (4, 3)),
                                           ("psgd_exact_batch_diagonal_nearest", "nearest", "batch", (4,)),
                                           ("psgd_hutchinson_nufft", "nufft", None, (4,))):
        ref, info1 = run(interp, diagonal, 1)
        rec = {"1": info1}
        for n in counts:
            spy: list = []
            vol, info = run(interp, diagonal, n, spy)
            info["max_rel_diff_vs_1"] = rel(vol, ref)
            info["spy_first_step"] = spy[0]
            info["steps_spied"] = len(spy)
            rec[str(n)] = info
        report["configs"][name] = rec
    return report


def cli(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    from jaxcryo.cli import main

    sim = out / "sim"
    assert main(["simulate", "--box", "16", "--n-particles", "240", "--snr", "1", "--out", str(sim), "--quiet"]) == 0
    star = str(sim / "particles.star")
    rcs = {}
    for opt, extra in (("psgd", ["--epochs", "3", "--batch-size", "30"]), ("backproject", [])):
        for n in (4, 1):
            d = out / f"{opt}_d{n}"
            rcs[f"{opt}_d{n}"] = main(["reconstruct", star, "--out", str(d), "--optimizer", opt, "--seed", "5",
                                       "--devices", str(n), "--quiet"] + extra)
    rcs["too_many"] = main(["reconstruct", star, "--out", str(out / "bad"), "--devices", "8", "--quiet"])
    return {"devices_seen": len(jax.devices()), "returncodes": rcs}


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    modes = {"api": api, "cli": cli}
    result = {m: modes[m](out / m) for m in (modes if mode == "all" else [mode])}
    print("PARALLEL_CHECK " + json.dumps(result))
