"""Data parallelism (issue 12): a step sharded over 4 forced CPU devices gives the 1-device map to 1e-5
relative (the API and ``jaxcryo reconstruct --devices``), the step really is sharded, ``run.json`` records the
devices used; the background prefetch and the device-count padding of the batches change nothing.

The multi-device checks run ``tests/parallel_check.py`` in a subprocess, which sets
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX is imported (this process has one device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from jaxcryo.data._batch import epoch_batches, prefetch
from jaxcryo.errors import InputError
from jaxcryo.io.mrc import read_map

HERE = Path(__file__).resolve().parent
TOL = 1e-5


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    """The JSON report of ``parallel_check.py all`` (4 forced CPU devices) and its output folder."""
    out = tmp_path_factory.mktemp("parallel")
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env.pop("JAX_PLATFORMS", None)
    proc = subprocess.run([sys.executable, str(HERE / "parallel_check.py"), "all", str(out)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PARALLEL_CHECK ")][-1]
    return json.loads(line.split(" ", 1)[1]), out, proc.stdout + proc.stderr


def test_sharded_fit_matches_one_device_and_is_sharded(forced):
    rep = forced[0]["api"]
    assert rep["devices_seen"] == 4
    batch = 40
    for name, cfg in rep["configs"].items():
        one = cfg["1"]
        assert "SingleDevice" in one["volume_sharding"], name
        for n, info in cfg.items():
            if n == "1":
                continue
            n = int(n)
            assert info["max_rel_diff_vs_1"] < TOL, (name, n, info["max_rel_diff_vs_1"])
            np.testing.assert_allclose(info["losses"], one["losses"], rtol=TOL)
            # inside the step: each device's body saw its shard (the batch padded to a multiple of n)
            local = -(-batch // n)
            assert info["local_batch_shapes"] == [local], (name, n, info["local_batch_shapes"])
            # around the step: every batch leaf split over the n devices along the batch axis, the volume
            # replicated on all of them
            spy = info["spy_first_step"]
            assert set(spy["batch"]) == {"P('data',)"}, spy
            assert spy["batch_devices"] == [n] and spy["n_shards"] == n and spy["shard_shapes"] == [[local]]
            assert spy["volume"] == "P()" and spy["volume_devices"] == n
            assert info["steps_spied"] == 3 * 4
            assert f"'data': {n}" in info["volume_sharding"] and "spec=P()" in info["volume_sharding"]
            # the compiled step reduces across devices and never gathers the batch (NUFFT points included)
            assert info["all_reduce"] >= 1 and info["all_gather"] == 0, (name, info)


def test_cli_devices_4_matches_devices_1(forced):
    rep, out, log = forced
    rcs = rep["cli"]["returncodes"]
    assert {k: v for k, v in rcs.items() if k != "too_many"} == dict.fromkeys(
        ("psgd_d4", "psgd_d1", "backproject_d4", "backproject_d1"), 0), log[-2000:]
    assert rcs["too_many"] == 2
    assert "--devices 8: JAX sees 4 cpu device(s)" in log
    cli = out / "cli"
    for opt, used in (("psgd", 4), ("backproject", 4)):
        for name in ("map.mrc", "half1.mrc", "half2.mrc"):
            a, _ = read_map(cli / f"{opt}_d4" / name)
            b, _ = read_map(cli / f"{opt}_d1" / name)
            assert np.abs(a - b).max() <= TOL * np.abs(b).max(), (opt, name, float(np.abs(a - b).max()))
        run4 = json.loads((cli / f"{opt}_d4" / "run.json").read_text())
        run1 = json.loads((cli / f"{opt}_d1" / "run.json").read_text())
        assert run4["devices"] == used and run1["devices"] == 1, (opt, run4["devices"])
        assert run4["devices_requested"] == 4 and run4["args"]["devices"] == 4
        assert "devices_note" not in run4
        h4 = json.loads((cli / f"{opt}_d4" / "history.json").read_text())
        h1 = json.loads((cli / f"{opt}_d1" / "history.json").read_text())
        if opt == "psgd":
            np.testing.assert_allclose([h["loss"] for h in h4], [h["loss"] for h in h1], rtol=TOL)


def test_one_pass_estimate_sharded(forced):
    """The default ``backproject`` on 4 devices: the same map and weights as on one; each device sums its own
    images (no all-reduce per batch), one all-reduce at the end; the result is replicated."""
    for name, r in forced[0]["wiener"].items():
        assert r["max_rel_diff"] < TOL and r["max_rel_diff_weights"] < TOL, (name, r)
        assert r["all_reduce_per_batch"] == 0 and r["all_reduce_finish"] >= 1, (name, r)
        assert r["sharding"] == "P()" and r["sharding_devices"] == 4, (name, r)


def test_refine_iteration_devices_4_matches_devices_1(forced):
    """One refinement iteration (global search, local search from perturbed poses) on 4 devices: the same
    poses and half maps as on one (API), and ``jaxcryo refine --devices 4`` the same maps as ``--devices 1``
    with ``run.json`` recording the devices; the scoring really ran on quarter batches."""
    rep, out, log = forced
    r = rep["refine"]
    for name in ("global", "local"):
        assert r[name]["max_rotation_diff"] == 0.0 and r[name]["max_shift_diff"] == 0.0, r[name]
        assert r[name]["max_rel_diff_half_maps"] < TOL, r[name]
        assert r[name]["devices_recorded"] == [4, 1]
    assert set(r["scoring_traced_batch_shapes_4"]) == {13}, r["scoring_traced_batch_shapes_4"]
    assert r["cli_returncodes"] == {"d4": 0, "d1": 0, "too_many": 2}, log[-2000:]
    assert max(r["cli_max_rel_diff"].values()) < TOL, r["cli_max_rel_diff"]
    assert r["cli_devices"] == [4, 1]


# --------------------------------------------------------------------------------------------------
# in this process (one device)
# --------------------------------------------------------------------------------------------------

def test_epoch_batches_multiple_pads_only():
    idx = np.arange(23)
    plain = epoch_batches(idx, 10, np.random.default_rng(1))
    padded = epoch_batches(idx, 10, np.random.default_rng(1), multiple=4)
    assert [len(i) for i, _ in plain] == [10, 10, 10] and [len(i) for i, _ in padded] == [12, 12, 12]
    for (i0, m0), (i1, m1) in zip(plain, padded):
        np.testing.assert_array_equal(i0[m0 > 0], i1[m1 > 0])  # the same particles, in the same order
        assert m1.sum() == m0.sum()
    assert epoch_batches(idx, 8, multiple=4)[0][1].tolist() == [1.0] * 8
    with pytest.raises(ValueError):
        epoch_batches(idx, 8, multiple=0)


def test_prefetch_order_errors_and_close():
    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))
    assert list(prefetch(range(5), depth=0)) == list(range(5))

    def failing():
        yield 1
        raise KeyboardInterrupt  # what the resume test injects into load_batch: raised in the consumer

    it = prefetch(failing(), depth=1)
    assert next(it) == 1
    with pytest.raises(KeyboardInterrupt):
        next(it)

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    with closing(prefetch(endless(), depth=2)) as it:
        assert [next(it) for _ in range(3)] == [0, 1, 2]
    assert threading.active_count() == before  # closing stops and joins the reader thread
    assert len(produced) <= 3 + 2 + 1  # bounded read-ahead


def test_fit_prefetch_is_bitwise_identical():
    import jaxcryo as jc
    from jaxcryo.data._simulate import simulate

    sim = simulate(n_particles=36, box=8, snr=1.0, seed=0, operator="trilinear")
    ds = jc.ArrayDataset(sim.metadata, sim.images)
    proj = jc.Projector(n=8, pixel_size=3.0, operator="trilinear")
    vols = []
    for depth in (0, 1, 3):
        opt = jc.preconditioned_sgd(jc.harmonic_schedule(0.5, 4), n_probes=1)
        res = jc.fit(ds, opt, proj, epochs=2, batch_size=10, lam=1e-3, prefetch=depth)
        vols.append(np.asarray(res.volume_f))
    assert np.array_equal(vols[0], vols[1]) and np.array_equal(vols[0], vols[2])


def test_mesh_counts():
    import jax

    from jaxcryo import parallel

    n = len(jax.local_devices())
    assert parallel.resolve_mesh(1) is None and parallel.mesh_size(None) == 1
    assert parallel.padded_batch_size(10, 4) == 12 and parallel.padded_batch_size(12, 4) == 12
    with pytest.raises(InputError) as e:
        parallel.make_mesh(n + 1)
    assert e.value.param == "devices" and "xla_force_host_platform_device_count" in str(e.value)
    with pytest.raises(InputError):
        parallel.make_mesh(0)
