"""``abinitio`` split over 4 forced CPU devices (``tests/parallel_check.py abinitio`` in a subprocess, which sets
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX starts) gives the 1-device map to 1e-5 and
the same poses, and ``jaxcryo abinitio --devices 4`` records its devices in ``run.json``."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_abinitio_devices_4_matches_devices_1(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env.pop("JAX_PLATFORMS", None)
    proc = subprocess.run([sys.executable, str(HERE / "parallel_check.py"), "abinitio", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PARALLEL_CHECK ")][-1]
    r = json.loads(line.split(" ", 1)[1])["abinitio"]
    assert r["max_rel_diff_map"] < 1e-5, r
    assert r["max_rotation_diff"] < 1e-5 and r["max_shift_diff"] < 1e-5, r
    np_a, np_b = r["losses"]
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(np_a, np_b)), r["losses"]
    assert r["devices"] == [4, 1] and r["cli_returncode"] == 0 and r["cli_devices"] == 4, r
