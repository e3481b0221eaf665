"""Run by ``tests/test_parallel.py`` in a subprocess: forces ``--devices`` CPU devices *before* JAX is imported
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), then compares data-parallel runs with 1-device runs
and prints one JSON object on stdout.

``python tests/parallel_check.py api OUT_DIR``: :func:`jaxcryo.solvers._fit` on a small simulated set, per configuration
(Hutchinson PSGD on 1/4/3 devices, the exact batch diagonal and NUFFT slices on 1/4), the maps' relative
differences, the shardings of the batch and the volume around the step, the per-device batch the step's body
was traced with, and the all-reduces in the compiled step.

``python tests/parallel_check.py cli OUT_DIR``: ``jaxcryo simulate``, then ``jaxcryo reconstruct --devices 4``
and ``--devices 1`` (same seed) for ``--optimizer psgd`` and the default ``backproject``, into ``OUT_DIR/cli``;
the test compares the maps and reads ``run.json``. Also ``--devices 8`` (more than there are: exit code 2).

``python tests/parallel_check.py refine OUT_DIR``: one :func:`jaxcryo.poses._refine.refine_iteration` (a global search,
and a local one from perturbed poses) on 4 devices and on 1, and ``jaxcryo refine --devices 4`` against
``--devices 1`` for one iteration: the maps' and poses' differences, ``run.json``'s devices.

``python tests/parallel_check.py wiener OUT_DIR``: the one-pass estimate
(:func:`jaxcryo.solvers._wiener.wiener_backprojection`) on 4 devices and on 1, and the all-reduces of its compiled
programs.

``python tests/parallel_check.py abinitio OUT_DIR``: :func:`jaxcryo.poses.abinitio` (a few minibatch steps on a
small set) on 4 devices and on 1: the maps' and final poses' differences, the devices recorded, the per-device
batch the pose search was traced with; and ``jaxcryo abinitio --devices 4`` (its ``run.json``). Not in ``all``.

``all`` runs them all (but ``abinitio``) in one process (one JAX start-up); the JSON has one key per mode.
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
    from jaxcryo.data._simulate import simulate

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


def wiener(out: Path) -> dict:
    """The one-pass estimate (the default ``backproject``) on 4 devices against 1: maps and weights, and the
    compiled programs: no all-reduce per batch (each device sums its own images), one in the finish."""
    import jaxcryo as jc
    from jaxcryo import parallel
    from jaxcryo.solvers._wiener import _wiener_steps, wiener_backprojection
    from jaxcryo.data._simulate import simulate

    sim = simulate(n_particles=150, box=16, snr=1.0, seed=0, operator="trilinear")
    ds = jc.ArrayDataset(sim.metadata, sim.images)
    mesh = parallel.make_mesh(4)
    report = {}
    for name, op in (("trilinear", "trilinear"), ("trilinear_x2", jc.make_operator("trilinear", oversample=2)),
                     ("nufft", "nufft")):
        proj = jc.Projector(n=16, pixel_size=3.0, operator=op)
        a, da = wiener_backprojection(proj, ds, 1e-3, 40)
        b, db = wiener_backprojection(proj, ds, 1e-3, 40, mesh=mesh)
        acc, fin = _wiener_steps(proj, np.dtype(np.float32), True, mesh)
        split = parallel.batch_sharding(mesh)
        num = jax.ShapeDtypeStruct((4, *proj.lifted_shape()), np.complex64, sharding=split)
        den = jax.ShapeDtypeStruct((4, 16, 16, 16), np.float32, sharding=split)
        raw = parallel.shard_batch(jc.load_batch(ds, np.arange(40)), mesh)
        report[name] = {"max_rel_diff": rel(b, a), "max_rel_diff_weights": rel(db, da),
                        "sharding": str(b.sharding.spec), "sharding_devices": len(b.sharding.device_set),
                        "all_reduce_per_batch": acc.lower(num, den, raw).compile().as_text().count("all-reduce("),
                        "all_reduce_finish": fin.lower(num, den).compile().as_text().count("all-reduce(")}
    return report


def refine(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    import jaxcryo as jc
    from jaxcryo.cli import main
    from jaxcryo.io.star import write_star
    from jaxcryo.poses import (RefineSettings, initial_state, lowpass, refine_iteration, prepare_reference,
                               with_poses as _with_poses)
    from jaxcryo.forward._projection import volume_to_fourier
    from jaxcryo.data._simulate import perturbed_metadata, simulate
    from jaxcryo.data._sources import split_halves

    box, px = 20, 3.0
    sim = simulate(n_particles=150, box=box, snr=2.0, seed=1, operator="trilinear", max_shift=1.5 * px)
    ds = jc.ArrayDataset(sim.metadata, sim.images)
    settings = RefineSettings(global_step=30.0, local_step=3.0, batch_size=50, epochs_per_iteration=1,
                              max_shift_px=2.0, global_shift_step_px=1.0)
    proj = jc.Projector(n=box, pixel_size=px, operator=settings.interp)
    ref = prepare_reference(sim.volume, px, box, px)
    ref_f = volume_to_fourier(jax.numpy.asarray(ref))
    halves = split_halves(sim.metadata, settings.seed)
    pert = perturbed_metadata(sim.metadata, 5.0, 1.0, 2)
    report = {}
    for name, src, local in (("global", ds, False), ("local", _with_poses(ds, pert.rotations, pert.shifts), True)):
        res = {}
        for n in (1, 4):
            st = initial_state(src, ref_f, proj, settings, local)
            res[n] = refine_iteration(st, src, halves, proj, settings, devices=n)
        a, b = res[4], res[1]
        report[name] = {
            "max_rel_diff_half_maps": max(rel(x, y) for x, y in zip(a.half_maps, b.half_maps)),
            "max_rotation_diff": float(np.abs(a.rotations - b.rotations).max()),
            "max_shift_diff": float(np.abs(a.shifts - b.shifts).max()),
            "devices_recorded": [a.history[-1]["devices"], b.history[-1]["devices"]]}
    from jaxcryo import parallel
    from jaxcryo.poses import PoseSearch, search_method

    sc = PoseSearch(proj, settings.batch_size, settings.score_memory, parallel.make_mesh(4))  # per device: 52 / 4
    sc(search_method(settings, px, settings.global_step / 2, 1.0, True), ref_f, 6.0, ds, halves[0][:52])
    report["scoring_traced_batch_shapes_4"] = sc.traced_batch_shapes
    d = out / "sim"
    star = jc.write_dataset(d, pert, sim.images)
    from jaxcryo.io.mrc import write_map
    write_map(d / "reference.mrc", ref, px)
    rcs = {}
    for n in (4, 1):
        rcs[f"d{n}"] = main(["refine", str(star), "--reference", str(d / "reference.mrc"), "--out",
                             str(out / f"refine_d{n}"), "--local-only", "--iterations", "1", "--batch-size", "50",
                             "--epochs-per-iteration", "1", "--devices", str(n), "--quiet"])
    rcs["too_many"] = main(["refine", str(star), "--reference", str(d / "reference.mrc"), "--out",
                            str(out / "refine_bad"), "--local-only", "--devices", "8", "--quiet"])
    report["cli_returncodes"] = rcs
    from jaxcryo.io.mrc import read_map

    report["cli_max_rel_diff"] = {name: rel(read_map(out / "refine_d4" / name)[0], read_map(out / "refine_d1" / name)[0])
                                  for name in ("map.mrc", "half1.mrc", "half2.mrc")}
    report["cli_devices"] = [json.loads((out / f"refine_d{n}" / "run.json").read_text())["devices"] for n in (4, 1)]
    return report


def abinitio(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    import jaxcryo as jc
    from jaxcryo.cli import main
    from jaxcryo.data._simulate import simulate
    from jaxcryo.poses import AbinitioSettings, abinitio as run

    sim = simulate(n_particles=200, box=16, snr=2.0, seed=2, operator="trilinear", max_shift=3.0)
    ds = jc.ArrayDataset(sim.metadata, sim.images)
    s = AbinitioSettings(steps=3, batch_size=50, angular_step=30.0, local_levels=1, score_memory=1 << 18)
    res = {n: run(ds, s, progress=False, devices=n) for n in (1, 4)}
    a, b = res[4], res[1]
    star = jc.write_dataset(out / "sim", sim.metadata, sim.images)
    rc = main(["abinitio", str(star), "--out", str(out / "d4"), "--steps", "1", "--batch-size", "50",
               "--angular-step", "30", "--devices", "4", "--quiet"])
    return {"max_rel_diff_map": rel(a.volume, b.volume),
            "max_rotation_diff": float(np.abs(a.metadata.rotations - b.metadata.rotations).max()),
            "max_shift_diff": float(np.abs(a.metadata.shifts - b.metadata.shifts).max()),
            "losses": [[h["loss"] for h in r.history] for r in (a, b)],
            "devices": [a.devices, b.devices], "cli_returncode": rc,
            "cli_devices": json.loads((out / "d4" / "run.json").read_text())["devices"] if rc == 0 else None}


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    modes = {"api": api, "cli": cli, "wiener": wiener, "refine": refine}
    if mode == "abinitio":
        modes = {"abinitio": abinitio}
    result = {m: modes[m](out / m) for m in (modes if mode == "all" else [mode])}
    print("PARALLEL_CHECK " + json.dumps(result))
