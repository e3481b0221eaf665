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
    ops = {"forward", "gradient", "sgd_step", "psgd_step_k1", "psgd_step_k4"}
    assert {r["op"] for r in res} == ops
    for r in res:
        for k in ("op", "interp", "box", "batch", "compile_s", "step_s", "images_per_s"):
            assert k in r, k
        assert r["interp"] in ("nearest", "trilinear", "nufft")
        assert r["box"] == 32
        assert r["step_s"] > 0 and r["compile_s"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_s"])
    combos = {(r["interp"], r["box"]) for r in res}
    assert len(res) == len(ops) * len(combos)
    rat = d["psgd_over_sgd"]
    assert set(rat) == {f"{i}_{b}" for i, b in combos}
    for v in rat.values():
        assert v["psgd_k1"] > 0 and v["psgd_k4"] > 0


def test_peers_quick(tmp_path):
    d = run_quick("peers", tmp_path)
    check_machine(d["machine"])
    assert d["settings"]["box"] == 32
    methods = {r["method"] for r in d["results"]}
    assert {"jaxcryo-psgd", "jaxcryo-cg", "jaxcryo-backproject"} <= methods
    for r in d["results"]:
        for k in ("method", "seconds", "resolution_05", "resolution_0143"):
            assert k in r, k
        assert r["seconds"] > 0
        # resolutions are in Å, at or above Nyquist (2 * 3 Å), or None if the FSC never falls below
        for k in ("resolution_05", "resolution_0143"):
            assert r[k] is None or r[k] >= 2 * d["settings"]["pixel_size"] - 1e-6
    a = d["aspire"]
    assert "available" in a
    if a["available"] is False:
        assert a["reason"]
        assert "aspire-MeanEstimator" not in methods
    elif a["available"] and "error" not in a:
        rec = next(r for r in d["results"] if r["method"] == "aspire-MeanEstimator")
        assert rec["sign"] in (1, -1)


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
