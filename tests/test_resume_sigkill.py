"""A run killed with SIGKILL (no chance to clean up) resumes from its last checkpoint to the same map, bit for
bit, and every checkpoint file loads as plain data (``np.load(allow_pickle=False)``, ``json.load``)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from conftest import assert_same_run
from jaxcryo import simulate, write_dataset

ARGS = ["--epochs", "25", "--batch-size", "16", "--seed", "7", "--optimizer", "psgd", "--interp", "trilinear",
        "--quiet", "--platform", "cpu"]


def _cmd(star, out, *extra):
    return [sys.executable, "-m", "jaxcryo_main", "reconstruct", str(star), "--out", str(out), *ARGS, *extra]


def _epoch(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint.json").read_text())["epoch"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_sigkill_then_resume_is_bitwise(tmp_path):
    sim = simulate(n_particles=256, box=16, snr=1.0, seed=0)
    star = write_dataset(tmp_path / "data", sim.metadata, sim.images)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    full = tmp_path / "full"
    subprocess.run(_cmd(star, full), check=True, env=env, capture_output=True, timeout=600)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(star, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while _epoch(out) < 2 and proc.poll() is None and time.time() - t0 < 600:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _epoch(out)
    assert 2 <= killed_at < 25, killed_at  # killed mid-run, after at least two checkpoints
    assert not (out / "map.mrc").exists()

    # The checkpoint is data: arrays without pickle, metadata as JSON.
    with np.load(out / "checkpoint.npz", allow_pickle=False) as z:
        names = set(z.files)
        assert "__meta__" in names and any(n.startswith("half1/volume_f") for n in names)
        assert json.loads(bytes(z["__meta__"]).decode())["epoch"] >= killed_at
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["format"] == "jaxcryo-checkpoint" and meta["config"]["epochs"] == 25

    subprocess.run(_cmd(star, out, "--resume"), check=True, env=env, capture_output=True, timeout=600)
    assert_same_run(full, out)
