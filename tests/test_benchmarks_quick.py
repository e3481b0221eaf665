"""Smoke tests of the benchmark scripts: each runs with ``--quick --out tmp`` in a subprocess and must write
its JSON (with the documented fields) and its PNG. No timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run_quick(script: str, out: Path) -> dict:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    js = out / f"{script}.json"
    assert js.exists(), f"{script} wrote no {js.name}"
    assert (out / f"{script}.png").exists(), f"{script} wrote no PNG"
    assert (out / f"{script}.png").stat().st_size > 1000
    return json.loads(js.read_text())


def check_machine(m: dict) -> None:
    for k in ("cpu", "cores", "jax", "device"):
        assert k in m, k
    assert isinstance(m["cores"], int) and m["cores"] >= 1


def test_throughput_quick(tmp_path):
    d = run_quick("throughput", tmp_path)
    check_machine(d["machine"])
    assert d["settings"]["quick"] is True
    res = d["results"]
    assert res
    ops = {"forward", "gradient", "hvp", "sgd_step", "psgd_step_k1", "psgd_step_k4", "psgd_step_k1_every4"}
    local = {"nearest", "trilinear"}  # operators with a local stencil also time the exact batch diagonal
    assert {r["interp"] for r in res} == {"nearest", "trilinear", "nufft"}
    for r in res:
        for k in ("op", "interp", "box", "batch", "compile_s", "step_s", "step_min_s", "images_per_s", "hlo"):
            assert k in r, k
        assert r["interp"] in ("nearest", "trilinear", "nufft")
        assert r["box"] == 32
        assert r["step_s"] > 0 and r["compile_s"] > 0 and 0 < r["step_min_s"] <= r["step_s"]
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_s"])
        for k in ("scatter", "gather", "sine", "cosine", "sine_computations"):
            assert isinstance(r["hlo"][k], int), k
        # the per-image filters (CTF x phase) are evaluated once per call
        assert r["hlo"]["sine_computations"] == 1, (r["interp"], r["op"], r["hlo"])
    combos = {(r["interp"], r["box"]) for r in res}
    for i, b in combos:
        got = {r["op"] for r in res if (r["interp"], r["box"]) == (i, b)}
        assert got == (ops | {"psgd_step_exact"} if i in local else ops), (i, got)
    # the trilinear adjoint is one windowed scatter-add (not eight)
    tri = {r["op"]: r["hlo"] for r in res if r["interp"] == "trilinear"}
    assert tri["gradient"]["scatter"] == 1 and tri["sgd_step"]["scatter"] == 1
    rat = d["psgd_over_sgd"]
    assert set(rat) == {f"{i}_{b}" for i, b in combos}
    for key, v in rat.items():
        assert v["psgd_k1"] > 0 and v["psgd_k4"] > 0 and v["psgd_k1_every4"] > 0
        assert v["gradient_over_forward"] > 0
        if v["interp"] in local:
            assert v["psgd_exact"] > 0, key
        else:
            assert v["psgd_exact"] is None, key
    assert set(d["goals"]) == {f"{i}_{b}" for i, b in combos if i in local}


def test_peers_quick(tmp_path):
    d = run_quick("peers", tmp_path)
    check_machine(d["machine"])
    assert d["settings"]["quick"] is True
    assert [s["box"] for s in d["sets"]] == [32]
    assert "-truth" in d["sign_convention"]
    # quick mode is jaxcryo only: the peers are skipped, and the JSON says why
    for name in ("relion", "aspire"):
        info = d["peers"][name]
        assert info["available"] is False and info["reason"]
    (s,) = d["sets"]
    assert s["relion_faithful_truth_sign"] == 1  # simulated by jaxcryo, RELION's CTF sign
    runs = [r for r in s["results"] if r["program"] == "jaxcryo"]
    assert [r["run"] for r in runs] == [1, 2]
    assert {r["program"] for r in s["results"]} == {"jaxcryo"}
    for r in runs:
        assert r["returncode"] == 0, r.get("error")
        for k in ("wall_s", "cpu_s", "fsc", "fsc05_shell", "fsc0143_shell", "fsc_at", "truth_sign", "sign_check"):
            assert k in r, k
        assert r["wall_s"] > 0
        assert len(r["fsc"]) == 32 // 2 + 1
        assert set(r["fsc_at"]) == {"8", "12", "16"}
        assert r["sign_check"]["verified"] is True  # the FSC against the chosen sign is positive at low frequency
        assert r["fsc05_shell"] is None or 1 <= r["fsc05_shell"] <= 16
    assert "jaxcryo_default" in d
    g = d["goals"]
    assert g["accuracy"]["met"] is None and g["speed"]["met"] is None  # no RELION in quick mode


@pytest.mark.skipif(not (BENCH / "sgd_vs_psgd.py").exists(), reason="benchmarks/sgd_vs_psgd.py not written yet")
def test_sgd_vs_psgd_quick(tmp_path):
    d = run_quick("sgd_vs_psgd", tmp_path)
    runs = d["runs"]
    assert isinstance(runs, list) and runs
    for r in runs:
        for k in ("box", "batch", "optimizer", "epochs_to_fsc09", "seconds_to_fsc09", "history"):
            assert k in r, k
        assert isinstance(r["history"], list)


@pytest.mark.skipif(not (BENCH / "conditioning.py").exists(), reason="benchmarks/conditioning.py not written yet")
def test_conditioning_quick(tmp_path):
    d = run_quick("conditioning", tmp_path)
    assert isinstance(d, dict) and d


@pytest.mark.skipif(not (BENCH / "simplecryoem_compare.py").exists(),
                    reason="benchmarks/simplecryoem_compare.py not written yet")
def test_simplecryoem_compare_quick(tmp_path):
    # simplecryoem (the paper's GPL code) is not vendored: without SIMPLECRYOEM_PATH / SIMPLECRYOEM_PYTHON (as
    # in CI) its side must be skipped with a reason and jaxcryo's side still timed.
    d = run_quick("simplecryoem_compare", tmp_path)
    check_machine(d["machine"])
    s = d["settings"]
    assert s["box"] == 32 and s["dtype"] == "float64" and s["interp"] == "trilinear"
    methods = {r["method"] for r in d["results"]}
    assert {"jaxcryo-psgd-paper", "jaxcryo-psgd-paper-c0.99", "jaxcryo-psgd-default"} <= methods
    for r in d["results"]:
        for k in ("method", "first_epoch_s", "epoch_s", "images_per_s", "volume_dtype", "resolution_05"):
            assert k in r, k
        assert r["images_per_s"] > 0 and r["epoch_s"] > 0
        assert r["volume_dtype"] == "complex128"  # float64 really used
    sc = d["simplecryoem"]
    if not sc["available"]:
        assert sc["reason"]
        assert "simplecryoem-precon_sgd" not in methods
        assert all(v is None for v in d["ratio"].values())
        assert d["goal"]["met"] is None
    else:
        assert "simplecryoem-precon_sgd" in methods
        assert sc["volume_dtype"] == "complex128"
        assert sc["convention_check"] > 0.9
        assert all(v > 0 for v in d["ratio"].values())


def test_toeplitz_cg_quick(tmp_path):
    d = run_quick("toeplitz_cg", tmp_path)
    check_machine(d["machine"])
    assert d["settings"]["quick"] is True
    (r,) = d["results"]
    for k in ("box", "n_particles", "kernel_s", "toeplitz_matvec_s", "explicit_matvec_s",
              "toeplitz_cg_iteration_s", "explicit_cg_iteration_s", "toeplitz_cg_iterations", "matvec_rel_error"):
        assert k in r, k
    assert r["matvec_rel_error"] < 1e-5
    assert r["toeplitz_final_residual"] <= d["settings"]["tol"]
    assert r["explicit_cg_iterations_to_tol"] is not None
    assert abs(r["explicit_cg_iterations_to_tol"] - r["toeplitz_cg_iterations"]) <= 3


@pytest.mark.skipif(not (BENCH / "slice_accuracy.py").exists(), reason="benchmarks/slice_accuracy.py not written yet")
def test_slice_accuracy_quick(tmp_path):
    d = run_quick("slice_accuracy", tmp_path)
    check_machine(d["machine"])
    assert d["settings"]["quick"] is True
    (case,) = d["cases"]
    assert case["volume"] == "phantom" and case["box"] == 16
    assert case["reference_check"]["nufft_eps1e-12_float64_vs_direct"] < 1e-9
    by = {r["operator"]: r for r in case["results"]}
    assert {"nearest x1", "trilinear x2", "trilinear x2 +grid", "nufft"} <= set(by)
    for r in by.values():
        assert len(r["shell_error"]) == 16 // 2 + 1
        assert set(r["at"]) == {"N/8", "N/4", "3N/8", "N/2-1", "N/2"}
        assert r["overall"] > 0
    assert by["nufft"]["overall"] < by["trilinear x2 +grid"]["overall"] < by["nearest x1"]["overall"]
    assert d["timing"] and all(t["gradient_s"] > 0 and t["forward_s"] > 0 for t in d["timing"])


def test_paper_experiment_quick(tmp_path):
    """Issue 10's contract: setting, reference (not a run), runs with the per-epoch fields."""
    if not (Path(__file__).resolve().parents[2] / "shared" / "data" / "relion").exists():
        pytest.skip("../shared/data absent")
    d = run_quick("paper_experiment", tmp_path)
    check_machine(d["machine"])
    for k in ("operator", "pose_source", "alpha", "snr", "box", "particles", "batch"):
        assert k in d["setting"], k
    assert d["setting"]["operator"] == "trilinear" and d["setting"]["alpha"] == 1e-8
    ref = d["reference"]
    assert ref["relative_residual"] < 1e-8 and ref["loss_gap_at_zero"] > 0
    names = [r["name"] for r in d["runs"]]
    assert {"sgd_armijo", "psgd_paper"} <= set(names) and "reference" not in names
    epochs = d["setting"]["epochs"]
    for r in d["runs"]:
        assert len(r["loss_gap_closed"]) == epochs and len(r["seconds"]) == epochs
        assert all(0 < g <= 100 for g in r["loss_gap_closed"])
        assert r["seconds"] == sorted(r["seconds"])
        assert r["epoch_to_sgd_final_loss"] is None or 1 <= r["epoch_to_sgd_final_loss"] <= epochs
        assert len(r["fsc_vs_reference"]) == epochs
        assert all(len(f) == d["setting"]["box"] // 2 for f in r["fsc_vs_reference"])
    sgd = next(r for r in d["runs"] if r["name"] == "sgd_armijo")
    assert sgd["epoch_to_sgd_final_loss"] == epochs or sgd["epoch_to_sgd_final_loss"] < epochs
    c = d["conditioning"]
    assert c["ctf"]["kappa_H"] > c["ctf"]["kappa_DinvH"] > 1


def test_refine_quick(tmp_path):
    """Issue 11's benchmark: local (PSGD and SGD updates) and global refinement against the known-pose map."""
    d = run_quick("refine", tmp_path)
    check_machine(d["machine"])
    names = [r["name"] for r in d["runs"]]
    assert names == ["local_psgd", "local_sgd", "global_psgd"]  # ab initio: tests/test_abinitio.py
    for r in d["runs"]:
        assert r["returncode"] == 0, r
        assert r["median_angular_error_deg"] < 10 and r["fsc05_truth_shell"] >= d["known_pose"]["fsc05_truth_shell"] - 2
        assert r["wall_seconds"] > 0 and r["iterations"] == 2
    assert set(d["goals"]) == set(names) and d["goals"]["local_psgd"]["shells_allowed"] == 1
    loc = d["runs"][0]
    assert loc["median_angular_error_deg"] < 4.5  # from 5 degrees
    assert d["relion"]["available"] is None


def test_scaling_quick(tmp_path):
    d = run_quick("scaling", tmp_path)
    check_machine(d["machine"])
    assert d["settings"]["quick"] is True and d["settings"]["devices"] == [1, 2, 4]
    assert "do not predict GPU" in d["note"]
    res = d["results"]
    assert {(r["op"], r["devices"]) for r in res} == {(op, n) for op in ("psgd_step", "sgd_step") for n in (1, 2, 4)}
    for r in res:
        for k in ("box", "batch", "padded_batch", "per_device_batch", "compile_s", "step_s", "step_min_s",
                  "images_per_s", "images_per_s_per_device", "speedup_vs_1", "max_rel_diff_vs_1_device"):
            assert k in r, k
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_s"])
        assert r["per_device_batch"] * r["devices"] == r["padded_batch"]  # the batch really is split
        assert r["max_rel_diff_vs_1_device"] < 1e-5
    p = d["prefetch"]
    for cache in ("warm", "cold"):
        c = p[cache]
        assert c["identical_maps"] is True
        assert c["median_off_s"] > 0 and c["median_on_s"] > 0 and c["read_s_per_epoch"] > 0
        assert len(c["seconds_per_epoch"]["off"]) == len(c["seconds_per_epoch"]["on"]) > 0


def test_streaming_quick(tmp_path):
    """Issue 12: a set in several stacks streamed by `jaxcryo reconstruct` in a child process; peak RSS, epoch
    seconds with prefetch on/off, cold/warm page cache, the disk's raw read speed."""
    d = run_quick("streaming", tmp_path)
    check_machine(d["machine"])
    s = d["settings"]
    assert s["quick"] is True
    ds = d["data_set"]
    assert ds["n_particles"] == s["n_particles"] and len(ds["stacks"]) > 1 and sum(ds["counts"]) == ds["n_particles"]
    raw = d["disk"]["raw_read"]
    assert raw["bytes"] >= ds["n_particles"] * s["box"] ** 2 * 4 and raw["cold_mb_s"] > 0 and raw["warm_mb_s"] > 0
    if raw["resident_after_evict_mb"] is not None:  # fincore present: the eviction took effect
        assert raw["resident_after_evict_mb"] < 0.5 * raw["resident_after_read_mb"]
    runs = d["runs"]
    assert all(r["returncode"] == 0 for r in runs), [r.get("error") for r in runs]
    psgd = [r for r in runs if r["optimizer"] == "psgd"]
    assert {(r["cache"], r["prefetch"]) for r in psgd} == {(c, p) for c in ("cold", "warm") for p in (0, 1)}
    for r in psgd:
        assert r["epoch_s"] > 0 and r["peak_rss_mb"] > 0 and r["fit_calls"] == 2  # one fit per half set
        assert r["reads"] > 0 and 0 <= r["wait_s"] <= r["epoch_s"]
        assert r["scan_s"] is not None
        if r["cache"] == "cold":
            assert [w for w, _ in r["evicted_at"]] == ["after the NaN scan", "when the epoch starts"]
    assert any(r["optimizer"] == "backproject" for r in runs)
    assert d["max_peak_rss_mb"] == max(r["peak_rss_mb"] for r in runs)
    assert d["rss_under_limit"] is True  # a 2000-particle set: far below 3 GB
    for key in ("cold_prefetch_on", "cold_prefetch_off", "warm_prefetch_on", "warm_prefetch_off"):
        assert d["summary"][key]["epoch_s"] > 0, key
    assert d["loadavg_start"] is None or d["loadavg_start"] >= 0


def test_postprocess_quick(tmp_path):
    d = run_quick("postprocess", tmp_path)
    check_machine(d["machine"])
    assert d["settings"]["quick"] is True
    (r,) = d["results"]
    assert r["name"] == "reconstruct_box32"
    for k in ("resolution_0143", "bfactor", "fsc_masked", "fsc_corrected", "shell_0143"):
        assert k in r["jaxcryo"], k
    if d["relion"]["available"]:  # RELION 3.1 installed: the side-by-side numbers are there
        c = r["comparison"]
        for k in ("shell_difference", "bfactor_relative_difference", "masked_fsc_max_abs_difference"):
            assert k in c, k
        assert 0.0 <= r["mask_dice"] <= 1.0
    else:
        assert d["relion"]["reason"]
