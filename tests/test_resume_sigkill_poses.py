"""``jaxcryo refine`` and ``jaxcryo abinitio`` killed with SIGKILL after a checkpoint resume (``--resume``) to
the same maps and poses, bit for bit, as runs without interruption; the checkpoints load as plain data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxcryo import read_map, simulate, write_dataset
from jaxcryo.data._simulate import perturbed_metadata
from jaxcryo.data._sources import read_particles
from jaxcryo.io.mrc import write_map

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _done(out: Path, key: str) -> int:
    try:
        return int(json.loads((out / "checkpoint.json").read_text())[key])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _kill_after(cmd: list, out: Path, key: str, at_least: int) -> int:
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while _done(out, key) < at_least and proc.poll() is None and time.time() - t0 < 600:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "map.mrc").exists()
    with np.load(out / "checkpoint.npz", allow_pickle=False) as z:  # data, no pickle
        assert "__meta__" in z.files
    return _done(out, key)


def _same(full: Path, resumed: Path, names: tuple, key: str) -> None:
    for name in names:
        a, _ = read_map(full / name)
        b, _ = read_map(resumed / name)
        assert np.array_equal(a, b), (name, float(np.abs(a - b).max()))
    pa, pb = read_particles(full / "particles.star"), read_particles(resumed / "particles.star")
    np.testing.assert_array_equal(pa.rotations, pb.rotations)
    np.testing.assert_array_equal(pa.shifts, pb.shifts)
    ha = json.loads((full / "history.json").read_text())
    hb = json.loads((resumed / "history.json").read_text())
    assert [h[key] for h in ha] == [h[key] for h in hb]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("poses_resume")
    sim = simulate(n_particles=240, box=16, snr=2.0, seed=0, operator="trilinear", max_shift=3.0)
    pert = perturbed_metadata(sim.metadata, 5.0, 1.0, 1)
    write_map(d / "reference.mrc", sim.volume, float(sim.metadata.pixel_size))
    return write_dataset(d / "sim", pert, sim.images), d / "reference.mrc"


def test_refine_sigkill_then_resume_is_bitwise(data, tmp_path):
    star, ref = data

    def cmd(out, *extra):
        return [sys.executable, "-m", "jaxcryo_main", "--platform", "cpu", "refine", str(star), "--reference", str(ref),
                "--out", str(out), "--local-only", "--iterations", "4", "--batch-size", "60", "--epochs-per-iteration", "1",
                "--quiet", *extra]

    subprocess.run(cmd(tmp_path / "full"), check=True, env=ENV, capture_output=True, timeout=600)
    n_full = len(json.loads((tmp_path / "full" / "history.json").read_text()))
    out = tmp_path / "killed"
    killed_at = _kill_after(cmd(out), out, "iteration", 1)
    assert 1 <= killed_at < n_full, (killed_at, n_full)
    subprocess.run(cmd(out, "--resume"), check=True, env=ENV, capture_output=True, timeout=600)
    _same(tmp_path / "full", out, ("map.mrc", "half1.mrc", "half2.mrc"), "resolution")


def test_abinitio_sigkill_then_resume_is_bitwise(data, tmp_path):
    star, _ = data

    def cmd(out, *extra):
        return [sys.executable, "-m", "jaxcryo_main", "--platform", "cpu", "abinitio", str(star), "--out", str(out),
                "--steps", "10", "--batch-size", "60", "--angular-step", "30", "--quiet", *extra]

    subprocess.run(cmd(tmp_path / "full"), check=True, env=ENV, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    killed_at = _kill_after(cmd(out), out, "step", 2)
    assert 2 <= killed_at < 10, killed_at
    subprocess.run(cmd(out, "--resume"), check=True, env=ENV, capture_output=True, timeout=600)
    _same(tmp_path / "full", out, ("map.mrc",), "loss")
